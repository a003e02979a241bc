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
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from distributed_muon.integrations.replicated import ReplicatedSharding
from torch.optim import Optimizer

from distributed_muon.layout import Region
from distributed_muon.optimizer import DistributedMuon, group_defaults, validate_group
from distributed_muon.options import DTypeLike, parse_dtype
from distributed_muon.params import MatrixSpec, default_use_muon
from distributed_muon.plan import STRATEGIES
from distributed_muon.sharding import Sharding

# Group keys DeepSpeed adds or reads (MoE); everything else in a group is a DistributedMuon option.
_DEEPSPEED_KEYS = ("moe", "name")


class FlatSharding:
    """Parameters stored as fragments of one flat tensor (a ZeRO partition).

    ``fragments[p]`` is ``(global start, length, offset in flat)``: this rank holds values
    ``[start, start+length)`` of parameter ``p``'s row-major storage at ``flat[offset:]``;
    a parameter this rank holds nothing of is absent. ``shapes[p]`` is its global shape.
    """

    def __init__(self, flat: torch.Tensor, fragments: dict[torch.Tensor, tuple[int, int, int]],
                 shapes: dict[torch.Tensor, torch.Size], group: dist.ProcessGroup | None,
                 index: int | None = None, replicated: bool = False) -> None:
        self.flat, self.fragments, self.shapes, self.group = flat, fragments, shapes, group
        self.index = index  # ZeRO-3: the sub-group; else the flat is its param group's
        self.replicated = replicated  # every rank holds every value: each rank a replica
        self.rank = dist.get_rank(group) if group is not None else 0

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
        start, length, _ = self.fragments[param]
        replica = self.rank if self.replicated else 0
        return [Region.flat(rank=self.rank, replica=replica, spec=spec, start=start,
                            stop=start + length)]


@dataclass
class _Unit:
    """One flat partition (or, without ZeRO, one param group) and the optimizer that steps it."""

    optimizer: DistributedMuon
    flat: torch.Tensor | None  # None: the unit's parameters are the group's own (ZeRO-0)
    sharding: Sharding


class DeepSpeedMuon(Optimizer):
    """`DistributedMuon` as DeepSpeed's inner optimizer; built by DeepSpeed from the JSON config.

    ``params`` are the model parameters (or groups) DeepSpeed passes; options are
    `DistributedMuon`'s, dtypes may be strings (``"bf16"``, ``"fp32"``). Parameters are named from
    the calling DeepSpeed engine's module when the groups carry no names, so embeddings and
    output heads go to AdamW by the core's name rule. Every option is checked here, before the
    first step.
    """

    def __init__(self, params: Iterable[Any], comm_dtype: DTypeLike = torch.bfloat16,
                 plan: str = "lpt", **options: Any) -> None:
        defaults = group_defaults(**options)
        self.comm_dtype = parse_dtype(comm_dtype, "comm_dtype")
        if plan not in STRATEGIES:
            raise ValueError(f"plan={plan!r} is not valid: use one of {STRATEGIES}")
        self.plan = plan
        engine = _calling_engine()
        if engine is not None:
            _refuse_unsupported(engine)
        names = {p: n for n, p in engine.module.named_parameters()} if engine else {}
        groups, self._group_names = _split_groups(params, defaults, names)
        super().__init__(groups, defaults)
        self._group_params = [list(g["params"]) for g in self.param_groups]
        self._groups = list(self.param_groups)  # DeepSpeed swaps the list, never the dicts
        self._units: dict[tuple[int, int], _Unit] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group)
        for i, p in enumerate(group["params"]):
            name = f"parameter {i} of group {len(self.param_groups) - 1}"
            if group["use_muon"]:
                MatrixSpec.of(_shape(p), group["row_blocks"], group["matrix_view"], name)
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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # DeepSpeed's unfused bf16 wrapper (bf16 without ZeRO) calls step() once at setup
        # with zero gradients to create state: build the units then, update nothing.
        setup_only = not self._units and _called_from("FP16_UnfusedOptimizer",
                                                      "initialize_optimizer_states")
        for group in self.param_groups:
            gi = next(i for i, g in enumerate(self._groups) if g is group)
            if self._whole(gi):
                units = [self._unit(gi, None)]  # no ZeRO: whole tensors, replicated
            else:
                units = [self._unit(gi, flat) for flat in group["params"]]
            if setup_only:
                continue
            for unit in units:
                inner = unit.optimizer.param_groups[0]
                inner.update({k: v for k, v in group.items() if k not in
                              ("params", *_DEEPSPEED_KEYS)})
                unit.optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._groups = list(self.param_groups)  # torch rebuilds the group dicts
        for (gi, _), unit in self._units.items():
            self._link_state(gi, unit)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``dmuon_fragments``: for every flat partition (by its index
        in ``state``), the fragments of named parameters it holds, so that `convert_checkpoint`
        can rebuild whole tensors from DeepSpeed's per-rank files without DeepSpeed's layout
        rules."""
        out = super().state_dict()
        fragments, index = {}, 0
        for gi, group in enumerate(self.param_groups):
            whole = self._whole(gi)
            for t in group["params"]:
                if not whole:
                    sharding = _flat_sharding(t, self._group_params[gi], group)
                    names = dict(zip(self._group_params[gi], self._group_names[gi], strict=True))
                    fragments[index] = {
                        "flat": gi if sharding.index is None else sharding.index,
                        "params": [(names[p], tuple(sharding.shapes[p]), *frag)
                                   for p, frag in sharding.fragments.items()],
                    }
                index += 1
        out["dmuon_fragments"] = fragments
        return out

    def load_full_state(self, weights: dict[str, torch.Tensor],
                        states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Set fp32 weights and optimizer state from whole tensors by parameter name (what
        `load_topology_free` reads), at this job's data-parallel size. Call after
        ``deepspeed.initialize`` and before the next step; every rank passes the same tensors."""
        missing = sorted(n for names in self._group_names for n in names if n not in weights)
        if missing:
            raise ValueError(f"the checkpoint lacks parameters {missing[:5]} of this model")
        for gi, group in enumerate(self._groups):
            params, names = self._group_params[gi], self._group_names[gi]
            z3 = getattr(params[0], "_z3_optimizer", None)
            if z3 is not None:
                flats = [f for s, f in enumerate(z3.fp32_partitioned_groups_flat)
                         if z3.sub_group_to_group_id[s] == gi]
            elif self._whole(gi):
                flats = []  # no ZeRO: whole tensors (the parameters or their fp32 copies)
                for t, name in zip(group["params"], names, strict=True):
                    t.data.copy_(weights[name].view(t.shape))
                    _replace_state(self.state[t], {k: v.view(t.shape) if v.ndim else v.clone()
                                                   for k, v in states.get(name, {}).items()})
            else:
                flats = list(group["params"])
            by_name = dict(zip(params, names, strict=True))
            for flat in flats:
                sharding = _flat_sharding(flat, params, group)
                state: dict[str, torch.Tensor] = {}
                for p, (start, length, offset) in sharding.fragments.items():
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
            _set_low_precision(params, names, weights, z3)
        for (gi, _), unit in self._units.items():
            self._link_state(gi, unit)

    # ------------------------------------------------------------------ units

    def _whole(self, gi: int) -> bool:
        """True without ZeRO: the group holds whole tensors, replicated over data parallel:
        the parameters themselves (fp32), or DeepSpeed's fp32 copies of them, in order (bf16).
        Under ZeRO, DeepSpeed tags the parameters with their partition maps."""
        p = self._group_params[gi][0]
        return not hasattr(p, "_hp_mapping") and not hasattr(p, "_z3_optimizer")

    def _unit(self, gi: int, flat: torch.Tensor | None) -> _Unit:
        key = (gi, id(flat) if flat is not None else -1)
        if key not in self._units:
            self._units[key] = self._build_unit(gi, flat)
        return self._units[key]

    def _build_unit(self, gi: int, flat: torch.Tensor | None) -> _Unit:
        group = self._groups[gi]
        options = {k: v for k, v in group.items() if k not in ("params", *_DEEPSPEED_KEYS)}
        if flat is None:
            params, names = list(group["params"]), self._group_names[gi]
            sharding: Sharding = ReplicatedSharding(_zero0_group(group))
        elif not group["use_muon"]:
            # AdamW is elementwise: the flat partition itself is the parameter.
            params, names = [flat], [f"group{gi}.flat"]
            sharding = ReplicatedSharding(_flat_group(self._group_params[gi]))
        else:
            sharding = _flat_sharding(flat, self._group_params[gi], group)
            order = {p: i for i, p in enumerate(self._group_params[gi])}
            params = sorted(sharding.shapes, key=order.__getitem__)
            names = [self._group_names[gi][order[p]] for p in params]
        inner = DistributedMuon([{"params": params, "param_names": names, **options}],
                                comm_dtype=self.comm_dtype, sharding=sharding, plan=self.plan)
        unit = _Unit(inner, flat, sharding)
        self._link_state(gi, unit)
        return unit

    def _link_state(self, gi: int, unit: _Unit) -> None:
        """Make the unit's state live in this optimizer's ``state`` (what DeepSpeed saves):
        per parameter without ZeRO, per flat partition otherwise."""
        inner = unit.optimizer
        if unit.flat is None or not self._groups[gi]["use_muon"]:
            for p in inner.param_groups[0]["params"]:
                inner.state[p] = self.state[p]
            return
        state = self.state[unit.flat]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(unit.flat)
        buf = state["momentum_buffer"]
        for p, (_, length, offset) in unit.sharding.fragments.items():
            inner.state[p] = {"momentum_buffer": buf.narrow(0, offset, length)}


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


def _split_groups(params: Iterable[Any], defaults: dict[str, Any], names: dict[torch.Tensor, str]
                  ) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Each group in at most two: its Muon parameters and its AdamW parameters (explicit
    ``use_muon``), so every DeepSpeed flat partition is one or the other. Parameters that do
    not require grad are dropped, as DeepSpeed's ZeRO drops them. Returns the groups and their
    parameter names (kept apart: DeepSpeed replaces a group's ``params`` by its partition)."""
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
        pnames = list(given) if given else [names.get(p, f"group{gi}.{i}")
                                            for i, p in enumerate(plist)]
        parts: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
        for p, name in zip(plist, pnames, strict=True):
            if not p.requires_grad:
                continue
            use = group.get("use_muon", defaults["use_muon"])
            if use is None:
                use = default_use_muon(_shape(p), name)
            parts[bool(use)][0].append(p)
            parts[bool(use)][1].append(name)
        for use in (True, False):
            if parts[use][0]:
                out.append({**group, "params": parts[use][0], "use_muon": use})
                out_names.append(parts[use][1])
    return out, out_names


def _shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape as a layer (ZeRO-3 partitioned parameters keep it in ``ds_shape``)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


def _flat_sharding(flat: torch.Tensor, group_params: list[torch.Tensor],
                   group_of: dict[str, Any]) -> FlatSharding:
    """Which fragment of which parameter ``flat`` holds, from DeepSpeed's own maps."""
    shapes = {p: _shape(p) for p in group_params}
    z3 = getattr(group_params[0], "_z3_optimizer", None)
    fragments: dict[torch.Tensor, tuple[int, int, int]] = {}
    sub = None
    if z3 is not None:  # ZeRO-3: every parameter is split evenly, padded, over the group
        sub = next(i for i, t in enumerate(z3.fp32_partitioned_groups_flat) if t is flat)
        params = z3.fp16_groups[sub]
        group = z3._get_sub_group_process_group(sub)
        rank = dist.get_rank(group)
        for p in params:
            _, offset, part = z3.grad_position[z3.get_param_id(p)]
            start, stop = rank * part, min((rank + 1) * part, p.ds_numel)
            if start < stop:
                fragments[p] = (start, stop - start, offset)
        shapes = {p: shapes[p] for p in params}
    else:  # ZeRO-1/2 and BF16_Optimizer: a flat range of the group's flattened parameters
        group = None
        for p in group_params:
            group = getattr(p, "_dp_group", group)
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or mapping.hp_fragment.data_ptr() != (
                flat.data_ptr() + mapping.hp_fragment_address.start * flat.element_size()
            ):
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            fragments[p] = (lp.start, lp.numel, hp.start)
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    return FlatSharding(flat, fragments, shapes, group, sub if z3 is not None else None)


def _set_low_precision(params: list[torch.Tensor], names: list[str],
                       weights: dict[str, torch.Tensor], z3: Any) -> None:
    """The model's own (bf16 or fp32) copy of the weights, which forward reads."""
    for p, name in zip(params, names, strict=True):
        full = weights[name].reshape(-1)
        if z3 is None:
            p.data.copy_(full.view(p.shape))
            continue
        part = p.ds_tensor.numel()
        rank = dist.get_rank(z3._get_param_partition_group(p))
        start, stop = rank * part, min((rank + 1) * part, p.ds_numel)
        if start < stop:
            p.ds_tensor.data.narrow(0, 0, stop - start).copy_(full.narrow(0, start, stop - start))


def _flat_group(group_params: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group a flat partition is split over (for a collective finite check)."""
    z3 = getattr(group_params[0], "_z3_optimizer", None)
    group = z3.dp_process_group if z3 is not None else getattr(group_params[0], "_dp_group", None)
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _zero0_group(group: dict[str, Any]) -> dist.ProcessGroup | None:
    """Without ZeRO the engine all-reduces over data parallel, or expert data parallel."""
    from deepspeed.utils import groups

    if group.get("moe"):
        pg = groups._get_expert_data_parallel_group(group["name"])
    else:
        pg = groups._get_data_parallel_group()
    return pg if dist.get_world_size(pg) > 1 else None


def _calling_engine() -> Any:
    """The ``DeepSpeedEngine`` building this optimizer from its config, if any (for parameter
    names and the ZeRO config, which DeepSpeed does not pass to optimizers)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DeepSpeedEngine):
            return candidate
        frame = frame.f_back
    return None


def _called_from(cls_name: str, function: str) -> bool:
    """True when a caller is method ``function`` of an object of class ``cls_name``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function and \
                type(frame.f_locals.get("self")).__name__ == cls_name:
            return True
        frame = frame.f_back
    return False


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
