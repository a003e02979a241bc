"""QK-clip (MuonClip): keep attention logits bounded by scaling query and key rows after a step.

The model reports, per step, the largest pre-softmax logit of every attention head through a
`MaxLogitRecorder` (one per attention layer; `max_logits` computes the per-head maxima of
standard scaled-dot-product attention). After the optimizer update, `QKClip.step` takes the
maximum over the optimizer's process group (all data-parallel ranks; micro-batches are already
folded in by the recorder) and, for each head ``h`` with ``S_h > tau``, gives the factor
``sqrt(tau / S_h)`` to that head's rows of ``W_q`` and of ``W_k`` (the per-head split of Kimi
K2: the logit ``q.k`` of the same inputs scales by ``tau / S_h``). `scale_rows` applies the
factors to a rank's local storage only, through the `Sharding`'s regions: no weight moves.

Framework-free: recorders hold plain tensors; the optimizer owns the `QKClip`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distributed_muon.params import MatrixSpec
from distributed_muon.sharding import Sharding


@torch.no_grad()
def max_logits(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
               causal: bool = False) -> torch.Tensor:
    """Per-head maximum of ``scale * q k^T`` over batch, queries and keys: shape ``[H]``.

    ``q``: ``[B, H, Tq, hd]``, ``k``: ``[B, H, Tk, hd]`` (as for
    ``F.scaled_dot_product_attention``); ``scale`` defaults to ``1/sqrt(hd)``. ``causal``
    masks key ``j > i`` for query ``i``, as SDPA's ``is_causal`` does (top-left aligned)."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"max_logits needs q [B, H, Tq, hd] and k [B, H, Tk, hd] with the same "
                         f"B, H and hd; got {tuple(q.shape)} and {tuple(k.shape)} (grouped "
                         "keys: repeat them per query head first)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if causal:
        future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu_(1)
        logits.masked_fill_(future, float("-inf"))
    return logits.amax(dim=(0, 2, 3))


class MaxLogitRecorder:
    """Where one attention layer reports its per-head max logits during a step's forward.

    ``record`` keeps the running maximum over micro-batches; the optimizer reads and resets it
    once per step. Record in training forwards only (not in evaluation)."""

    def __init__(self, heads: int) -> None:
        if heads < 1:
            raise ValueError(f"heads={heads}: must be at least 1")
        self.heads = heads
        self.value: torch.Tensor | None = None

    def record(self, per_head: torch.Tensor) -> None:
        """Fold in a ``[heads]`` tensor of maxima."""
        v = per_head.detach().float()
        if v.shape != (self.heads,):
            raise ValueError(f"expected {self.heads} per-head maxima, got shape {tuple(v.shape)}")
        self.value = v.clone() if self.value is None else torch.maximum(self.value, v)

    def record_attention(self, q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                         causal: bool = False) -> None:
        """``record(max_logits(q, k, scale=scale, causal=causal))``."""
        self.record(max_logits(q, k, scale=scale, causal=causal))

    def take(self, device: torch.device) -> torch.Tensor:
        """The maxima since the last take (``-inf`` where nothing was recorded); resets."""
        value, self.value = self.value, None
        if value is None:
            return torch.full((self.heads,), float("-inf"), device=device)
        return value.to(device)


@dataclass(frozen=True)
class QKTarget:
    """Rows of one attention layer's heads: head ``h``'s query rows are
    ``[q_row + h*head_dim, +head_dim)`` of ``q_weight``, its key rows likewise in ``k_weight``
    (the same tensor for a fused QKV weight)."""

    recorder: MaxLogitRecorder
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    head_dim: int
    q_row: int
    k_row: int


class QKClip:
    """The clip of one optimizer: threshold ``tau``, the registered attention layers, and what
    the last step did (``last_clipped`` heads, ``last_max_logit`` over all heads; ``None``
    before any step). ``tau = inf`` records the maxima and never clips."""

    def __init__(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"qk_clip_tau={tau!r} is not valid: must be > 0 (None: off)")
        self.tau = float(tau)
        self.targets: list[QKTarget] = []
        self._rows: dict[int, int] = {}  # global rows of each registered weight, by id
        self.last_clipped = 0
        self.last_max_logit: float | None = None

    def register(self, recorder: MaxLogitRecorder, q_weight: torch.Tensor,
                 k_weight: torch.Tensor | None, *, head_dim: int, q_row: int, k_row: int | None,
                 shape_of: Callable[[torch.Tensor], torch.Size]) -> None:
        """Add one attention layer (the arguments of ``DistributedMuon.register_qk``) after
        checking its rows against the weights' global shapes (``shape_of(param)``)."""
        fused = k_weight is None
        if k_row is None:
            k_row = q_row + recorder.heads * head_dim if fused else 0
        target = QKTarget(recorder, q_weight, q_weight if fused else k_weight, head_dim, q_row,
                          k_row)
        if any(t.recorder is target.recorder for t in self.targets):
            raise ValueError("this recorder is registered already: one recorder per layer")
        span = target.recorder.heads * target.head_dim
        for what, weight, row in (("q", target.q_weight, target.q_row),
                                  ("k", target.k_weight, target.k_row)):
            shape = tuple(shape_of(weight))
            if len(shape) != 2 or row < 0 or row + span > shape[0]:
                raise ValueError(
                    f"{what} rows [{row}, {row + span}) of {target.recorder.heads} heads x "
                    f"head_dim {target.head_dim} do not fit a 2-D weight of shape {shape}")
            self._rows[id(weight)] = shape[0]
        self.targets.append(target)

    def pending(self) -> bool:
        """True when a recorder holds maxima not yet taken (a forward ran since the last step).
        The same on every rank when every rank runs the model."""
        return any(t.recorder.value is not None for t in self.targets)

    def discard(self) -> None:
        """Forget what the recorders hold (a skipped step)."""
        for t in self.targets:
            t.recorder.value = None

    def step(self, group: dist.ProcessGroup | None, device: torch.device
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All-reduce (MAX) every recorder's maxima over ``group`` (one collective), then
        return ``(weight, per-row factor)`` for each weight with a clipped head (rows of
        unclipped heads and other rows get 1). Every rank of ``group`` must call it."""
        self.last_clipped = 0
        if not self.targets:
            return []
        maxima = torch.cat([t.recorder.take(device) for t in self.targets])
        if group is not None:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        self.last_max_logit = float(maxima.max())
        over = maxima > self.tau
        self.last_clipped = int(over.sum())
        if not self.last_clipped:
            return []
        gamma = torch.where(over, (self.tau / maxima).sqrt(), torch.ones_like(maxima))
        factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t, g in zip(self.targets, gamma.split([t.recorder.heads for t in self.targets]),
                        strict=True):
            if not bool((g < 1).any()):
                continue
            per_row = g.repeat_interleave(t.head_dim)
            for weight, row in ((t.q_weight, t.q_row), (t.k_weight, t.k_row)):
                if id(weight) not in factors:
                    factors[id(weight)] = (weight, torch.ones(self._rows[id(weight)],
                                                              device=device))
                factors[id(weight)][1][row:row + per_row.numel()] *= per_row
        return list(factors.values())


def scale_rows(sharding: Sharding, param: torch.Tensor, row_factor: torch.Tensor) -> None:
    """Multiply row ``r`` of 2-D ``param`` by ``row_factor[r]`` in this rank's local storage
    only (the rows, or parts of rows, that the sharding's regions say it holds): at most three
    vectorized multiplies per region, whatever its shape."""
    spec = MatrixSpec.storage(sharding.shape(param))
    local = sharding.local(param).view(-1)
    cols = spec.cols
    row_factor = row_factor.to(device=local.device, dtype=local.dtype)
    for region in sharding.regions(param, spec):
        for seg in region.block.segments(cols):
            values = local.narrow(0, region.offset + seg.value_offset, math.prod(seg.size))
            if len(seg.size) == 1:  # a flat run of full-width rows
                _scale_run(values, seg.matrix_offset, cols, row_factor)
            else:  # a rectangle: rows x cols of the matrix, contiguous in local storage
                row = seg.matrix_offset // cols
                values.view(seg.size).mul_(row_factor[row:row + seg.size[0], None])


def _scale_run(values: torch.Tensor, start: int, cols: int, row_factor: torch.Tensor) -> None:
    """``values`` are the global flat elements ``[start, start + len)`` of a ``[*, cols]``
    matrix: scale each by its row's factor (a partial first row, whole rows, a partial last)."""
    pos, end = 0, values.numel()
    while pos < end:
        row, col = divmod(start + pos, cols)
        if col == 0 and end - pos >= cols:
            rows = (end - pos) // cols
            values.narrow(0, pos, rows * cols).view(rows, cols).mul_(
                row_factor[row:row + rows, None])
            pos += rows * cols
        else:
            n = min(cols - col, end - pos)
            values.narrow(0, pos, n).mul_(row_factor[row])
            pos += n
