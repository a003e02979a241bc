"""A model on a cluster, described from metadata alone: the region tables every rank would
report to `ShardLayout.gather`, for any world size, with no process group and no tensors.

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
  in one buffer in reverse order (one bucket: no ``--overlap-grad-reduce``), cut into one even
  range per data-parallel rank; one replica over TP x DP (a parameter without TP split: one
  per TP rank).

Expert parallelism (``ep``): FSDP2/HSDP as torchtitan shards routed experts (experts split
over the ``ep`` innermost ranks, then ``Shard(0)`` over experts, or ``Shard(1)`` over rows
when a rank group has fewer local experts than ranks); Megatron with expert-TP 1 (each
expert whole on one EP rank, one replica per expert-data-parallel copy); ZeRO with
DeepSpeed's MoE groups (local experts partitioned over the expert-data-parallel group).
Pipeline parallelism (``pp``): layers split evenly over stages; each stage has its own
optimizer and exchange group, stages run at the same time.

Ranks are numbered as torchrun and Megatron number them: pipeline stage outermost, then
replicas, then shards, tensor (and expert) parallel innermost, so that the innermost groups
share a node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from distributed_muon.layout import ShardLayout
from distributed_muon.params import MatrixSpec

LAYOUTS = ("ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3", "megatron", "megatron_do")
TP_SPLITS = (None, "col", "row")


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


def chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``torch.chunk`` splits ``size`` in ``parts``
    (FSDP2's ``Shard`` rule; `distributed_muon.integrations.fsdp2` uses it too)."""
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def _rows(rows: list[tuple[int, ...]]) -> np.ndarray:
    return np.array(rows, dtype=np.int64).reshape(-1, 9)


def _flat(rank: int, replica: int, spec: MatrixSpec, start: int, stop: int,
          offset: int = 0) -> tuple[int, ...]:
    return (rank, replica, 0, spec.experts * spec.rows, 0, spec.cols, start, stop, offset)


def _spec(p: ModelParam) -> MatrixSpec:
    return MatrixSpec.of(p.shape, p.row_blocks, name=p.name)


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


def units(params: Sequence[ModelParam], layout: ParallelLayout) -> list[Unit]:
    """The exchange groups ``layout`` gives ``params``, with every rank's regions."""
    layout.check(params)
    build: Callable[[list[ModelParam], ParallelLayout, int], list[Unit]] = {
        "ddp": _data_parallel, "fsdp2": _data_parallel, "hsdp": _data_parallel,
        "zero1": _zero, "zero2": _zero, "zero3": _zero, "megatron": _megatron,
        "megatron_do": _megatron,
    }[layout.kind]
    out = []
    for s, stage_params in enumerate(stages(params, layout.pp)):
        out.extend(build(stage_params, layout, s))
    return out


def _group(layout: ParallelLayout, stage: int, size: int | None = None,
           stride: int = 1) -> np.ndarray:
    base = stage * layout.stage_size
    return base + stride * np.arange(size if size is not None else layout.stage_size)


def _data_parallel(params: list[ModelParam], layout: ParallelLayout, stage: int) -> list[Unit]:
    """DDP, FSDP2 and HSDP (torchtitan's expert sharding under ``ep``)."""
    world = layout.stage_size
    replicas = layout.replicate if layout.kind == "hsdp" else 1
    shard = world // replicas
    specs = [_spec(p) for p in params]
    tables = []
    done: dict[tuple, np.ndarray] = {}  # parameters of one shape share one (read-only) table
    for p, spec in zip(params, specs, strict=True):
        key = (spec, p.expert)
        if key in done:
            tables.append(done[key])
            continue
        rows = []
        for r in range(world):
            replica, idx = divmod(r, shard)
            if layout.kind == "ddp":
                rows.append(_flat(r, r, spec, 0, spec.experts * spec.rows * spec.cols))
            elif p.expert and layout.ep > 1:
                rows.extend(_ep_expert_rows(r, replica, idx, spec, layout.ep, shard))
            else:
                lo, hi = chunk(spec.shape[0], shard, idx)
                inner = spec.experts * spec.rows * spec.cols // spec.shape[0]
                if hi > lo:
                    rows.append(_flat(r, replica, spec, lo * inner, hi * inner))
        done[key] = _rows(rows)
        tables.append(done[key])
    return [Unit(f"stage {stage}", stage, [p.name for p in params], specs, tables,
                 _group(layout, stage))]


def _ep_expert_rows(rank: int, replica: int, idx: int, spec: MatrixSpec, ep: int,
                    shard: int) -> list[tuple[int, ...]]:
    """torchtitan: experts split over the ``ep`` innermost ranks of the shard group, then
    FSDP over the other ``shard / ep`` ranks: ``Shard(0)`` over the local experts, or
    ``Shard(1)`` (rows of every local expert) when there are fewer local experts than ranks."""
    e_rank, f_rank = idx % ep, idx // ep
    fsdp = shard // ep
    local = spec.experts // ep
    first = e_rank * local
    m, n = spec.rows, spec.cols
    if local >= fsdp:
        lo, hi = chunk(local, fsdp, f_rank)
        if hi <= lo:
            return []
        return [_flat(rank, replica, spec, (first + lo) * m * n, (first + hi) * m * n)]
    lo, hi = chunk(m, fsdp, f_rank)
    if hi <= lo:
        return []
    per = (hi - lo) * n
    return [(rank, replica, (first + j) * m + lo, (first + j) * m + hi, 0, n, 0, per, j * per)
            for j in range(local)]


def _zero(params: list[ModelParam], layout: ParallelLayout, stage: int) -> list[Unit]:
    """DeepSpeed ZeRO-1/2 (one flat partition of the group) and ZeRO-3 (each parameter split
    evenly, in sub-groups). With ``ep``: expert tensors hold the rank's local experts and are
    partitioned over the expert-data-parallel group (``dp / ep`` ranks, stride ``ep``)."""
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
        ranks = _group(layout, stage, size, stride)
        if layout.kind == "zero3":
            for i, sub in enumerate(_sub_groups(group, layout.sub_group_size)):
                out.append(_zero_unit(f"stage {stage}{label} sub-group {i}", stage, sub, ranks,
                                      copies, even=True))
        else:
            out.append(_zero_unit(f"stage {stage}{label}", stage, group, ranks, copies,
                                  even=False))
    return out


def _sub_groups(params: list[ModelParam], limit: int) -> list[list[ModelParam]]:
    """DeepSpeed ZeRO-3 sub-groups: parameters in order, a new sub-group once ``limit``
    values are reached."""
    out: list[list[ModelParam]] = [[]]
    total = 0
    for p in params:
        if total >= limit:
            out.append([])
            total = 0
        out[-1].append(p)
        total += math.prod(p.shape)
    return out


def _zero_unit(name: str, stage: int, params: list[ModelParam], ranks: np.ndarray,
               copies: int, *, even: bool) -> Unit:
    """One DeepSpeed optimizer unit over ``ranks``; copy ``c`` (expert groups) is on
    ``ranks + c``."""
    world = len(ranks)
    specs = [_spec(p) for p in params]
    numels = [math.prod(p.shape) for p in params]
    tables = []
    if even:  # ZeRO-3: parameter padded to world * part, rank r holds [r*part, (r+1)*part)
        for spec, numel in zip(specs, numels, strict=True):
            part = -(-numel // world)
            tables.append(_rows([_flat(r, 0, spec, r * part, min((r + 1) * part, numel))
                                 for r in range(world) if r * part < numel]))
    else:  # ZeRO-1/2: the concatenation, padded, cut into one even range per rank
        part = -(-sum(numels) // world)
        base = 0
        for spec, numel in zip(specs, numels, strict=True):
            rows = []
            for r in range(base // part, min(world, -(-(base + numel) // part))):
                lo, hi = max(r * part, base), min((r + 1) * part, base + numel)
                if lo < hi:
                    rows.append(_flat(r, 0, spec, lo - base, hi - base))
            tables.append(_rows(rows))
            base += numel
    return Unit(name, stage, [p.name for p in params], specs, tables, ranks, copies, 1)


def _megatron(params: list[ModelParam], layout: ParallelLayout, stage: int) -> list[Unit]:
    """Megatron TP (each data-parallel copy a replica, named by its lowest rank) and EP with
    expert-TP 1: expert ``j`` of every EP rank is one ``[ep, m, n]`` parameter (as
    `MegatronSharding` sees SequentialMLP / TEGroupedMLP weights), EP rank ``e`` holding rows
    ``[e*m, (e+1)*m)``."""
    world, tp, ep = layout.stage_size, layout.tp, layout.ep
    specs, names, tables, experts, split = [], [], [], [], []
    for p in params:
        if p.expert:
            m, n = p.shape[1:]
            local = p.shape[0] // ep
            for j in range(local):
                spec = MatrixSpec.of((ep, m, n), name=p.name)
                rows = []
                for r in range(world):
                    e_rank, edp = r % ep, r // ep
                    rows.append((r, edp * ep, e_rank * m, (e_rank + 1) * m, 0, n, 0, m * n, 0))
                specs.append(spec)
                names.append(f"{p.name}[{j}::{local}]")
                tables.append(_rows(rows))
                experts.append(True)
                split.append(True)
            continue
        spec = _spec(p)
        rows_, cols = spec.experts * spec.rows, spec.cols
        rows = []
        for r in range(world):
            t_rank = r % tp
            if p.tp is None or tp == 1:
                rows.append(_flat(r, r, spec, 0, rows_ * cols))  # a copy per rank
                continue
            replica = r - t_rank  # the lowest rank of this TP group
            if p.tp == "col":
                h = rows_ // tp
                rows.append((r, replica, t_rank * h, (t_rank + 1) * h, 0, cols, 0, h * cols, 0))
            else:
                w = cols // tp
                rows.append((r, replica, 0, rows_, t_rank * w, (t_rank + 1) * w, 0, rows_ * w, 0))
        specs.append(spec)
        names.append(p.name)
        tables.append(_rows(rows))
        experts.append(False)
        split.append(p.tp is not None and tp > 1)
    if layout.kind == "megatron_do":
        tables = _distributed_optimizer(tables, experts, split, world, tp, ep)
    return [Unit(f"stage {stage}", stage, names, specs, tables, _group(layout, stage))]


def _distributed_optimizer(tables: list[np.ndarray], experts: list[bool], split: list[bool],
                           world: int, tp: int, ep: int) -> list[np.ndarray]:
    """Cut each rank's TP-local region (one per rank and parameter) to its distributed-optimizer
    range: the dense parameters' buffer over the DP ranks (``rank // tp``), the experts' over the
    expert-DP ranks (``rank // ep``), parameters in reverse order, one even range per rank."""
    out = list(tables)
    for is_expert, size, stride in ((False, world // tp, tp), (True, world // ep, ep)):
        group = [i for i, e in enumerate(experts) if e == is_expert]
        numels = {i: int(tables[i][0, 7] - tables[i][0, 6]) for i in group}
        part = -(-sum(numels.values()) // size) if group else 0
        base = 0
        for i in reversed(group):
            t = tables[i].copy()
            dp = t[:, 0] // stride
            lo = np.maximum(base, dp * part) - base
            hi = np.minimum(base + numels[i], (dp + 1) * part) - base
            t[:, 6], t[:, 7], t[:, 8] = lo, hi, 0
            # One copy over TP x DP; a parameter whole on every TP rank: a copy per TP rank.
            t[:, 1] = 0 if split[i] else t[:, 0] % tp
            out[i] = t[lo < hi]
            base += numels[i]
    return out
