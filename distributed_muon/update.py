"""The per-element math of a step: momentum, Muon's parameter update, AdamW.

Pure functions over lists of tensors (one entry per parameter, or per local shard of one):
no optimizer object, no process group, no options table. They update the tensors they are
given in place with torch's ``_foreach`` kernels, so one call is a few kernel launches for
all of a group's parameters. `DistributedMuon` keeps the state, exchanges the matrices and
calls these; any code that holds the same tensors gets the same bits.

Lists passed together are parallel (entry ``i`` of each belongs to the same parameter) and
of the same shapes entry by entry. Scalars (``lr``, ``momentum``, betas) are Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

# Values of u computed at once when it cannot be computed in its buffer (64 Mi: 256 MiB fp32).
U_CHUNK = 1 << 26


def momentum_(bufs: list[torch.Tensor], grads: list[torch.Tensor], momentum: float,
              form: str) -> None:
    """``buf <- mu buf + (1 - mu) g`` (``form="ema"``, as torch.optim.Muon) or
    ``buf <- mu buf + g`` (``"sum"``), in place on ``bufs``."""
    if form == "ema":
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
    else:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)


def nesterov_into(out: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                  momentum: float, form: str, nesterov: bool) -> None:
    """Write the momentum update ``u`` of each parameter into ``out`` (``bufs`` already
    updated by `momentum_`): ``u = buf`` without Nesterov, else ``u = (1 - mu) g + mu buf``
    (``"ema"``) or ``u = g + mu buf`` (``"sum"``).

    ``out`` may have another dtype than ``bufs`` (the bf16 exchange buffer): ``u`` is then
    computed in the momentum's dtype and rounded once, at most `U_CHUNK` values at a time."""
    ema = form == "ema"
    if not nesterov:
        torch._foreach_copy_(out, bufs)
    elif all(o.dtype == b.dtype for o, b in zip(out, bufs, strict=True)):
        # u computed in place in ``out``: no transient copy of every momentum.
        torch._foreach_copy_(out, grads)
        if ema:
            torch._foreach_lerp_(out, bufs, momentum)
        else:
            torch._foreach_add_(out, bufs, alpha=momentum)
    else:
        # The transient is bounded by U_CHUNK values, not every momentum at once.
        for part in bounded(range(len(out)), [b.numel() for b in bufs], U_CHUNK):
            gp, bp = [grads[k] for k in part], [bufs[k] for k in part]
            u = torch._foreach_lerp(gp, bp, momentum) if ema else torch._foreach_add(
                gp, bp, alpha=momentum)
            torch._foreach_copy_([out[k] for k in part], u)


def muon_update_(params: list[torch.Tensor], updates: list[torch.Tensor], lr: float,
                 weight_decay: float) -> None:
    """``W <- W (1 - lr wd) - lr O``: decoupled weight decay with the base lr, then the step.

    ``updates`` are the orthogonalized updates already multiplied by their shape scale
    ``s(m, n)`` (the owner does that before sending them back), so the step is ``lr s O``."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)


def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], steps: Sequence[float], *, lr: float,
           betas: tuple[float, float], eps: float, weight_decay: float,
           bias_correction: bool) -> None:
    """One AdamW step in place on ``params``, ``exp_avgs`` and ``exp_avg_sqs``.

    ``steps`` are the step counts including this one (1 at the first step), used for bias
    correction: ``p <- p (1 - lr wd) - lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps)``
    (without bias correction both factors are 1)."""
    beta1, beta2 = betas
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if bias_correction:
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        step_sizes = [-lr / (1 - beta1**t) for t in steps]
    else:
        step_sizes = [-lr] * len(steps)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def bounded(items: Sequence[int], sizes: Sequence[int], cap: int) -> Iterator[list[int]]:
    """``items`` in order, cut into runs whose ``sizes`` add up to at most ``cap`` (an item
    larger than ``cap`` is a run of its own)."""
    run: list[int] = []
    total = 0
    for item, size in zip(items, sizes, strict=True):
        if run and total + size > cap:
            yield run
            run, total = [], 0
        run.append(item)
        total += size
    if run:
        yield run
