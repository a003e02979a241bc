"""A model on a cluster, described from metadata alone: the framework-free vocabulary of
`dmuon plan` (no process group, no tensors).

`ModelParam` is what a planner knows of a parameter (name, global shape, layer, whether it
is a routed-expert tensor, its tensor-parallel split). `ParallelLayout` names a sharding:

- ``ddp``: every rank holds every parameter (each rank its own replica);
- ``fsdp2``: DTensor ``Shard(0)`` over the data-parallel ranks (``torch.chunk`` rule);
- ``hsdp``: ``(Replicate, Shard(0))``, ``replicate`` groups of ``dp / replicate`` ranks;
- ``zero1``/``zero2``: DeepSpeed's flat partition of the concatenated parameters, one even
  range per rank; ``zero3``: every parameter split evenly (padded), in sub-groups of
  ``sub_group_size`` values, each sub-group its own optimizer step (run one after another);
- ``megatron``: tensor parallel (column-parallel rows, row-parallel columns), each
  data-parallel copy a replica, the exchange over the stage's TP x DP ranks;
- ``megatron_do``: the same with Megatron's distributed optimizer: each TP rank's parameters,
  in one buffer in reverse order, cut into one even range per data-parallel rank.

A `Unit` is one optimizer's exchange group with every rank's region table. The tables
themselves come from each framework's rule, next to its adapter
(``distributed_muon.integrations.*_regions``); ``distributed_muon.launch.layouts.units``
picks the rule for a layout.

Ranks are numbered as torchrun and Megatron number them: pipeline stage outermost, then
replicas, then shards, tensor (and expert) parallel innermost, so that the innermost groups
share a node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distributed_muon.layout import Block, Region, ShardLayout
from distributed_muon.params import MatrixSpec

LAYOUTS = ("ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3", "megatron", "megatron_do")
TP_SPLITS = (None, "col", "row")

# A region without its rank and replica: (row0, row1, col0, col1, start, stop, offset), the
# last seven `REGION_COLUMNS` (a flat range [start, stop) of a block of the [E*m, n] view,
# stored from offset in local storage).
Rect = tuple[int, int, int, int, int, int, int]


@dataclass(frozen=True)
class ModelParam:
    """One Muon parameter: ``shape`` its global shape (``[E, m, n]`` for a routed-expert
    tensor with ``expert=True``), ``layer`` its transformer layer, ``tp`` its Megatron split:
    ``"col"`` (rows cut over TP), ``"row"`` (columns cut) or None (whole on every TP rank);
    ``row_blocks`` its logical matrices' rows (`MatrixSpec`), as its param group sets them."""

    name: str
    shape: tuple[int, ...]
    layer: int
    expert: bool = False
    tp: str | None = None
    row_blocks: tuple[int, ...] | None = None  # e.g. one block per head (per-head NS)


@dataclass(frozen=True)
class ParallelLayout:
    """A parallel layout of ``world`` ranks (see the module docstring for the kinds)."""

    kind: str
    world: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    replicate: int = 1
    sub_group_size: int = 1_000_000_000  # DeepSpeed's default ZeRO-3 sub_group_size

    def check(self, params: Sequence[ModelParam]) -> None:
        """Raise ValueError (one line naming the fix) if this layout cannot hold ``params``."""
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout {self.kind!r} is not known: use one of {list(LAYOUTS)}")
        for label, value in (("world", self.world), ("tp", self.tp), ("ep", self.ep),
                             ("pp", self.pp), ("replicate", self.replicate),
                             ("sub_group_size", self.sub_group_size)):
            if value < 1:
                raise ValueError(f"{label}={value}: must be at least 1")
        if self.tp > 1 and not self.kind.startswith("megatron"):
            raise ValueError(f"tp={self.tp} needs the megatron layout (FSDP2, ZeRO and DDP here "
                             "are data parallel only)")
        if self.replicate > 1 and self.kind != "hsdp":
            raise ValueError(f"replicate={self.replicate} is for the hsdp layout")
        if self.world % (self.pp * self.tp):
            raise ValueError(f"world {self.world} is not a multiple of pp x tp = "
                             f"{self.pp * self.tp}")
        dp = self.world // (self.pp * self.tp)
        if self.kind == "hsdp" and dp % self.replicate:
            raise ValueError(f"data-parallel size {dp} is not a multiple of replicate="
                             f"{self.replicate}")
        shard = dp // self.replicate if self.kind == "hsdp" else dp
        if self.kind.startswith("megatron"):
            shard = self.world // self.pp
        if self.ep > 1 and shard % self.ep:
            raise ValueError(f"ep={self.ep} does not divide the {shard} ranks experts are "
                             "spread over (per stage, per replica)")
        layers = 1 + max((p.layer for p in params), default=0)
        if self.pp > layers:
            raise ValueError(f"pp={self.pp} stages for a model of {layers} layers")
        for p in params:
            if p.tp not in TP_SPLITS:
                raise ValueError(f"{p.name}: tp split {p.tp!r} is not one of {TP_SPLITS}")
            if p.expert and (len(p.shape) != 3 or p.shape[0] % self.ep):
                raise ValueError(f"{p.name}: {p.shape[0]} experts do not split over ep={self.ep}"
                                 if len(p.shape) == 3 else
                                 f"{p.name}: an expert tensor must be [E, m, n], got {p.shape}")
            if self.kind.startswith("megatron") and self.tp > 1 and p.tp is not None:
                dim = -2 if p.tp == "col" else -1
                if p.shape[dim] % self.tp:
                    raise ValueError(f"{p.name}: dimension {p.shape[dim]} of {p.shape} does not "
                                     f"split over tp={self.tp}")

    @property
    def stage_size(self) -> int:
        return self.world // self.pp


@dataclass
class Unit:
    """One optimizer's exchange group: ``specs``/``names`` its Muon parameters, ``tables[p]``
    parameter ``p``'s region table over the group (group ranks ``0..len(ranks)-1``),
    ``ranks[i]`` group rank ``i``'s global rank. Units of one ``stage`` run one after another;
    stages run at the same time. ``copies``: how many identical groups run side by side (one
    per expert-data-parallel group of DeepSpeed MoE; only the first is built), copy ``c`` on
    ranks ``ranks + c * copy_stride``."""

    name: str
    stage: int
    names: list[str]
    specs: list[MatrixSpec]
    tables: list[np.ndarray]
    ranks: np.ndarray
    copies: int = 1
    copy_stride: int = 0  # copy c runs on ranks + c * copy_stride
    layouts: dict[int, ShardLayout] = field(default_factory=dict, repr=False)

    def layout(self, rank: int = 0) -> ShardLayout:
        """The `ShardLayout` group rank ``rank`` builds (every rank's is the same but for
        ``rank``)."""
        if rank not in self.layouts:
            self.layouts[rank] = ShardLayout.from_tables(
                self.specs, ["k"] * len(self.specs), self.tables, len(self.ranks), rank)
        return self.layouts[rank]


def flat_rect(spec: MatrixSpec, start: int, stop: int, offset: int = 0) -> Rect:
    """A flat range ``[start, stop)`` of the whole ``[E*m, n]`` view of ``spec``'s parameter."""
    return (0, spec.experts * spec.rows, 0, spec.cols, start, stop, offset)


def region(rank: int, replica: int, rect: Rect) -> Region:
    """``rect`` held by ``rank`` as part of ``replica``, as the `Region` an adapter reports."""
    row0, row1, col0, col1, start, stop, offset = rect
    return Region(rank=rank, replica=replica, offset=offset,
                  block=Block(row0=row0, row1=row1, col0=col0, col1=col1, start=start, stop=stop))


def table(rows: Sequence[tuple[int, ...]]) -> np.ndarray:
    """``[len(rows), 9]`` int64 region table from ``(rank, replica, *rect)`` rows."""
    return np.array(rows, dtype=np.int64).reshape(-1, 9)


def spec_of(p: ModelParam) -> MatrixSpec:
    """``p``'s logical matrices, as its param group would give them."""
    return MatrixSpec.of(p.shape, p.row_blocks, name=p.name)


def numel(p: ModelParam) -> int:
    return math.prod(p.shape)


def stages(params: Sequence[ModelParam], pp: int) -> list[list[ModelParam]]:
    """Parameters per pipeline stage: layers split into ``pp`` even runs (the first stages
    take one more layer when they do not divide)."""
    layers = 1 + max((p.layer for p in params), default=0)
    bounds = [_chunk_even(layers, pp, s) for s in range(pp)]
    return [[p for p in params if lo <= p.layer < hi] for lo, hi in bounds]


def _chunk_even(size: int, parts: int, index: int) -> tuple[int, int]:
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def group_ranks(layout: ParallelLayout, stage: int, size: int | None = None,
                stride: int = 1) -> np.ndarray:
    """Global ranks of an exchange group of pipeline stage ``stage``: ``size`` ranks (default:
    the whole stage) ``stride`` apart from the stage's first."""
    base = stage * layout.stage_size
    return base + stride * np.arange(size if size is not None else layout.stage_size)
