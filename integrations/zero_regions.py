"""DeepSpeed ZeRO partitions from metadata: which fragment of which parameter every rank's
flat partition holds, and the regions those fragments are.

The live adapter (`FlatSharding`) reads DeepSpeed's real partition maps
(`deepspeed_internals`) and turns each fragment into a region with `fragment_rect`;
`dmuon plan` predicts the fragments with `partition_fragments` (ZeRO-1/2) or
`zero3_fragments` (ZeRO-3, per `sub_groups`) and turns them into regions the same way.
tests/test_zero_regions.py checks the prediction against real engines.

A fragment is ``(start, length, offset)``: values ``[start, start + length)`` of a
parameter's row-major storage, at ``offset`` of the rank's flat partition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from distributed_muon import cluster
from distributed_muon.cluster import ModelParam, ParallelLayout, Rect, Unit
from distributed_muon.params import MatrixSpec

Fragment = tuple[int, int, int]
# Per parameter, every rank's fragment of it as an int64 row (rank, start, length, offset), in
# rank order (ranks that hold none of it have no row).
Fragments = list[np.ndarray]


def fragment_rect(spec: MatrixSpec, fragment: Fragment) -> Rect:
    """The region a fragment is, in its parameter's local storage (the fragment itself)."""
    start, length, _ = fragment
    return cluster.flat_rect(spec, start, start + length)


def fragment_table(spec: MatrixSpec, fragments: np.ndarray) -> np.ndarray:
    """`fragment_rect` of every rank's fragment (rows of `Fragments`) at once, as region rows
    (one copy: replica 0)."""
    out = np.empty((len(fragments), 9), dtype=np.int64)
    out[:, 2:] = fragment_rect(spec, (0, 0, 0))
    out[:, 0], out[:, 1] = fragments[:, 0], 0
    out[:, 6], out[:, 7] = fragments[:, 1], fragments[:, 1] + fragments[:, 2]
    return out


# ZeRO-1/2 pad the flat group to a multiple of this many values per rank
# (``nccl_start_alignment_factor``: 4-byte starts for 16-bit values).
ALIGNMENT = 2


def partition_fragments(numels: Sequence[int], world: int) -> Fragments:
    """ZeRO-1/2: parameters of ``numels`` values, flattened in order and padded to a multiple
    of ``ALIGNMENT * world``, cut into one even range per rank of ``world`` (DeepSpeed's
    ``parameter_alignment`` padding, off by default, is not modelled)."""
    part = -(-sum(numels) // (ALIGNMENT * world)) * ALIGNMENT
    out: Fragments = []
    base = 0
    for numel in numels:
        ranks = np.arange(base // part, min(world, -(-(base + numel) // part)))
        lo = np.maximum(ranks * part, base)
        hi = np.minimum((ranks + 1) * part, base + numel)
        keep = lo < hi
        out.append(np.stack([ranks, lo - base, hi - lo, lo - ranks * part], axis=1)[keep])
        base += numel
    return out


def zero3_range(rank: int, part: int, numel: int) -> tuple[int, int]:
    """ZeRO-3 pads a parameter of ``numel`` values to ``world * part`` and gives rank ``r``
    values ``[r * part, (r + 1) * part)``: the real ones of them (empty past the end)."""
    return rank * part, min((rank + 1) * part, numel)


def zero3_fragments(numels: Sequence[int], world: int) -> Fragments:
    """ZeRO-3, one sub-group: every parameter split evenly (`zero3_range`, ``ceil(numel /
    world)`` each), each rank's parts back to back in its flat partition (so a part's offset
    is the same on every rank)."""
    out: Fragments = []
    offset = 0
    for numel in numels:
        part = -(-numel // world)
        ranks = np.arange(-(-numel // part) if part else 0)  # those with r * part < numel
        start = ranks * part  # `zero3_range` of every such rank
        stop = np.minimum(start + part, numel)
        out.append(np.stack([ranks, start, stop - start, np.full_like(ranks, offset)], axis=1))
        offset += part
    return out


def sub_groups(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """ZeRO-3 sub-groups (indices): parameters in order, a new sub-group once ``limit``
    values are reached, counting each parameter's ``sizes`` (DeepSpeed counts what one rank
    holds: ``ceil(numel / world)``)."""
    out: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if total >= limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return out


def zero_units(params: list[ModelParam], layout: ParallelLayout, stage: int) -> list[Unit]:
    """DeepSpeed ZeRO-1/2 (one flat partition of the group) and ZeRO-3 (each parameter split
    evenly, in sub-groups). With ``ep``: expert tensors hold the rank's local experts and are
    partitioned over the expert-data-parallel group (``dp / ep`` ranks, stride ``ep``), one
    copy of that unit per EP rank."""
    dp = layout.stage_size
    dense = [p for p in params if not (p.expert and layout.ep > 1)]
    experts = [ModelParam(p.name, (p.shape[0] // layout.ep, *p.shape[1:]), p.layer, True, p.tp)
               for p in params if p.expert and layout.ep > 1]
    out = []
    for label, group, size, stride, copies in (
            ("", dense, dp, 1, 1),
            (" experts", experts, dp // layout.ep, layout.ep, layout.ep)):
        if not group:
            continue
        ranks = cluster.group_ranks(layout, stage, size, stride)
        numels = [math.prod(p.shape) for p in group]
        if layout.kind != "zero3":
            out.append(_unit(f"stage {stage}{label}", stage, group, ranks, copies,
                             partition_fragments(numels, size)))
            continue
        parts = [-(-n // size) for n in numels]
        for i, idx in enumerate(sub_groups(parts, layout.sub_group_size)):
            sub = [group[j] for j in idx]
            out.append(_unit(f"stage {stage}{label} sub-group {i}", stage, sub, ranks, copies,
                             zero3_fragments([numels[j] for j in idx], size)))
    return out


def _unit(name: str, stage: int, params: list[ModelParam], ranks: np.ndarray, copies: int,
          fragments: Fragments) -> Unit:
    """One DeepSpeed optimizer unit over ``ranks``; copy ``c`` (expert groups) is on
    ``ranks + c``."""
    specs = [cluster.spec_of(p) for p in params]
    tables = [fragment_table(spec, frags) for spec, frags in zip(specs, fragments, strict=True)]
    return Unit(name, stage, [p.name for p in params], specs, tables, ranks, copies, 1)
