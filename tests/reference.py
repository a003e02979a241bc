"""A plain, per-matrix implementation of DESIGN section 1, written independently of the package.

Used as ground truth by single-process and distributed tests: one loop per parameter, one
loop per logical matrix, no batching, no exchange.
"""

from __future__ import annotations

import math

import torch

JORDAN = [(3.4445, -4.7750, 2.0315)]


def newton_schulz(u: torch.Tensor, coeffs, steps: int, eps: float, dtype=torch.float32):
    X = u.to(torch.float32)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = (X / (X.norm() + eps)).to(dtype)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


def scale(mode: str, m: int, n: int) -> float:
    return {
        "match_rms_adamw": 0.2 * math.sqrt(max(m, n)),
        "original": math.sqrt(max(1.0, m / n)),
        "spectral": math.sqrt(m / n),
        "none": 1.0,
    }[mode]


def matrices(shape, row_blocks=None):
    """Index expressions (expert, row slice) of each logical matrix of a parameter."""
    experts = shape[0] if len(shape) == 3 else None
    rows = shape[-2] if len(shape) == 3 else shape[0]
    blocks = row_blocks or [rows]
    out = []
    for e in range(experts or 1):
        r = 0
        for b in blocks:
            out.append((e if experts is not None else None, slice(r, r + b)))
            r += b
    return out


class ReferenceMuon:
    """Muon on a list of full (unsharded) tensors, updated in place by `step(grads)`."""

    def __init__(self, params, lr, momentum=0.95, nesterov=True, momentum_form="ema",
                 weight_decay=0.0, scale="match_rms_adamw", coeffs=JORDAN, steps=5, eps=1e-7,
                 row_blocks=None, ns_dtype=torch.float32):
        self.params = params
        self.lr, self.mu, self.nesterov, self.form = lr, momentum, nesterov, momentum_form
        self.wd, self.scale, self.eps = weight_decay, scale, eps
        self.coeffs, self.steps = coeffs, steps
        self.row_blocks = row_blocks or {}
        self.ns_dtype = ns_dtype
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads):
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            buf = self.bufs[i]
            if self.form == "ema":
                buf.mul_(self.mu).add_(g, alpha=1 - self.mu)
                u = (1 - self.mu) * g + self.mu * buf if self.nesterov else buf.clone()
            else:
                buf.mul_(self.mu).add_(g)
                u = g + self.mu * buf if self.nesterov else buf.clone()
            view = u.reshape(u.shape[0], -1) if u.ndim >= 4 else u
            update = torch.zeros_like(view)
            for e, rows in matrices(view.shape, self.row_blocks.get(i)):
                idx = (e, rows) if e is not None else (rows,)
                block = view[idx]
                m, n = block.shape
                O = newton_schulz(block, self.coeffs, self.steps, self.eps, self.ns_dtype)
                update[idx] = O.to(update.dtype) * scale(self.scale, m, n)
            p.mul_(1 - self.lr * self.wd)
            p.add_(update.reshape(p.shape), alpha=-self.lr)
