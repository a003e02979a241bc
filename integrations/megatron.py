"""Megatron-core tensor-parallel (and expert-parallel) parameters.

Megatron keeps one shard of each tensor-parallel weight per TP rank, described by attributes on
the parameter: ``tensor_model_parallel``, ``partition_dim`` (0: a column-parallel weight holds
a block of rows of the full matrix; 1: a row-parallel weight holds a block of columns) and
``partition_stride`` (GLU's ``linear_fc1`` uses 2: a rank holds every TP-size-th chunk of rows).
Everything else (norms, biases of row-parallel layers, ...) is whole on every rank.

The exchange runs over the tensor-and-data-parallel group of the pipeline stage (context
parallel included). Replica ids name the set of ranks that together hold one copy: the TP group
for TP weights, the rank itself for parameters that are whole everywhere, so every logical
matrix is orthogonalized once across TP x DP.

Experts (module ``is_expert``, ``allreduce=False`` when expert parallelism is on): their shards
follow the module's own ``tp_group`` (Megatron's expert-TP group). Under expert parallelism the
i-th local expert differs on every EP rank, so the parameter is described as the stack of the
EP ranks' i-th experts, a ``[EP, m, n]`` tensor of EP matrices (the optimizer sees its global
shape as 3-D).

A fused ``linear_qkv`` weight stores, per query group, the group's query heads, then its key,
then its value rows; a TP shard holds whole query groups. Megatron's ``--muon-split-qkv``
orthogonalizes three matrices: all query rows, all key rows, all value rows. When a param group
asks for that split (``row_blocks`` = `MegatronSharding.qkv_row_blocks`), the adapter describes
the weight in the grouped row order ``[Q; K; V]`` (its regions say where each group's rows sit
in local storage), so the core sees three contiguous row blocks. Any other ``row_blocks`` keep
Megatron's storage order: per-head NS (`megatron_heads`) splits attention weights into one
block per head in that order.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from distributed_muon.integrations.megatron_heads import (
    HeadGeometry,
    geometry_row_blocks,
    head_geometry,
    per_head_blocks,
)
from distributed_muon.integrations.megatron_regions import block_rect, tp_rects
from torch import nn

from distributed_muon.cluster import region
from distributed_muon.layout import Region
from distributed_muon.params import MatrixSpec, muon_param_groups

SUPPORTED = ">=0.16.1,<0.20"  # megatron-core releases the tests run against (see docs/megatron.md)


@dataclass(frozen=True)
class _Info:
    """How one parameter is laid out: what the adapter needs for `regions` and `shape`."""

    name: str
    shape: tuple[int, ...]  # global shape the optimizer sees (3-D for EP-stacked experts)
    dim: int | None  # TP partition dim, None when whole on every rank of its TP group
    stride: int
    tp_size: int
    tp_rank: int
    replica: int
    ep_size: int  # > 1: stacked over the EP ranks, this rank's slot is ep_rank
    ep_rank: int
    qkv: tuple[int, ...] | None  # rows of each section (q, [gate,] k, v) of one query group
    head: HeadGeometry | None  # an attention weight's heads (per-head NS)


def _global_ranks(group: dist.ProcessGroup | None) -> list[int]:
    if group is None:
        return [dist.get_rank()]
    return dist.get_process_group_ranks(group)


def _modules(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    out = []
    for i, chunk in enumerate(chunks):
        prefix = f"{i}." if len(chunks) > 1 else ""
        out.extend((prefix + name, mod) for name, mod in chunk.named_modules())
    return out


def _parallel_state():
    try:
        from megatron.core import parallel_state
    except ImportError as err:  # pragma: no cover - the guard the error message names
        raise ImportError(
            "MegatronSharding needs megatron-core: pip install 'distributed-muon[megatron]'"
        ) from err
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron.core.parallel_state is not initialized: call "
            "parallel_state.initialize_model_parallel(...) before building the optimizer, or "
            "pass group=, tp_group= and expert_group= to MegatronSharding"
        )
    return parallel_state


class MegatronSharding:
    """Adapter for the parameters of Megatron-core model chunks of one pipeline stage.

    ``model``: the stage's model (or list of virtual-pipeline chunks); parameter names give the
    QKV weights and experts, modules give each layer's TP group. Groups default to
    ``megatron.core.parallel_state``'s: ``group`` the tensor-and-data-parallel group (with
    context parallel), ``tp_group`` the tensor-parallel group (for layers without their own
    ``tp_group``), ``expert_group`` the expert-model-parallel group.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        *,
        group: dist.ProcessGroup | None = None,
        tp_group: dist.ProcessGroup | None = None,
        expert_group: dist.ProcessGroup | None = None,
        expert_tp_ep_group: dist.ProcessGroup | None = None,
    ) -> None:
        if group is None or tp_group is None:
            ps = _parallel_state()
            if group is None:
                group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
            if tp_group is None:
                tp_group = ps.get_tensor_model_parallel_group()
            if expert_group is None and expert_tp_ep_group is None:
                expert_group = ps.get_expert_model_parallel_group()
                expert_tp_ep_group = ps.get_expert_tensor_and_model_parallel_group()
        self.group = group
        self.rank = dist.get_rank(group)
        members = set(_global_ranks(group))
        named = (("tp_group", tp_group), ("expert_group", expert_group),
                 ("expert_tp_ep_group", expert_tp_ep_group))
        for label, g in named:
            if g is not None and not set(_global_ranks(g)) <= members:
                raise ValueError(
                    f"{label} {_global_ranks(g)} is not inside the exchange group "
                    f"{sorted(members)}: pass group= the tensor-and-data-parallel group of the "
                    "pipeline stage"
                )
        if (expert_group is None) != (expert_tp_ep_group is None):
            raise ValueError("pass both expert_group= (expert model parallel) and "
                             "expert_tp_ep_group= (expert tensor x model parallel), or neither")
        self._tp_group = tp_group
        self._expert_group = expert_group
        self._expert_tp_ep_group = expert_tp_ep_group
        self.chunks = [model] if isinstance(model, nn.Module) else list(model)
        self._info: dict[int, _Info] = {}
        for mod_name, mod in _modules(model):
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) not in self._info:
                    name = f"{mod_name}.{pname}" if mod_name else pname
                    self._info[id(p)] = self._describe(name, p, mod)

    # ------------------------------------------------------------ description

    def _describe(self, name: str, p: torch.Tensor, mod: nn.Module) -> _Info:
        is_expert = bool(getattr(mod, "is_expert", False)) or getattr(p, "allreduce", True) is False
        tp_group = getattr(mod, "tp_group", None)
        if tp_group is None:
            tp_group = self._tp_group
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        dim = getattr(p, "partition_dim", -1) if sharded else None
        stride = int(getattr(p, "partition_stride", 1)) if sharded else 1
        local = tuple(p.shape)
        # Megatron sets the TP attributes inside its weight initializers, which only run with
        # perform_initialization=True: a TP layer's weight without them would pass for a whole
        # (replicated) matrix and be silently wrong.
        split = (getattr(mod, "output_size_per_partition", None),
                 getattr(mod, "input_size_per_partition", None))
        full = (getattr(mod, "output_size", None), getattr(mod, "input_size", None))
        if (not sharded and name.rsplit(".", 1)[-1] == "weight" and p.ndim == 2
                and any(s is not None and s != f for s, f in zip(split, full, strict=True))):
            raise ValueError(
                f"{name}: the weight of a tensor-parallel layer has no tensor_model_parallel "
                "attribute (Megatron sets it only when config.perform_initialization=True): "
                "build the model with perform_initialization=True, or set the attributes with "
                "megatron.core.tensor_parallel.set_tensor_model_parallel_attributes"
            )
        if sharded and (dim not in (0, 1) or (dim == 1 and p.ndim != 2)):
            raise ValueError(
                f"{name}: tensor-parallel partition_dim={dim} of a parameter of local shape "
                f"{local} is not supported: MegatronSharding handles partition_dim 0 "
                "(column-parallel) and 1 (row-parallel 2-D weights); put it in an AdamW group "
                "(use_muon=False) or file an issue"
            )
        if sharded and dim == 1 and stride != 1:
            raise ValueError(
                f"{name}: partition_stride={stride} on partition_dim 1 is not supported (the "
                "local columns would not be contiguous blocks): use stride 1"
            )
        if sharded and local[dim] % stride:
            raise ValueError(f"{name}: local size {local[dim]} along partition_dim {dim} is not "
                             f"a multiple of partition_stride {stride}")
        tp_ranks = _global_ranks(tp_group) if sharded else [dist.get_rank()]
        tp_size, tp_rank = len(tp_ranks), tp_ranks.index(dist.get_rank())
        shape = list(local)
        if sharded:
            shape[dim] *= tp_size
        ep_size, ep_rank = 1, 0
        owners = tp_ranks  # the ranks that together hold one copy of the parameter
        if is_expert and self._expert_group is not None:
            ep_ranks = _global_ranks(self._expert_group)
            if len(ep_ranks) > 1:
                ep_size, ep_rank = len(ep_ranks), ep_ranks.index(dist.get_rank())
                if p.ndim != 2:
                    raise ValueError(
                        f"{name}: expert parameter of local shape {local} under expert "
                        "parallelism: MegatronSharding handles 2-D per-expert weights "
                        "(SequentialMLP, TEGroupedMLP weightN); put it in an AdamW group"
                    )
                shape = [ep_size, *shape]
                # One copy: the expert-TP x EP ranks of this one (only the EP ranks when the
                # parameter is whole within expert TP, each expert-TP rank holding a copy).
                owners = _global_ranks(self._expert_tp_ep_group) if sharded else ep_ranks
        qkv = None
        if name.endswith("linear_qkv.weight") and p.ndim == 2:
            qkv = _qkv_rows(name, mod, shape[-2])
            if qkv is not None and sharded and (dim != 0 or stride != 1):
                raise ValueError(f"{name}: a fused QKV weight must be column-parallel with stride "
                                 f"1 (got partition_dim={dim}, partition_stride={stride})")
        head = head_geometry(name, mod, qkv) if p.ndim == 2 and ep_size == 1 else None
        return _Info(name=name, shape=tuple(shape), dim=dim, stride=stride, tp_size=tp_size,
                     tp_rank=tp_rank, replica=min(owners), ep_size=ep_size, ep_rank=ep_rank,
                     qkv=qkv, head=head)

    def info(self, param: torch.Tensor) -> _Info:
        try:
            return self._info[id(param)]
        except KeyError:
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} is not a parameter of the model "
                "given to MegatronSharding: build the adapter from the same model (all its "
                "virtual-pipeline chunks) the optimizer's param groups come from"
            ) from None

    def qkv_row_blocks(self, param: torch.Tensor) -> tuple[int, ...] | None:
        """``row_blocks`` that split a fused QKV weight as ``--muon-split-qkv`` does (all query
        rows, [all gate rows,] all key rows, all value rows), or None for other parameters."""
        info = self.info(param)
        if info.qkv is None:
            return None
        groups = info.shape[-2] // sum(info.qkv)
        return tuple(groups * r for r in info.qkv)

    def row_blocks(self, param: torch.Tensor, *, heads: dict[int, tuple[int, ...]],
                   named: dict[str, tuple[int, ...]], split_qkv: bool) -> tuple[int, ...] | None:
        """A Muon weight's ``row_blocks`` under ``--optimizer dmuon``, finest first: its heads
        (``heads``, `megatron_heads.per_head_blocks`), else the blocks of the first ``named``
        glob (``fnmatch``) its name matches (fused weights Megatron does not know, as in a
        plain torch model inside Megatron's DDP), else the Q, K, V split of a ``linear_qkv``
        (``split_qkv``), else None (the whole matrix)."""
        name = self.info(param).name
        blocks = heads.get(id(param)) or next(
            (b for pattern, b in named.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if blocks is not None:
            return tuple(blocks)
        return self.qkv_row_blocks(param) if split_qkv else None

    def head_row_blocks(self, param: torch.Tensor) -> tuple[int, ...] | None:
        """``row_blocks`` of per-head NS for a Megatron attention weight (fused QKV, MLA query
        and key-value up-projections): one block per head of the full matrix, in storage
        order; None for other parameters. ValueError when its rows are not the config's
        heads."""
        info = self.info(param)
        if info.head is None:
            return None
        return geometry_row_blocks(info.name, info.shape[-2], info.head)

    # ------------------------------------------------------------ the Sharding protocol

    def shape(self, param: torch.Tensor) -> torch.Size:
        return torch.Size(self.info(param).shape)

    def local(self, param: torch.Tensor) -> torch.Tensor:
        return param

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        return param.grad

    def regions(self, param: torch.Tensor, spec: MatrixSpec) -> list[Region]:
        info = self.info(param)
        full = info.shape[1:] if info.ep_size > 1 else info.shape
        if info.dim is None and len(full) > 2:  # whole: the core's [E*m, n] view of it
            full = (math.prod(full[:-1]), full[-1])
        rows = full[0] if full else 1
        cols = math.prod(full[1:])
        # The TP rule `dmuon plan` uses too, in the parameter's own [rows, cols].
        rects = tp_rects(rows, cols, info.dim, info.stride, info.tp_size, info.tp_rank)
        if info.qkv is not None and spec.row_blocks == self.qkv_row_blocks(param):
            rects = _grouped(rects, info.qkv, rows, cols)
        base = info.ep_rank * rows
        return [region(self.rank, info.replica, block_rect(rect, base))
                for rect in rects if rect[1] > rect[0]]


def _qkv_rows(name: str, mod: nn.Module, rows: int) -> tuple[int, ...] | None:
    """Rows of each section of one query group: (q, k, v), or (q, gate, k, v) with
    ``attention_output_gate`` (Megatron stores the gate after the queries)."""
    config = getattr(mod, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    groups = getattr(config, "num_query_groups", None) or heads
    channels = getattr(config, "kv_channels", None) or config.hidden_size // heads
    q = heads // groups * channels
    per_group = (q, q, channels, channels) if getattr(config, "attention_output_gate", False) \
        else (q, channels, channels)
    if heads % groups or groups * sum(per_group) != rows:
        raise ValueError(
            f"{name}: {rows} rows do not match the config's {heads} heads, {groups} query "
            f"groups and kv_channels={channels}: MegatronSharding cannot split this QKV weight"
        )
    return per_group


def _grouped(rects, qkv: tuple[int, ...], rows: int, cols: int):
    """Map row rectangles of a fused QKV weight from storage order (per group: its sections,
    e.g. q, k, v rows) to the grouped order [all q; all k; all v], cutting at group and
    section boundaries."""
    per_group = sum(qkv)
    groups = rows // per_group
    ends = [sum(qkv[:i + 1]) for i in range(len(qkv))]  # section ends within a group
    starts = [groups * (end - size) for end, size in zip(ends, qkv, strict=True)]
    out = []
    for r0, r1, c0, c1, offset in rects:
        if (c0, c1) != (0, cols):
            raise ValueError("a fused QKV weight must be sharded by rows (column-parallel)")
        r = r0
        while r < r1:
            g, within = divmod(r, per_group)
            section = next(i for i, end in enumerate(ends) if within < end)
            sec_start = ends[section] - qkv[section]
            n = min(r1 - r, ends[section] - within)
            v0 = starts[section] + g * qkv[section] + within - sec_start
            out.append((v0, v0 + n, 0, cols, offset + (r - r0) * cols))
            r += n
    return out


def megatron_param_groups(
    model: nn.Module | Sequence[nn.Module],
    sharding: MegatronSharding,
    *,
    split_qkv: bool = True,
    per_head: bool = False,
    adamw: Iterable[str] = (),
    row_blocks: dict[str, Sequence[int]] | None = None,
    adamw_options: dict[str, Any] | None = None,
    **muon_options: Any,
) -> list[dict[str, Any]]:
    """Param groups the way Megatron's Muon splits a model. A model that marks its word
    embedding and output layer (``is_embedding_or_output_parameter``, as Megatron's language
    models do) gets Megatron's rule: 2-D tensors without the mark -> Muon (a learned position
    embedding and the MoE router included), the rest -> AdamW. An unmarked model: 2-D and
    larger weights (per-expert weights included) -> Muon; embeddings and heads (by name, see
    `distributed_muon.params.is_embedding_or_head_name`), norms and biases -> AdamW. Names
    matching an ``adamw`` glob -> AdamW either way. ``split_qkv`` (Megatron's
    ``--muon-split-qkv``, on by default there too) orthogonalizes Q, K and V of every fused
    ``linear_qkv`` weight apart. ``per_head`` (``--dmuon-per-head``) orthogonalizes every head
    of the attention weights apart instead (`megatron_heads`). ``row_blocks`` (name glob ->
    blocks) splits fused weights Megatron does not know (`MegatronSharding.row_blocks`)."""
    from distributed_muon.integrations.megatron_parity import marks_embeddings, uses_muon

    chunks = [model] if isinstance(model, nn.Module) else list(model)
    if len(chunks) != 1:
        raise ValueError("megatron_param_groups takes one model chunk at a time; concatenate "
                         "the groups of each chunk (the sharding covers all of them)")
    named = [(n, p) for n, p in chunks[0].named_parameters() if p.requires_grad]
    marked, adamw = marks_embeddings(p for _, p in named), tuple(adamw)
    name_of = {id(p): n for n, p in named}
    heads = per_head_blocks(chunks, sharding, lambda p: uses_muon(
        p, name_of[id(p)], tuple(sharding.shape(p)), marked=marked, adamw=adamw)) \
        if per_head else {}

    named_blocks = dict(row_blocks or {})

    def blocks_of(p: torch.Tensor) -> tuple[int, ...] | None:
        return sharding.row_blocks(p, heads=heads, named=named_blocks, split_qkv=split_qkv)

    if marked:
        return _marked_groups(named, sharding, blocks_of, adamw, adamw_options or {},
                              muon_options, uses_muon)
    blocks = {name: b for name, p in named if (b := blocks_of(p)) is not None}
    return muon_param_groups(chunks[0], adamw=list(adamw), row_blocks=blocks,
                             adamw_options=adamw_options, **muon_options)


def _marked_groups(named, sharding, row_blocks, adamw, adamw_options, muon_options, uses_muon):
    """Megatron's rule (see `megatron_param_groups`): Muon groups by row blocks, then AdamW."""
    groups: dict[Any, dict[str, Any]] = {}
    for name, p in named:
        if uses_muon(p, name, tuple(sharding.shape(p)), marked=True, adamw=adamw):
            blocks = row_blocks(p)
            key = ("muon", blocks)
            options = {"use_muon": True, "row_blocks": blocks, **muon_options}
        else:
            key, options = ("adamw",), {"use_muon": False, **adamw_options}
        group = groups.setdefault(key, {"params": [], "param_names": [], **options})
        group["params"].append(p)
        group["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: not g["use_muon"])


def recognize(params, process_group):
    """Megatron parameters need the model (names, layers' TP groups): refuse to guess.

    Claims nothing unless a parameter carries Megatron's ``tensor_model_parallel`` attribute,
    and then raises, naming the fix, rather than letting the replicated fallback treat TP
    shards as whole copies.
    """
    if any(getattr(p, "tensor_model_parallel", False) for p in params):
        raise ValueError(
            "these are Megatron tensor-parallel parameters: pass "
            "sharding=MegatronSharding(model) (from distributed_muon.integrations.megatron) "
            "to DistributedMuon"
        )
    return None
