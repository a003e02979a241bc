"""Per-matrix and per-rank diagnostics of `DistributedMuon`, measured every ``k`` steps.

On a logging step each owner measures the matrices it orthogonalizes, where the whole matrix
already is (no extra traffic): for momentum update ``u`` (``m x n``) and ``O = NS(u)``

- ``u_norm``: ``||u||_F``;
- ``o_dot_u``: ``<O, u> = tr(O^T u)``. For the exact polar factor this is the nuclear norm
  ``||u||_*``; Newton-Schulz maps each singular value ``s`` of ``u`` to ``f(s / ||u||_F)``
  instead of 1, so ``<O, u> = sum_i s_i f(s_i / ||u||_F)`` (docs/diagnostics.md gives how
  close that is for the shipped schedules, measured by tests/test_diagnostics.py);
- ``nuclear_ratio``: ``<O, u>^2 / ||u||_F^2``, the estimate of ``||u||_*^2 / ||u||_F^2``
  (1 for a rank-one ``u``, ``min(m, n)`` for a flat spectrum);
- ``update_rms``: RMS of the applied update ``lr s(m, n) O`` (weight decay not included);
- on the first matrix of each batch (the sample; NaN on the others): ``ns_error``,
  ``||O O^T - I||_F / sqrt(min(m, n))`` (the small Gram side), and ``nuclear_ratio_svd``,
  the exact ``||u||_*^2 / ||u||_F^2`` from the eigenvalues of ``u``'s small Gram matrix.

Each rank adds its own row: seconds per phase of this step, matrices it orthogonalized, bytes
it sent and received, steps skipped so far. All of it travels in one ``all_reduce`` of
``matrices * 6 + world * len(RANK_FIELDS)`` floats on logging steps, none on others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from distributed_muon.layout import ShardLayout

MATRIX_FIELDS = ("u_norm", "o_dot_u", "nuclear_ratio", "nuclear_ratio_svd", "update_rms",
                 "ns_error")
# What travels per matrix: the measured values, and 1 on the sampled matrices.
_COLUMNS = ("u_norm", "o_dot_u", "update_rms", "ns_error", "nuclear_ratio_svd", "sampled")
# The phases of a step, timed back to back. Unpipelined (``exchange_chunks=1``) each is what it
# names. Pipelined (K chunks, which overlap): ``to_owners`` is the time until chunk 0's matrices
# are in place (the inbound transfer left exposed), ``ns`` from then until the last chunk's NS is
# done (all NS, plus the waits for chunks 1..K-1 not hidden behind it), ``to_holders`` the wait
# for the updates still travelling after that.
PHASES = ("momentum", "to_owners", "ns", "to_holders", "update")
RANK_FIELDS = (*(f"time_{p}" for p in PHASES), "ns_matrices", "bytes_sent", "bytes_received",
               "skipped_steps")


def matrix_stats(u: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``[B, 3]``: ``||u||_F``, ``<O, u>`` and ``||O||_F`` of each matrix of ``u, o [B, m, n]``,
    in float32."""
    u, o = u.float(), o.float()
    return torch.stack([torch.linalg.matrix_norm(u), (o * u).sum((-2, -1)),
                        torch.linalg.matrix_norm(o)], dim=1)


def orthogonality_error(o: torch.Tensor) -> float:
    """``||O O^T - I||_F / sqrt(k)`` of one ``[m, n]`` matrix, on its ``k = min(m, n)`` side:
    the RMS over singular values of ``s_i^2 - 1`` (0 for an exact polar factor of full rank)."""
    o = o.float()
    if o.shape[0] > o.shape[1]:
        o = o.T
    k = o.shape[0]
    gram = o @ o.T
    gram.diagonal().sub_(1.0)
    return float(torch.linalg.matrix_norm(gram) / math.sqrt(k))


def nuclear_ratio(u: torch.Tensor) -> float:
    """``||u||_*^2 / ||u||_F^2`` of one ``[m, n]`` matrix, exactly: singular values from the
    eigenvalues of its ``min(m, n)``-side Gram matrix in float64 (NaN for a zero matrix)."""
    u = u.double()
    if u.shape[0] > u.shape[1]:
        u = u.T
    s2 = torch.linalg.eigvalsh(u @ u.T).clamp_min(0)
    fro2 = s2.sum()
    return float(s2.sqrt().sum() ** 2 / fro2) if fro2 > 0 else math.nan


def matrix_labels(layout: ShardLayout, names: Sequence[str]) -> list[str]:
    """A label per logical matrix: the parameter's name, with ``[e<k>]`` for expert ``k`` of a
    3-D parameter and ``[<j>]`` for row block ``j`` of a fused weight (QKV: 0, 1, 2)."""
    first: dict[int, int] = {}
    labels = []
    for mat in layout.matrices:
        start = first.setdefault(mat.param, mat.id)
        spec = layout.specs[mat.param]
        blocks = len(spec.row_blocks)
        expert, block = divmod(mat.id - start, blocks)
        label = names[mat.param]
        if spec.experts > 1:
            label += f"[e{expert}]"
        if blocks > 1:
            label += f"[{block}]"
        labels.append(label)
    return labels


def kind_of(label: str) -> str:
    """The layer type of a matrix label: layer and expert indices dropped
    (``blocks.3.moe.w_in[e2]`` -> ``blocks.*.moe.w_in``; row blocks are kept)."""
    return re.sub(r"\.\d+\.", ".*.", re.sub(r"\[e\d+\]", "", label))


class Diagnostics:
    """Collects one logging step's values and turns them into named scalars.

    ``labels[i]`` names logical matrix ``i`` of ``layout``; ``every`` is the logging period in
    optimizer steps (steps counted from 1, skipped ones included, alike on every rank).
    """

    def __init__(self, every: int, layout: ShardLayout, labels: Sequence[str],
                 group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.every, self.layout, self.labels = every, layout, list(labels)
        self.group, self.device = group, device
        self.world, self.rank = layout.world_size, layout.rank
        nm = len(layout.matrices)
        width = len(_COLUMNS)
        self._buf = torch.zeros(nm * width + self.world * len(RANK_FIELDS),
                                dtype=torch.float64, device=device)
        self._mat = self._buf[: nm * width].view(nm, width)
        self._ranks = self._buf[nm * width:].view(self.world, len(RANK_FIELDS))
        self.last: dict[str, float] = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def begin(self) -> None:
        self._buf.zero_()

    def record_batch(self, matrices: Sequence[int], u: torch.Tensor, o: torch.Tensor,
                     step_scale: Sequence[float], sample: bool = True) -> None:
        """Owner side: ``u, o [B, m, n]`` of ``matrices``; ``step_scale[i] = lr * s(m, n)``.
        ``sample``: also measure the first matrix exactly (once per whole batch: a pipelined
        exchange hands a batch over in parts)."""
        stats = matrix_stats(u, o).double()
        ids = torch.tensor(matrices, device=self._mat.device)
        m, n = u.shape[-2:]
        scale = torch.tensor(step_scale, dtype=torch.float64, device=stats.device)
        self._mat[ids, 0] = stats[:, 0]
        self._mat[ids, 1] = stats[:, 1]
        self._mat[ids, 2] = scale * stats[:, 2] / math.sqrt(m * n)
        if not sample:
            return
        self._mat[matrices[0], 3] = orthogonality_error(o[0])
        self._mat[matrices[0], 4] = nuclear_ratio(u[0])
        self._mat[matrices[0], 5] = 1.0

    def record_rank(self, seconds: dict[str, float], ns_matrices: int,
                    bytes_moved: tuple[int, int], skipped_steps: int) -> None:
        row = [seconds.get(p, 0.0) for p in PHASES] + [ns_matrices, *bytes_moved, skipped_steps]
        self._ranks[self.rank] = torch.tensor(row, dtype=torch.float64)

    def finish(self, step: int) -> dict[str, float]:
        """The one collective of a logging step (every rank joins), then the scalars."""
        if self.group is not None:
            dist.all_reduce(self._buf, group=self.group)
        self.last = summarize(step, self.labels, self._mat.cpu(), self._ranks.cpu())
        return self.last


def summarize(step: int, labels: Sequence[str], mat: torch.Tensor,
              ranks: torch.Tensor) -> dict[str, float]:
    """Named scalars from the reduced ``mat [matrices, len(_COLUMNS)]`` and
    ``ranks [world, len(RANK_FIELDS)]``.

    Keys: ``step``; ``<label>/<field>`` per matrix; ``<kind>/<field>`` means per layer type
    (`kind_of`); ``all/<field>`` means over matrices; ``rank<r>/<field>`` per rank;
    ``ns_imbalance`` (max over mean of per-rank NS seconds, 1 = balanced); ``bytes_sent``
    (sum over ranks); ``skipped_steps``.
    """
    u_norm, o_dot_u = mat[:, 0], mat[:, 1]
    ratio = torch.where(u_norm > 0, o_dot_u**2 / u_norm.clamp_min(1e-300) ** 2, torch.nan)
    sampled = mat[:, 5] > 0
    mat = torch.stack([u_norm, o_dot_u, ratio, torch.where(sampled, mat[:, 4], torch.nan),
                       mat[:, 2], torch.where(sampled, mat[:, 3], torch.nan)], dim=1)
    out: dict[str, float] = {"step": float(step)}
    kinds: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        kinds.setdefault(kind_of(label), []).append(i)
        for f, field in enumerate(MATRIX_FIELDS):
            out[f"{label}/{field}"] = float(mat[i, f])
    for name, idx in [*kinds.items(), ("all", list(range(len(labels))))]:
        for f, field in enumerate(MATRIX_FIELDS):
            values = mat[idx, f]
            values = values[~values.isnan()]
            out[f"{name}/{field}"] = float(values.mean()) if len(values) else math.nan
    for r in range(ranks.shape[0]):
        for f, field in enumerate(RANK_FIELDS):
            out[f"rank{r}/{field}"] = float(ranks[r, f])
    ns = ranks[:, RANK_FIELDS.index("time_ns")]
    out["ns_imbalance"] = float(ns.max() / ns.mean()) if float(ns.mean()) > 0 else math.nan
    out["bytes_sent"] = float(ranks[:, RANK_FIELDS.index("bytes_sent")].sum())
    out["skipped_steps"] = float(ranks[:, RANK_FIELDS.index("skipped_steps")].max())
    return out
