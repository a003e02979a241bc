"""DeepSpeed: ``{"optimizer": {"type": "DistributedMuon", "params": {...}}}`` in the JSON config.

Importing this module registers `DeepSpeedMuon` as ``torch.optim.DistributedMuon`` (DeepSpeed
looks unknown optimizer types up in ``torch.optim``) and as a ZeRO-supported optimizer.

DeepSpeed never shows its inner optimizer a matrix. Under ZeRO-1/2 and ``BF16_Optimizer`` each
param group becomes one flat fp32 partition, under ZeRO-3 each sub-group does, and ``step()``
is called per group (ZeRO-1/2), per sub-group (ZeRO-3) or once (``BF16_Optimizer``) with the
current partitions in ``param_groups``. Each such flat tensor is a *unit*: at its first step
the model parameters it holds fragments of become a core `DistributedMuon` over the unit's
data-parallel group (the expert-data-parallel group for MoE groups), whose `FlatSharding` maps
every parameter to its fragment. Without ZeRO (stage 0, fp32) a unit is a whole param group of
replicated parameters. Groups are split into Muon and AdamW groups at construction, so a flat
partition is all Muon (state: ``momentum_buffer``) or all AdamW (``exp_avg``, ``exp_avg_sq``,
``step``), shaped like the partition as DeepSpeed's checkpoints expect.

Every read of DeepSpeed's private structures (partition maps, process groups, the call stack
where DeepSpeed passes nothing) is in `deepspeed_internals`; the checkpoint fragment map is
built in `deepspeed_checkpoint`, next to the converter that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from distributed_muon.integrations.deepspeed_checkpoint import FRAGMENTS_KEY, fragment_map
from distributed_muon.integrations.deepspeed_internals import (
    Partition,
    calling_engine,
    flats_of_group,
    is_partitioned,
    is_state_setup_step,
    logical_shape,
    partition,
    write_low_precision,
    zero0_group,
)
from distributed_muon.integrations.replicated import ReplicatedSharding
from distributed_muon.integrations.zero_regions import fragment_rect
from torch.optim import Optimizer

from distributed_muon.cluster import region
from distributed_muon.dtypes import DTypeLike
from distributed_muon.heads import attention_row_blocks, refine
from distributed_muon.layout import Region
from distributed_muon.optimizer import DistributedMuon, run_closure
from distributed_muon.options import (
    GROUP_OPTIONS,
    OPTIMIZER_WIDE,
    OPTIONS,
    check_group,
    check_optimizer_wide,
    group_defaults,
    take_renamed_option,
    unknown_options_error,
)
from distributed_muon.params import MatrixSpec, default_use_muon
from distributed_muon.qk_clip import MaxLogitRecorder, QKClip, scale_rows
from distributed_muon.sharding import Sharding

# Group keys DeepSpeed adds or reads (MoE); everything else in a group is a DistributedMuon option.
_DEEPSPEED_KEYS = ("moe", "name")
# The optimizer-wide options the JSON config can set: not process groups or shardings (no JSON
# holds one; DeepSpeed's own are used), nor the links this adapter sets itself, nor diagnostics
# (not wired per flat partition yet).
NOT_IN_JSON = ("process_group", "sharding", "group_overrides", "external_state",
               "diagnostics_every")
# JSON keys spelled otherwise than the option: DeepSpeed's own per_head_muon.
JSON_WIDE_NAMES = {"per_head": "per_head_muon"}
_OPTIMIZER_WIDE = (*(JSON_WIDE_NAMES.get(n, n) for n in OPTIMIZER_WIDE if n not in NOT_IN_JSON),
                   "per_head_muon")
# JSON names -> DistributedMuon options. As in DeepSpeed's own Muon, "betas" and "eps" are the
# Adam part's (HF's Trainer fills them from adam_beta1/2 and adam_epsilon when "auto"), so
# Newton-Schulz's eps is "ns_eps" here.
JSON_NAMES = {"betas": "adamw_betas", "eps": "adamw_eps", "ns_eps": "eps"}


class FlatSharding:
    """The `Sharding` of one flat tensor (a ZeRO partition) whose `Partition` says which
    fragment of which parameter it holds (``fragments[p] = (global start, length, offset)``)."""

    def __init__(self, flat: torch.Tensor, part: Partition) -> None:
        self.flat, self.fragments, self.shapes, self.group = (
            flat, part.fragments, part.shapes, part.group)
        self.rank = dist.get_rank(self.group) if self.group is not None else 0

    def shape(self, param: torch.Tensor) -> torch.Size:
        return self.shapes[param]

    def local(self, param: torch.Tensor) -> torch.Tensor:
        _, length, offset = self.fragments.get(param, (0, 0, 0))
        return self.flat.narrow(0, offset, length)

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        if self.flat.grad is None:
            return None
        _, length, offset = self.fragments.get(param, (0, 0, 0))
        return self.flat.grad.narrow(0, offset, length)

    def regions(self, param: torch.Tensor, spec: MatrixSpec) -> list[Region]:
        if param not in self.fragments:
            return []
        return [region(self.rank, 0, fragment_rect(spec, self.fragments[param]))]


@dataclass
class _Unit:
    """One flat partition (or, without ZeRO, one param group) and the optimizer that steps it."""

    optimizer: DistributedMuon
    flat: torch.Tensor | None  # None: the unit's parameters are the group's own (ZeRO-0)
    sharding: Sharding


class DeepSpeedMuon(Optimizer):
    """`DistributedMuon` as DeepSpeed's inner optimizer; built by DeepSpeed from the JSON config.

    ``params`` are the model parameters (or groups) DeepSpeed passes; options are
    `DistributedMuon`'s, dtypes may be strings (``"bf16"``, ``"fp32"``), except that, as in
    DeepSpeed's own Muon, ``betas`` and ``eps`` are the AdamW part's (``adamw_betas``,
    ``adamw_eps``) and Newton-Schulz's eps is ``ns_eps`` (`JSON_NAMES`). Parameters are named from
    the calling DeepSpeed engine's module when the groups carry no names, so embeddings and
    output heads go to AdamW by the core's name rule. Every option is checked here, before the
    first step.

    ``group_params[i]`` and ``group_names[i]`` are the model parameters of param group ``i``
    and their names (DeepSpeed replaces a group's ``params`` by its flat partitions).

    ``qk_clip_tau`` turns on QK-clip for the layers given to `register_qk` (on
    ``engine.basic_optimizer``). DeepSpeed steps and copies back one flat partition at a time,
    so the clip factors are computed (one MAX all-reduce over data parallel) at the first
    partition's step of a training step, and each partition scales its own fragments of the
    clipped rows right after its update.

    ``ns_cost`` (the path of a measured NS cost table, see `distributed_muon.cost`) makes each
    partition's owner plan balance measured seconds instead of NS FLOPs.
    ``exchange_chunks`` pipelines each partition's exchange with its Newton-Schulz
    (`DistributedMuon`).

    ``per_head_muon`` (DeepSpeed's own key, same meaning): attention Q, K, V (separate or
    fused) and latent up-projections of the engine's model are orthogonalized per head
    (`distributed_muon.heads`); their groups are split by row blocks.
    """

    def __init__(self, params: Iterable[Any], comm_dtype: DTypeLike = "bf16",
                 owner_strategy: str = "lpt", qk_clip_tau: float | None = None,
                 ns_cost: str | None = None, exchange_chunks: int = 1,
                 per_head_muon: bool = False, **options: Any) -> None:
        owner_strategy = take_renamed_option(options, "plan", owner_strategy,
                                             where="DeepSpeed JSON", category=FutureWarning)
        options = json_options(options)
        unknown = set(options) - set(GROUP_OPTIONS)
        if unknown:  # the JSON takes no process_group or sharding: list only what it takes
            raise unknown_options_error(unknown, wide=_OPTIMIZER_WIDE)
        defaults = group_defaults(**options)
        # Checked here, before DeepSpeed's first step builds the units that use them.
        wide = check_optimizer_wide({"comm_dtype": comm_dtype, "ns_cost": ns_cost,
                                     "exchange_chunks": exchange_chunks})
        self.comm_dtype = wide["comm_dtype"]
        self.owner_strategy = OPTIONS["owner_strategy"].check("owner_strategy", owner_strategy)
        self.ns_cost, self.exchange_chunks = wide["ns_cost"], wide["exchange_chunks"]
        engine = calling_engine()
        if engine is not None:
            _refuse_unsupported(engine)
        names = {p: n for n, p in engine.module.named_parameters()} if engine else None
        groups, self.group_names = _split_groups(params, defaults, names)
        if OPTIONS["per_head"].check("per_head_muon", per_head_muon):
            groups, self.group_names = _per_head(groups, self.group_names, engine)
        super().__init__(groups, defaults)
        self.group_params = [list(g["params"]) for g in self.param_groups]
        self._groups = list(self.param_groups)  # DeepSpeed swaps the list, never the dicts
        self._units: dict[tuple[int, int], _Unit] = {}
        self.qk_clip = QKClip(qk_clip_tau) if qk_clip_tau is not None else None
        self._qk_factors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def register_qk(self, recorder: MaxLogitRecorder, q_weight: torch.Tensor,
                    k_weight: torch.Tensor | None = None, *, head_dim: int, q_row: int = 0,
                    k_row: int | None = None) -> None:
        """`DistributedMuon.register_qk` for model parameters of this engine (Muon ones)."""
        if self.qk_clip is None:
            raise ValueError("register_qk needs QK-clip on: set \"qk_clip_tau\" in the "
                             "optimizer params of the DeepSpeed config")
        muon = {id(p) for ps, g in zip(self.group_params, self._groups, strict=True)
                if g["use_muon"] for p in ps}
        if any(id(w) not in muon for w in (q_weight, k_weight) if w is not None):
            raise ValueError("register_qk: a weight is not a Muon parameter of this optimizer")
        self.qk_clip.register(recorder, q_weight, k_weight, head_dim=head_dim, q_row=q_row,
                              k_row=k_row, shape_of=logical_shape)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group)
        for i, p in enumerate(group["params"]):
            name = f"parameter {i} of group {len(self.param_groups) - 1}"
            if group["use_muon"]:
                MatrixSpec.of(logical_shape(p), group["row_blocks"], group["matrix_view"], name)
            if getattr(p, "use_muon", False):
                raise ValueError(
                    f"parameter {name} has use_muon=True, which makes DeepSpeed run its own Muon "
                    "on top of DistributedMuon: do not set use_muon on parameters (and do not "
                    "combine with \"type\": \"Muon\")"
                )

    @property
    def ns_matrices(self) -> int:
        """Matrices this rank has orthogonalized, over all steps and units."""
        return sum(u.optimizer.ns_matrices for u in self._units.values())

    def is_partitioned(self, group_index: int) -> bool:
        """False without ZeRO: the group then holds whole tensors, replicated."""
        return is_partitioned(self.group_params[group_index][0])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        # DeepSpeed's setup call (bf16 without ZeRO) builds the units and updates nothing.
        setup_only = not self._units and is_state_setup_step()
        for group in self.param_groups:
            gi = next(i for i, g in enumerate(self._groups) if g is group)
            if self.is_partitioned(gi):
                units = [self._unit(gi, flat) for flat in group["params"]]
            else:
                units = [self._unit(gi, None)]  # no ZeRO: whole tensors, replicated
            if setup_only:
                continue
            for unit in units:
                unit.optimizer.step()
                if self.qk_clip is not None:
                    self._clip(gi, unit)
        return loss

    def _clip(self, gi: int, unit: _Unit) -> None:
        """Scale this unit's fragments of the clipped q/k rows (after its update, before
        DeepSpeed copies it back); the first unit of a training step computes the factors."""
        if self.qk_clip.pending():  # a forward ran since the last clip: a new training step
            device = (unit.flat if unit.flat is not None else self._groups[gi]["params"][0]).device
            self._qk_factors = self.qk_clip.step(zero0_group({}), device)
        if unit.optimizer.last_step_skipped or not self._groups[gi]["use_muon"]:
            return
        for weight, row_factor in self._qk_factors:
            if unit.flat is None:  # whole tensors: the group's own, or its fp32 copies, in order
                index = next((i for i, p in enumerate(self.group_params[gi]) if p is weight),
                             None)
                if index is not None:
                    scale_rows(unit.sharding, self._groups[gi]["params"][index], row_factor)
            elif weight in unit.sharding.fragments:
                scale_rows(unit.sharding, weight, row_factor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._groups = list(self.param_groups)  # torch rebuilds the group dicts

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``dmuon_fragments``, the map `convert_checkpoint` rebuilds
        whole tensors by (see `deepspeed_checkpoint.fragment_map`)."""
        return {**super().state_dict(), FRAGMENTS_KEY: fragment_map(self)}

    def load_full_state(self, weights: dict[str, torch.Tensor],
                        states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set fp32 weights and optimizer state from whole tensors by parameter name (what
        `load_topology_free` reads), at this job's data-parallel size. Call after
        ``deepspeed.initialize`` and before the next step; every rank passes the same tensors."""
        missing = sorted(n for names in self.group_names for n in names if n not in weights)
        if missing:
            raise ValueError(f"the checkpoint lacks parameters {missing[:5]} of this model")
        for gi, group in enumerate(self._groups):
            params, names = self.group_params[gi], self.group_names[gi]
            if not self.is_partitioned(gi):  # whole tensors: the parameters or fp32 copies
                for t, name in zip(group["params"], names, strict=True):
                    t.data.copy_(weights[name].view(t.shape))
                    _replace_state(self.state[t], {k: v.view(t.shape) if v.ndim else v.clone()
                                                   for k, v in states.get(name, {}).items()})
            by_name = dict(zip(params, names, strict=True))
            for flat in flats_of_group(gi, params, group["params"]):
                state: dict[str, torch.Tensor] = {}
                for p, (start, length, offset) in partition(flat, params).fragments.items():
                    flat.data.narrow(0, offset, length).copy_(
                        weights[by_name[p]].reshape(-1).narrow(0, start, length))
                    for key, value in states.get(by_name[p], {}).items():
                        if value.ndim == 0:
                            state[key] = value.clone()
                            continue
                        if key not in state:
                            state[key] = torch.zeros_like(flat)
                        state[key].narrow(0, offset, length).copy_(
                            value.reshape(-1).narrow(0, start, length))
                _replace_state(self.state[flat], state)
            for p, name in zip(params, names, strict=True):
                write_low_precision(p, weights[name])

    # ------------------------------------------------------------------ units

    def _unit(self, gi: int, flat: torch.Tensor | None) -> _Unit:
        key = (gi, id(flat) if flat is not None else -1)
        if key not in self._units:
            self._units[key] = self._build_unit(gi, flat)
        return self._units[key]

    def _build_unit(self, gi: int, flat: torch.Tensor | None) -> _Unit:
        """The core optimizer of one flat partition over the group it is split over (or, for
        ``flat=None``, of a whole param group replicated over data parallel)."""
        group = self._groups[gi]
        sharding: Sharding
        if flat is None:
            params, names = list(group["params"]), self.group_names[gi]
            sharding = ReplicatedSharding(zero0_group(group))
        elif not group["use_muon"]:
            # AdamW is elementwise: the flat partition itself is the parameter.
            params, names = [flat], [f"group{gi}.flat"]
            sharding = ReplicatedSharding(partition(flat, self.group_params[gi]).group)
        else:
            sharding = FlatSharding(flat, partition(flat, self.group_params[gi]))
            order = {p: i for i, p in enumerate(self.group_params[gi])}
            params = sorted(sharding.shapes, key=order.__getitem__)
            names = [self.group_names[gi][order[p]] for p in params]
        # The unit reads its step options from this optimizer's group (which DeepSpeed's LR
        # scheduler writes) and keeps its state in this optimizer's (what DeepSpeed saves).
        inner = DistributedMuon([{"params": params, "param_names": names, **_options(group)}],
                                comm_dtype=self.comm_dtype, sharding=sharding,
                                owner_strategy=self.owner_strategy,
                                ns_cost=self.ns_cost, exchange_chunks=self.exchange_chunks,
                                group_overrides=lambda _: self._groups[gi],
                                external_state=self._state_of(gi, flat, sharding))
        return _Unit(inner, flat, sharding)

    def _state_of(self, gi: int, flat: torch.Tensor | None,
                  sharding: Sharding) -> Callable[[torch.Tensor], dict[str, Any]]:
        """Where a unit's state lives in ``self.state``, looked up at each access (a load
        replaces ``self.state``): per parameter without ZeRO and for AdamW's flat partitions;
        for a Muon flat partition, each parameter's momentum is its range of the partition's."""
        if flat is None or not self._groups[gi]["use_muon"]:
            return lambda p: self.state[p]
        self._flat_momentum(flat)  # exists from the unit's first (setup) step: DeepSpeed maps it

        def state_of(p: torch.Tensor) -> dict[str, Any]:
            _, length, offset = sharding.fragments.get(p, (0, 0, 0))  # none here: empty
            return {"momentum_buffer": self._flat_momentum(flat).narrow(0, offset, length)}
        return state_of

    def _flat_momentum(self, flat: torch.Tensor) -> torch.Tensor:
        state = self.state[flat]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(flat)
        return state["momentum_buffer"]


def json_options(params: dict[str, Any]) -> dict[str, Any]:
    """The JSON ``params`` as `DistributedMuon` options (see `JSON_NAMES`); a value given under
    both of its names is refused rather than one silently winning."""
    for json_name, option in JSON_NAMES.items():
        # "ns_eps" and "eps" are two options (Newton-Schulz's and AdamW's), not one.
        if json_name in params and option in params and option not in JSON_NAMES:
            raise ValueError(
                f"DistributedMuon: the DeepSpeed config sets both \"{json_name}\" and "
                f"\"{option}\", one option under two names (in the JSON, as in DeepSpeed's "
                f"Muon, \"{json_name}\" is the AdamW part's): keep one")
    return {JSON_NAMES.get(k, k): v for k, v in params.items()}


def _options(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's DistributedMuon options (without its tensors and DeepSpeed's keys)."""
    return {k: v for k, v in group.items() if k not in ("params", *_DEEPSPEED_KEYS)}


def _replace_state(old: dict[str, Any], new: dict[str, Any]) -> None:
    """``old`` becomes ``new``, copying into tensors of the same shape: DeepSpeed keeps views of
    the optimizer state (``_hp_mapping.optim_fragment``) that must stay valid."""
    for key in list(old):
        if key not in new:
            del old[key]
    for key, value in new.items():
        mine = old.get(key)
        if isinstance(mine, torch.Tensor) and mine.shape == value.shape:
            mine.copy_(value)
        else:
            old[key] = value


def _split_groups(params: Iterable[Any], defaults: dict[str, Any],
                  names: dict[torch.Tensor, str] | None
                  ) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Each group in at most two: its Muon parameters and its AdamW parameters (explicit
    ``use_muon``), so every DeepSpeed flat partition is one or the other. Parameters that do
    not require grad are dropped, as DeepSpeed's ZeRO drops them. Returns the groups and their
    parameter names (kept apart: DeepSpeed replaces a group's ``params`` by its partition).

    ``names``: the calling engine's parameter names, None when no engine builds the optimizer;
    then a group that leaves ``use_muon`` to the rules must name its parameters."""
    groups = list(params)
    if not groups:
        raise ValueError("DistributedMuon got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out, out_names = [], []
    for gi, group in enumerate(groups):
        plist = group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        group = {k: v for k, v in group.items() if k != "param_names"}
        given = groups[gi].get("param_names")
        if plist and isinstance(plist[0], tuple):  # named parameters (`muon_param_groups`)
            given, plist = [n for n, _ in plist], [p for _, p in plist]
        use = group.get("use_muon", defaults["use_muon"])
        if not given and names is None and use is None:
            raise ValueError(
                f"DistributedMuon: the parameters of group {gi} have no names and no DeepSpeed "
                "engine is building the optimizer to name them, so embeddings and output heads "
                "cannot be told from matrices: pass named groups, "
                "distributed_muon.muon_param_groups(model), or \"param_names\" per group, or "
                "set \"use_muon\" on the group"
            )
        pnames = list(given) if given else [(names or {}).get(p, f"group{gi}.{i}")
                                            for i, p in enumerate(plist)]
        parts: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
        for p, name in zip(plist, pnames, strict=True):
            if not p.requires_grad:
                continue
            muon = default_use_muon(logical_shape(p), name) if use is None else use
            parts[bool(muon)][0].append(p)
            parts[bool(muon)][1].append(name)
        for muon in (True, False):
            if parts[muon][0]:
                out.append({**group, "params": parts[muon][0], "use_muon": muon})
                out_names.append(parts[muon][1])
    return out, out_names


def _per_head(groups: list[dict[str, Any]], names: list[list[str]], engine: Any
              ) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Muon groups split by per-head row blocks (heads read from the engine's model): a group
    per distinct split, so each flat partition has one ``row_blocks``."""
    if engine is None:
        raise ValueError(
            "DistributedMuon: \"per_head_muon\" needs the model, and no DeepSpeed engine is "
            "building the optimizer: pass distributed_muon.muon_param_groups(model, "
            "per_head=True) as the parameters instead")
    muon_names = {n for g, ns in zip(groups, names, strict=True) if g["use_muon"] for n in ns}
    blocks = attention_row_blocks(engine.module, names=muon_names)
    out, out_names = [], []
    for group, group_names in zip(groups, names, strict=True):
        if not group["use_muon"]:
            out.append(group)
            out_names.append(group_names)
            continue
        split: dict[Any, tuple[list, list]] = {}
        for p, name in zip(group["params"], group_names, strict=True):
            rows = group.get("row_blocks")
            if name in blocks:
                rows = refine(rows, blocks[name], name)
            split.setdefault(rows, ([], []))
            split[rows][0].append(p)
            split[rows][1].append(name)
        for rows, (ps, ns) in split.items():
            out.append({**group, "params": ps, "row_blocks": rows})
            out_names.append(ns)
    return out, out_names


def _refuse_unsupported(engine: Any) -> None:
    if engine.fp16_enabled():
        raise ValueError(
            "DistributedMuon under DeepSpeed supports fp32 and bf16, not fp16 (its loss "
            "scaling wraps the optimizer differently): use \"bf16\": {\"enabled\": true}"
        )
    if engine.zero_offload_optimizer() is not None and engine.zero_use_cpu_optimizer():
        raise ValueError(
            "DistributedMuon does not support ZeRO optimizer offload (offload_optimizer): the "
            "exchange and Newton-Schulz run on the accelerator; remove offload_optimizer from "
            "zero_optimization"
        )


def register() -> None:
    """Make ``"type": "DistributedMuon"`` resolve, with no ``zero_allow_untested_optimizer``.

    Idempotent; runs on import of this module.
    """
    from deepspeed.runtime.zero import utils as zero_utils

    torch.optim.DistributedMuon = DeepSpeedMuon
    if DeepSpeedMuon not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(DeepSpeedMuon)


register()
