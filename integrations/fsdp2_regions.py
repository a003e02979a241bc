"""FSDP2 and HSDP regions from metadata: the ``torch.chunk`` rule `DTensorSharding` reports
live, and the tables `dmuon plan` builds from it for every rank (DDP, FSDP2, HSDP, and
torchtitan's expert sharding under expert parallelism).

No process group and no tensors: shapes, mesh sizes and coordinates only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from distributed_muon.integrations.replicated import whole_rect

from distributed_muon.cluster import (
    ModelParam,
    ParallelLayout,
    Rect,
    Unit,
    flat_rect,
    group_ranks,
    spec_of,
    table,
)
from distributed_muon.params import MatrixSpec


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``torch.chunk`` splits ``size`` in ``parts``
    (FSDP2's ``Shard`` rule: ``ceil(size / parts)`` each, the last ones shorter or empty)."""
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def shard_rects(shape: Sequence[int], spec: MatrixSpec, dim: int, start: int,
                stop: int) -> list[Rect]:
    """A ``Shard(dim)`` holding ``[start, stop)`` of dimension ``dim`` of a ``shape``
    parameter, in ``spec``'s ``[E*m, n]`` view: ``dim=0`` a flat range of whole leading
    slices; ``dim=1`` of a 2-D weight a column block; ``dim=1`` of ``[E, m, n]`` rows
    ``[start, stop)`` of every expert, experts back to back in local storage."""
    if dim == 0:
        inner = spec.experts * spec.rows * spec.cols // shape[0]
        return [flat_rect(spec, start * inner, stop * inner)]
    if len(shape) == 2:
        return [(0, spec.rows, start, stop, 0, spec.rows * (stop - start), 0)]
    if spec.experts != shape[0]:
        raise ValueError("Shard(1) of a 3-D parameter needs matrix_view='experts'")
    n = shape[2]
    per_expert = (stop - start) * n
    return [(e * spec.rows + start, e * spec.rows + stop, 0, n, 0, per_expert, e * per_expert)
            for e in range(shape[0])]


def data_parallel_units(params: list[ModelParam], layout: ParallelLayout,
                        stage: int) -> list[Unit]:
    """DDP, FSDP2 and HSDP (torchtitan's expert sharding under ``ep``): one unit per stage."""
    world = layout.stage_size
    replicas = layout.replicate if layout.kind == "hsdp" else 1
    shard = world // replicas
    specs = [spec_of(p) for p in params]
    tables = []
    done: dict[tuple, np.ndarray] = {}  # parameters of one shape share one (read-only) table
    for p, spec in zip(params, specs, strict=True):
        key = (spec, p.expert)
        if key not in done:
            done[key] = table([row for r in range(world)
                               for row in _rows(layout, p, spec, r, shard)])
        tables.append(done[key])
    return [Unit(f"stage {stage}", stage, [p.name for p in params], specs, tables,
                 group_ranks(layout, stage))]


def _rows(layout: ParallelLayout, p: ModelParam, spec: MatrixSpec, rank: int,
          shard: int) -> list[tuple[int, ...]]:
    """Stage rank ``rank``'s region rows of ``p``."""
    replica, idx = divmod(rank, shard)
    if layout.kind == "ddp":
        return [(rank, rank, *whole_rect(spec))]
    if p.expert and layout.ep > 1:
        return [(rank, replica, *r) for r in _ep_expert_rects(idx, spec, layout.ep, shard)]
    lo, hi = chunk_range(spec.shape[0], shard, idx)
    if hi <= lo:
        return []
    return [(rank, replica, *r) for r in shard_rects(spec.shape, spec, 0, lo, hi)]


def _ep_expert_rects(idx: int, spec: MatrixSpec, ep: int, shard: int) -> list[Rect]:
    """torchtitan: experts split over the ``ep`` innermost ranks of the shard group, then
    FSDP over the other ``shard / ep`` ranks: ``Shard(0)`` over the local experts, or
    ``Shard(1)`` (rows of every local expert) when there are fewer local experts than ranks."""
    e_rank, f_rank = idx % ep, idx // ep
    fsdp = shard // ep
    local = spec.experts // ep
    first = e_rank * local
    m, n = spec.rows, spec.cols
    if local >= fsdp:
        lo, hi = chunk_range(local, fsdp, f_rank)
        return [flat_rect(spec, (first + lo) * m * n, (first + hi) * m * n)] if hi > lo else []
    lo, hi = chunk_range(m, fsdp, f_rank)
    if hi <= lo:
        return []
    # Shard(1) of this EP rank's [local, m, n] experts, placed at its first expert's rows.
    local_spec = MatrixSpec.of((local, m, n))
    return [(r0 + first * m, r1 + first * m, c0, c1, s, e, o)
            for r0, r1, c0, c1, s, e, o in shard_rects((local, m, n), local_spec, 1, lo, hi)]
