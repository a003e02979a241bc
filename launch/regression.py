"""Multi-output linear regression with ill-conditioned inputs: a small, exact testbed.

Loss ``L(W) = ||X W^T - Y||_F^2 / (2N)`` for ``X`` of ``N x d`` whose singular values are
log-spaced from 1 down to ``1/condition``, and ``Y = X W*^T`` (``W*`` of ``out x d``). The
Hessian's condition number is ``condition^2``: gradient descent crawls along the small
directions, while Muon's orthogonalized step moves all of them at the same rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

OPTIMIZERS = ("muon", "adamw", "sgd")
# Each optimizer's best learning rate is picked from its own grid, by the same rule.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "muon": (0.03, 0.1, 0.3, 1.0, 3.0),
    "adamw": (0.03, 0.1, 0.3, 1.0, 3.0),
    # Heavy-ball SGD diverges above lr ~3.8 here (Hessian eigenvalues <= 1, momentum 0.9).
    "sgd": (0.3, 1.0, 2.0, 3.0, 3.5),
}


@dataclass(frozen=True)
class Problem:
    X: torch.Tensor  # [N, d]
    Y: torch.Tensor  # [N, out]
    W0: torch.Tensor  # [out, d] starting point

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        return (self.X @ W.T - self.Y).square().sum() / (2 * self.X.shape[0])


def make_problem(
    seed: int, d: int = 64, out: int = 32, samples: int = 512, condition: float = 1000.0
) -> Problem:
    """A seeded problem whose inputs have the given condition number."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(samples, d, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), d)
    X = (U * s) @ V.T * samples**0.5  # columns scaled so X^T X / N has eigenvalues s^2
    W_star = torch.randn(out, d, generator=gen)
    return Problem(X, X @ W_star.T, torch.zeros(out, d))


def _optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    from distributed_muon.optimizer import DistributedMuon

    if name == "muon":
        return DistributedMuon(params, lr=lr, ns_dtype="fp32", comm_dtype="fp32")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}: use one of {OPTIMIZERS}")


def train(problem: Problem, name: str, lr: float, steps: int) -> float:
    """Final loss after ``steps`` full-batch steps with linearly decaying lr."""
    W = problem.W0.clone().requires_grad_()
    opt = _optimizer(name, [W], lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = problem.loss(W)
        if not torch.isfinite(loss):
            return float("inf")
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float(problem.loss(W))


def best_loss(
    problem: Problem, name: str, steps: int, grid: Sequence[float] | None = None
) -> tuple[float, float]:
    """(best final loss, its lr) over the optimizer's lr grid."""
    results = [(train(problem, name, lr, steps), lr) for lr in (grid or LR_GRIDS[name])]
    return min(results)


def compare(
    seeds: Sequence[int], steps: int, progress: Callable[[str], None] | None = None
) -> list[dict[str, float]]:
    """Per seed and optimizer: the best final loss and its learning rate."""
    rows = []
    for seed in seeds:
        problem = make_problem(seed)
        initial = float(problem.loss(problem.W0))
        for name in OPTIMIZERS:
            loss, lr = best_loss(problem, name, steps)
            rows.append({"seed": seed, "optimizer": name, "lr": lr, "loss": loss,
                         "initial": initial})
            if progress:
                progress(f"seed {seed} {name:>5}: best lr {lr:g}, loss {loss:.3e}")
    return rows
