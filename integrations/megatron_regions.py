"""Megatron regions from metadata: the tensor-parallel blocks `MegatronSharding` reports, the
distributed optimizer's ranges inside them, and the tables `dmuon plan` builds from both.

- `tp_rects`: the blocks one TP rank holds of a parameter's ``[rows, cols]`` view
  (column-parallel: rows, every TP-size-th chunk of them under ``partition_stride``;
  row-parallel: a column block), with where each sits in local storage.
- `buffer_layout` and `range_in_param`: Megatron's distributed optimizer puts a TP rank's
  parameters in one buffer in reverse order and cuts it into one even range per
  data-parallel rank; a DP rank's main shard of a parameter is a flat range of the
  parameter's local storage. The model here is one bucket without Megatron's alignment
  padding (params at multiples of 64 values, the bucket end at a multiple of lcm(dp, 128)).
- `restrict_rows`: regions cut to such a range (what the main shard holds of them);
  `restrict_regions`, the same rule for a live adapter's `Region`s (`MegatronMuon`'s main
  shards).

tests/test_megatron_regions.py checks `tp_rects` against `MegatronSharding` on a real
megatron-core parallel state (TP 2, EP 2, on gloo).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distributed_muon.cluster import (
    ModelParam,
    ParallelLayout,
    Rect,
    Unit,
    group_ranks,
    region,
    spec_of,
    table,
)
from distributed_muon.layout import Region, region_table
from distributed_muon.params import MatrixSpec

# A whole block a TP rank holds: (row0, row1, col0, col1, offset in local storage).
TPRect = tuple[int, int, int, int, int]


def tp_rects(rows: int, cols: int, dim: int | None, stride: int, tp_size: int,
             tp_rank: int) -> list[TPRect]:
    """The blocks TP rank ``tp_rank`` of ``tp_size`` holds of a ``[rows, cols]`` parameter
    split along ``dim`` (None: whole; 0: column-parallel, ``stride`` chunks per rank, chunk
    ``j * tp_size + tp_rank`` at local offset ``j * chunk``; 1: row-parallel, a column
    block)."""
    if dim is None:
        return [(0, rows, 0, cols, 0)]
    if dim == 0:
        size = rows // tp_size // stride
        return [((j * tp_size + tp_rank) * size, (j * tp_size + tp_rank + 1) * size, 0, cols,
                 j * size * cols) for j in range(stride)]
    width = cols // tp_size
    return [(0, rows, tp_rank * width, (tp_rank + 1) * width, 0)]


def block_rect(rect: TPRect, row_base: int = 0) -> Rect:
    """A whole block as a region, its rows moved down by ``row_base`` (an EP rank's slot in
    a ``[EP, m, n]`` stack of experts: ``ep_rank * m``)."""
    r0, r1, c0, c1, offset = rect
    return (row_base + r0, row_base + r1, c0, c1, 0, (r1 - r0) * (c1 - c0), offset)


def buffer_layout(numels: Sequence[int], size: int) -> tuple[list[int], int]:
    """Where each parameter (``numels``: TP-local values, in model order) starts in the
    distributed optimizer's buffer, filled in reverse order, and the values per DP rank
    (``size`` ranks, one even range each)."""
    part = -(-sum(numels) // size) if numels else 0
    bases = [0] * len(numels)
    base = 0
    for i in reversed(range(len(numels))):
        bases[i] = base
        base += numels[i]
    return bases, part


def range_in_param(base: int, numel: int, part: int, dp_rank: int | np.ndarray
                   ) -> tuple[int | np.ndarray, int | np.ndarray]:
    """``[lo, hi)`` of a parameter's local storage (``numel`` values from ``base`` in the
    buffer) in DP rank ``dp_rank``'s range (empty when ``lo == hi``); vectorized over
    ``dp_rank``."""
    return (np.clip(dp_rank * part - base, 0, numel),
            np.clip((dp_rank + 1) * part - base, 0, numel))


def restrict_rows(rows: np.ndarray, start: int | np.ndarray,
                  stop: int | np.ndarray) -> np.ndarray:
    """Region rows (`REGION_COLUMNS`) cut to local storage ``[start, stop)`` (per row or for
    all), re-offset to ``start``; rows left empty are dropped."""
    offset, begin = rows[:, 8], rows[:, 6]
    lo = np.maximum(start, offset)
    hi = np.minimum(stop, offset + rows[:, 7] - begin)
    out = rows.copy()
    out[:, 6], out[:, 7], out[:, 8] = begin + lo - offset, begin + hi - offset, lo - start
    return out[lo < hi]


def restrict_regions(regions: Sequence[Region], start: int, stop: int,
                     replica: int) -> list[Region]:
    """`restrict_rows` for a live adapter: ``regions`` cut to local storage ``[start, stop)``
    (a distributed-optimizer main shard), each now part of copy ``replica``."""
    rows = restrict_rows(region_table(regions), start, stop)
    rows[:, 1] = replica
    return [region(rank, rep, tuple(rect)) for rank, rep, *rect in rows.tolist()]


def megatron_units(params: list[ModelParam], layout: ParallelLayout, stage: int) -> list[Unit]:
    """Megatron TP (each data-parallel copy a replica, named by its lowest rank) and EP with
    expert-TP 1: expert ``j`` of every EP rank is one ``[ep, m, n]`` parameter (as
    `MegatronSharding` sees SequentialMLP / TEGroupedMLP weights), EP rank ``e`` holding rows
    ``[e*m, (e+1)*m)``. ``megatron_do``: each cut to its distributed-optimizer range."""
    world, tp, ep = layout.stage_size, layout.tp, layout.ep
    specs, names, tables, experts, split = [], [], [], [], []
    for p in params:
        if p.expert:
            m, n = p.shape[1:]
            local = p.shape[0] // ep
            rows = table([(r, r // ep * ep, *block_rect(rect, r % ep * m))
                          for r in range(world) for rect in tp_rects(m, n, None, 1, 1, 0)])
            for j in range(local):
                specs.append(MatrixSpec.of((ep, m, n), name=p.name))
                names.append(f"{p.name}[{j}::{local}]")
                tables.append(rows)
                experts.append(True)
                split.append(True)
            continue
        spec = spec_of(p)
        specs.append(spec)
        names.append(p.name)
        tables.append(_dense_rows(p, spec, world, tp))
        experts.append(False)
        split.append(p.tp is not None and tp > 1)
    if layout.kind == "megatron_do":
        tables = _distributed_optimizer(tables, experts, split, world, tp, ep)
    return [Unit(f"stage {stage}", stage, names, specs, tables, group_ranks(layout, stage))]


def _dense_rows(p: ModelParam, spec: MatrixSpec, world: int, tp: int) -> np.ndarray:
    """Every stage rank's TP block of ``p`` (TP innermost): a TP-split parameter one copy
    per TP group (replica: its lowest rank), a whole one a copy per rank."""
    rows, cols = spec.experts * spec.rows, spec.cols
    whole = p.tp is None or tp == 1
    dim = None if whole else (0 if p.tp == "col" else 1)
    size = 1 if whole else tp
    blocks = [[block_rect(rect) for rect in tp_rects(rows, cols, dim, 1, size, t)]
              for t in range(size)]  # the same for every TP group
    out = []
    for r in range(world):
        t_rank = r % size
        replica = r if whole else r - t_rank
        out.extend((r, replica, *rect) for rect in blocks[t_rank])
    return table(out)


def _distributed_optimizer(tables: list[np.ndarray], experts: list[bool], split: list[bool],
                           world: int, tp: int, ep: int) -> list[np.ndarray]:
    """Cut each rank's TP-local regions to its distributed-optimizer range: the dense
    parameters' buffer over the DP ranks (``rank // tp``), the experts' over the expert-DP
    ranks (``rank // ep``). One copy over TP x DP; a parameter whole on every TP rank: a copy
    per TP rank."""
    out = list(tables)
    for is_expert, size, stride in ((False, world // tp, tp), (True, world // ep, ep)):
        group = [i for i, e in enumerate(experts) if e == is_expert]
        numels = [int(_local_numel(tables[i])) for i in group]
        bases, part = buffer_layout(numels, size)
        for i, base, numel in zip(group, bases, numels, strict=True):
            t = tables[i]
            lo, hi = range_in_param(base, numel, part, t[:, 0] // stride)
            cut = restrict_rows(t, lo, hi)
            cut[:, 1] = 0 if split[i] else cut[:, 0] % tp
            out[i] = cut
    return out


def _local_numel(t: np.ndarray) -> int:
    """Values one rank holds of a parameter (every rank the same under TP): rank 0's."""
    mine = t[t[:, 0] == t[0, 0]]
    return int((mine[:, 7] - mine[:, 6]).sum())
