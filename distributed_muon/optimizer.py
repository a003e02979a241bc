"""`DistributedMuon`: Muon for matrices, AdamW for the rest, one NS per matrix per step.

A step flows one way (DESIGN 2):

    local momentum -> to owners -> batched NS + shape scale on owners -> to holders -> update

Layout, ownership plan and exchange buffers are built at construction, and again at the next
step if the param groups' parameters are replaced (`DistributedMuon.sync_layout`).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from distributed_muon.cost import NSCost, cost_unit, matrix_costs
from distributed_muon.diagnostics import PHASES, Diagnostics, matrix_labels
from distributed_muon.dtypes import NS_DTYPES, DTypeLike, dtype_name, parse_dtype
from distributed_muon.exchange import Batch, Exchange, count_once
from distributed_muon.layout import ShardLayout
from distributed_muon.linked import ExternalState, GroupOverrides, StateOf, step_groups
from distributed_muon.options import (
    GROUP_OPTIONS,
    check_group,
    check_optimizer_wide,
    group_defaults,
    take_renamed_option,
    unknown_options_error,
)
from distributed_muon.orthogonalize import NSOptions, orthogonalize
from distributed_muon.params import MatrixSpec, default_use_muon
from distributed_muon.plan import OwnershipPlan
from distributed_muon.qk_clip import MaxLogitRecorder, QKClip, scale_rows
from distributed_muon.scale import shape_scale
from distributed_muon.sharding import Sharding, infer_sharding
from distributed_muon.update import adamw_, momentum_, muon_update_, nesterov_into

log = logging.getLogger(__name__)

# Options a state dict saved before they existed ran with (not today's defaults).
FORMER_DEFAULTS = {"ns_method": "standard"}
# The group options that make up a matrix's `NSOptions` (its batching key), by field.
NS_OPTION_KEYS = {"schedule": "ns_schedule", "steps": "ns_steps", "dtype": "ns_dtype",
                  "eps": "eps", "scale": "scale", "method": "ns_method"}
# Options fixed at construction: they decide the layout (which parameters are matrices and
# how they are cut) or the batching. A checkpoint must agree on them to load.
STRUCTURAL_OPTIONS = (*NS_OPTION_KEYS.values(), "use_muon", "row_blocks", "matrix_view")


class DistributedMuon(Optimizer):
    """Muon with AdamW for non-matrix parameters, distributed over a process group.

    Muon parameters (ndim >= 2 unless a group says ``use_muon=False``; see
    `distributed_muon.params`) get, per logical matrix ``m x n``:
    ``W <- W (1 - lr wd) - lr s(m, n) NS(u)`` with ``u`` the (Nesterov) momentum of the
    gradient. Each matrix is orthogonalized once per step on one owner rank. Everything else
    gets AdamW with ``adamw_*`` options.

    Args mirror ``torch.optim.Muon`` where it has them (``lr``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``eps``, ``ns_steps``; ``scale`` is its ``adjust_lr_fn``). Dtype options
    accept ``torch.bfloat16``/``"bf16"``/``"bfloat16"`` and ``torch.float32``/``"fp32"``/
    ``"float32"``; ``ns_dtype`` also ``torch.float16``/``"fp16"`` (not ``comm_dtype``: the
    exchanged momenta are not normalized, and fp16 tops out at 65504). ``ns_method`` is
    ``"standard"`` or ``"gram"`` (Gram Newton-Schulz: the same map, fewer FLOPs for wide
    matrices; see `distributed_muon.orthogonalize`). Group keys beyond
    the options: ``use_muon`` (True/False/None = auto),
    ``row_blocks`` (split of a fused weight's rows) and ``matrix_view`` ("experts"/"flatten").

    ``comm_dtype``, ``process_group``, ``sharding`` and ``owner_strategy`` are optimizer-wide:
    ``sharding`` is a framework adapter (inferred from the parameters when None),
    ``owner_strategy`` how `OwnershipPlan` assigns each matrix its owner rank: ``"lpt"``
    (balanced by NS cost) or ``"round_robin"`` (the baseline). Its former name ``plan=`` works,
    with a DeprecationWarning, until 0.2.0. ``qk_clip_tau`` (None: off) turns on QK-clip
    for the attention layers given to `register_qk` (see `distributed_muon.qk_clip` and
    docs/muonclip.md); ``qk_clip`` then tells what the last step clipped.
    ``diagnostics_every=k`` (0: off) measures every matrix on its owner every ``k`` steps and
    the ranks' phase times and bytes; `diagnostics` returns the last measurement (see
    `distributed_muon.diagnostics` and docs/diagnostics.md).
    ``ns_cost`` is what the plan balances: None for NS FLOPs, the path of a measured NS cost
    table (`distributed_muon.cost.CostTable`, seconds per shape) or a callable
    ``cost(m, n, options)``; rank 0's costs are used on every rank.
    ``exchange_chunks=K`` (1: off) pipelines the exchange with Newton-Schulz in K chunks of
    about equal NS cost: chunk k+1's matrices travel to their owners while chunk k is
    orthogonalized, and chunk k's updates travel back meanwhile (2K all-to-alls a step
    instead of 2; the same update bit for bit on CPU; see `Exchange.run`).
    ``group_overrides`` and ``external_state`` are for framework adapters whose own optimizer
    holds the param groups its schedulers write and the state its checkpoints save: this one
    then reads its step options and its state from there (`distributed_muon.linked`), and its
    own `state_dict`/`load_state_dict` refuse (save and load the adapter's).

    A step whose gradients hold inf/NaN on any rank is skipped on every rank with all state
    untouched; ``skipped_steps`` counts them, ``last_step_skipped`` tells about the last step,
    and a warning is logged.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        momentum_form: str = "ema",
        weight_decay: float = 0.0,
        scale: str = "match_rms_adamw",
        ns_schedule: str | list = "jordan",
        ns_steps: int = 5,
        ns_dtype: DTypeLike = "fp16",
        eps: float = 1e-7,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        adamw_bias_correction: bool = True,
        comm_dtype: DTypeLike = "bf16",
        ns_method: str = "gram",
        *,
        process_group: dist.ProcessGroup | None = None,
        sharding: Sharding | None = None,
        owner_strategy: str = "lpt",
        qk_clip_tau: float | None = None,
        diagnostics_every: int = 0,
        ns_cost: NSCost | str | os.PathLike | None = None,
        exchange_chunks: int = 1,
        group_overrides: GroupOverrides | None = None,
        external_state: StateOf | None = None,
        **unknown: Any,
    ) -> None:
        owner_strategy = take_renamed_option(unknown, "plan", owner_strategy)
        if unknown:  # so that `betas=` says to use `adamw_betas`, not just "unexpected"
            raise unknown_options_error(unknown)
        # The keyword arguments that are group options (all but the group-only ones).
        args = locals()
        defaults = group_defaults(**{k: args[k] for k in GROUP_OPTIONS if k in args})
        wide = check_optimizer_wide({
            "comm_dtype": comm_dtype, "owner_strategy": owner_strategy,
            "diagnostics_every": diagnostics_every, "ns_cost": ns_cost,
            "exchange_chunks": exchange_chunks})
        self.comm_dtype = wide["comm_dtype"]
        super().__init__(params, defaults)
        self._group_overrides = group_overrides
        if external_state is not None:
            self.state = ExternalState(  # type: ignore[assignment]
                lambda: [p for g in self.param_groups for p in g["params"]], external_state)
        # Optimizer-wide choices, kept to rebuild the layout when the parameters change.
        self._sharding_arg, self._process_group = sharding, process_group
        self._owner_strategy = owner_strategy
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.ns_matrices = 0  # matrices this rank has orthogonalized, over all steps
        self.profile = False  # when True, `phase_seconds` gets the time of each phase
        self.phase_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.qk_clip = QKClip(qk_clip_tau) if qk_clip_tau is not None else None
        self._diagnostics_every = diagnostics_every
        self._ns_cost = wide["ns_cost"]
        self.exchange_chunks = exchange_chunks
        self._steps = 0  # step() calls, skipped ones included (alike on every rank)
        self._warned_no_grad = False
        self._setup()
        _warn_unnamed_matrices(self.param_groups)

    # ---------------------------------------------------------------- setup

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state dict saved before an option existed loads with the option's default of
        # then (`FORMER_DEFAULTS`), which is what the saved run computed with.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in GROUP_OPTIONS.items():
                group.setdefault(key, FORMER_DEFAULTS.get(key, value))
            if isinstance(group["ns_dtype"], torch.dtype):  # saved before dtypes were strings
                group["ns_dtype"] = dtype_name(group["ns_dtype"])

    def __deepcopy__(self, memo: dict[int, Any]) -> DistributedMuon:
        """A working copy: groups, state and options are copied, the process group and a
        given sharding adapter are shared. Its layout, plan and exchange are built anew at its
        first step (collective there, as every step is; the copy itself is local)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        shared = {"_sharding_arg", "_process_group", *self._RUNTIME}
        for key, value in self.__dict__.items():
            clone.__dict__[key] = value if key in shared else copy.deepcopy(value, memo)
        clone._built_for = ()  # never equal to its groups: `sync_layout` rebuilds
        return clone

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_group(self.param_groups[-1])
        # The layout is rebuilt for the new parameters at the next step (`sync_layout`).

    # What `_setup` builds from the parameters: rebuilt, never copied, when they change.
    _RUNTIME = ("sharding", "layout", "plan", "exchange", "_diagnostics", "_muon", "_adamw",
                "_muon_group_of", "_muon_labels", "_ns_options", "_sampled", "_built_for")

    def _param_ids(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(id(p) for p in g["params"]) for g in self.param_groups)

    def sync_layout(self) -> None:
        """Rebuild layout, plan and exchange if the groups' parameters are no longer those
        they were built for: Accelerate's ``prepare`` and HF Trainer swap the parameters of an
        optimizer built before ``fully_shard`` for the sharded ones. Collective; every rank
        sees the same change (it happens at the same point of every rank's program)."""
        if self._param_ids() == self._built_for:
            return
        current = {id(p) for g in self.param_groups for p in g["params"]}
        stale = [p for p in self.state if id(p) not in current and self.state[p]]
        if stale:
            raise RuntimeError(
                f"DistributedMuon: the parameters changed after {len(stale)} of them got "
                "optimizer state (momentum would be lost): build the optimizer over the final "
                "(sharded/wrapped) parameters, or change them before the first step")
        if self.qk_clip is not None and any(
                id(w) not in current for t in self.qk_clip.targets for w in (t.q_weight,
                                                                             t.k_weight)):
            raise RuntimeError(
                "DistributedMuon: the parameters changed after register_qk: call register_qk "
                "with the new (sharded) weights on an optimizer built over them")
        log.info("DistributedMuon: parameters changed since the layout was built (e.g. by "
                 "fully_shard or accelerate's prepare): rebuilding it")
        for key in ("_muon", "_adamw"):  # drop the old parameters before building anew
            setattr(self, key, [])
        self._setup()

    def _setup(self) -> None:
        all_params = [p for g in self.param_groups for p in g["params"]]
        complex_params = [p for p in all_params if p.is_complex()]
        if complex_params:
            raise ValueError(
                f"DistributedMuon does not support complex parameters (shape "
                f"{tuple(complex_params[0].shape)}): optimize torch.view_as_real of them, or "
                "leave them to another optimizer")
        sharding = self._sharding_arg
        if sharding is None:
            sharding = infer_sharding(all_params, self._process_group)
        self.sharding = sharding
        muon: list[torch.Tensor] = []
        specs: list[MatrixSpec] = []
        keys: list[Hashable] = []
        self._muon_group_of: list[int] = []
        self._muon_labels: list[str] = []
        self._adamw: list[tuple[int, torch.Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names, strict=True):
                shape = self.sharding.shape(p)
                label = name or f"parameter {tuple(shape)} of group {gi}"
                use = group["use_muon"]
                if use is None:
                    use = default_use_muon(shape, name)
                if use:
                    specs.append(MatrixSpec.of(shape, group["row_blocks"],
                                               group["matrix_view"], label))
                    keys.append(ns_options(group))
                    muon.append(p)
                    self._muon_group_of.append(gi)
                    self._muon_labels.append(label)
                else:
                    self._adamw.append((gi, p))
        self._muon = muon
        self._ns_options = [ns_options(g) for g in self.param_groups]
        locals_ = [self.sharding.local(p) for p in muon]
        devices = {t.device for t in locals_}
        if len(devices) > 1:
            raise ValueError(f"Muon parameters live on several devices {devices}: "
                             "DistributedMuon needs them on one device per rank")
        if not devices and self._adamw:  # no matrices here: collectives on AdamW's device
            devices = {self.sharding.local(self._adamw[0][1]).device}
        device = devices.pop() if devices else torch.device("cpu")
        regions = [self.sharding.regions(p, s) for p, s in zip(muon, specs, strict=True)]
        self.layout = ShardLayout.gather(specs, keys, regions, self.sharding.group)
        costs = matrix_costs(self.layout.matrices, self._ns_cost, self.sharding.group, device)
        self.plan = OwnershipPlan.build(self.layout, costs, self._owner_strategy)
        # In one process nothing travels: an fp32/fp64 iteration reads u unrounded (exact
        # parity). Half-precision ones read comm_dtype, as at any world size (fp16 NS still
        # reads bf16: u is not normalized yet and may exceed fp16's range).
        buffer_dtype = self.comm_dtype
        if self.layout.world_size == 1 and any(k.dtype.itemsize > 2 for k in keys):
            buffer_dtype = torch.float32
            for t in locals_:
                buffer_dtype = torch.promote_types(buffer_dtype, t.dtype)
        # On an accelerator the buffers are freed between steps: their memory returns to the
        # caching allocator for activations, and taking it back costs microseconds. A CPU
        # would fault every page of them in again each step.
        self.exchange = Exchange(
            self.layout, self.plan, self.sharding.group, [t.shape for t in locals_], device,
            buffer_dtype, self.exchange_chunks, free_between_steps=device.type != "cpu",
        )
        # The matrices the diagnostics sample: the first of each whole batch, whatever the chunks.
        self._sampled = frozenset(b.matrices[0] for b in self.exchange.batches)
        self._diagnostics = Diagnostics(
            self._diagnostics_every, self.layout, matrix_labels(self.layout, self._muon_labels),
            self.sharding.group, self.exchange.local.device) if self._diagnostics_every else None
        self._built_for = self._param_ids()

    def register_qk(self, recorder: MaxLogitRecorder, q_weight: torch.Tensor,
                    k_weight: torch.Tensor | None = None, *, head_dim: int, q_row: int = 0,
                    k_row: int | None = None) -> None:
        """Clip the heads of one attention layer, whose forward reports to ``recorder``.

        Head ``h`` (of ``recorder.heads``) has query rows ``[q_row + h*head_dim, +head_dim)``
        of ``q_weight`` and key rows ``[k_row + h*head_dim, +head_dim)`` of ``k_weight``.
        Fused QKV ``[Q; K; V]``: ``register_qk(rec, qkv.weight, head_dim=hd)`` (``k_row``
        defaults to the end of the Q block, V is never touched). Separate projections:
        ``register_qk(rec, wq.weight, wk.weight, head_dim=hd)``. Weights are 2-D parameters
        of this optimizer; needs ``qk_clip_tau``."""
        if self.qk_clip is None:
            raise ValueError("register_qk needs QK-clip on: build DistributedMuon with "
                             "qk_clip_tau=TAU")
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(w) not in known for w in (q_weight, k_weight) if w is not None):
            raise ValueError("register_qk: a weight is not a parameter of this optimizer")
        self.qk_clip.register(recorder, q_weight, k_weight, head_dim=head_dim, q_row=q_row,
                              k_row=k_row, shape_of=self.sharding.shape)

    @property
    def muon_params(self) -> tuple[torch.Tensor, ...]:
        """The parameters Muon updates, in layout order (``layout.specs[i]`` is the i-th's)."""
        return tuple(self._muon)

    def diagnostics(self) -> dict[str, float]:
        """The scalars of the last logging step (``diagnostics_every``), the same on every rank;
        {} before the first or when off. Keys are listed in `diagnostics.summarize`."""
        return dict(self._diagnostics.last) if self._diagnostics is not None else {}

    # ---------------------------------------------------------------- state dict

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict, with the state of a DTensor parameter (FSDP2, HSDP) as
        a DTensor of that parameter's placements, sharing storage with the local state. So
        ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``, ``dcp.save``) knows
        which shard each rank holds and can reshard it; no collective runs."""
        self._refuse_external_state("state_dict")
        out = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, state in out["state"].items():
            p = params[index]
            if isinstance(p, DTensor):
                out["state"][index] = {k: _as_dtensor(v, p) for k, v in state.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of `state_dict`'s form (DTensor state, possibly resharded by torch
        DCP) or of the older one (each rank's local state); the state must match each
        parameter's local shard, else nothing is loaded."""
        self._refuse_external_state("load_state_dict")
        before = self.state, self.param_groups  # torch's load builds new ones of each
        try:
            super().load_state_dict(state_dict)
            for gi, (group, old) in enumerate(zip(self.param_groups, before[1], strict=True)):
                _check_saved_options(gi, group, old)
            for p, state in self.state.items():
                local_shape = p.to_local().shape if isinstance(p, DTensor) else None
                state.update({k: _local_state(v, p, k, local_shape) for k, v in state.items()})
        except Exception:
            self.state, self.param_groups = before
            raise

    def _refuse_external_state(self, call: str) -> None:
        if isinstance(self.state, ExternalState):
            raise RuntimeError(f"DistributedMuon.{call}: this optimizer's state lives in its "
                               "framework adapter's optimizer (external_state): call that one's")

    def plan_summary(self) -> str:
        """Per-rank planned NS cost, imbalance and bytes per step (see `OwnershipPlan`)."""
        return self.plan.summary(self.layout, self.comm_dtype.itemsize,
                                 cost_unit(self._ns_cost))

    def memory_bytes(self) -> dict[str, int]:
        """This rank's optimizer memory by kind, read from the tensors it holds now.

        Counts (values, not bytes): ``muon_params`` and ``adamw_params``, the local values
        (this rank's shards) of the Muon and the AdamW parameters, so that bytes per parameter
        are ``x_bytes / x_params``. Bytes (``numel * element_size``):

        - ``muon_state_bytes``: the momentum buffers;
        - ``adamw_state_bytes``: ``exp_avg``, ``exp_avg_sq`` and the ``step`` scalars (fp32,
          4 B each, on the CPU whatever the parameters' device);
        - ``exchange_local_bytes``, ``exchange_batch_bytes`` and
          ``exchange_{to_owners,to_holders}_{send,recv}_bytes``: the exchange's buffers
          while a step runs (`Exchange.memory_bytes`; in one process a receive buffer is its
          send buffer and counts 0, and ``local`` holds only the parameters not stored in
          place in ``batch``);
        - ``total_bytes``: the sum of the above, held while a step runs;
        - ``between_steps_bytes``: what stays allocated between steps: the state, plus the
          exchange's buffers unless they are freed between steps (on accelerators).

        State is created at a parameter's first step with a gradient: before it, its state
        counts 0 bytes. Two tensors over the same memory (a send buffer that is its receive
        buffer) count once. Not included: the Newton-Schulz workspace and the other
        transients of a step (allocated and freed inside it; measure them, e.g. with
        ``torch.cuda.max_memory_allocated``), parameters and gradients, and the diagnostics'
        buffers.
        """
        muon = [self.sharding.local(p) for p in self._muon]
        adamw = [self.sharding.local(p) for _, p in self._adamw]
        state: dict[str, torch.Tensor] = {}
        for kind, params, keys in (("muon", self._muon, ("momentum_buffer",)),
                                   ("adamw", [p for _, p in self._adamw],
                                    ("exp_avg", "exp_avg_sq", "step"))):
            for i, p in enumerate(params):
                for key in keys:
                    value = self.state.get(p, {}).get(key)
                    if isinstance(value, DTensor):
                        value = value.to_local()
                    if isinstance(value, torch.Tensor):
                        state[f"{kind}/{i}/{key}"] = value
        buffers = self.exchange.buffers
        counted = count_once({**{f"exchange/{k}": t for k, t in buffers.items()}, **state})
        out = {
            "muon_params": sum(t.numel() for t in muon),
            "adamw_params": sum(t.numel() for t in adamw),
            "muon_state_bytes": sum(v for k, v in counted.items() if k.startswith("muon/")),
            "adamw_state_bytes": sum(v for k, v in counted.items() if k.startswith("adamw/")),
        }
        for k in buffers:
            out[f"exchange_{k}_bytes"] = counted[f"exchange/{k}"]
        out["total_bytes"] = sum(counted.values())
        exchange = sum(counted[f"exchange/{k}"] for k in buffers)
        out["between_steps_bytes"] = out["total_bytes"] - (
            exchange if self.exchange.free_between_steps else 0)
        return out

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        self.sync_layout()
        groups = step_groups(self.param_groups, self._group_overrides)
        for gi, group in enumerate(groups):
            if ns_options(group) != self._ns_options[gi]:
                raise RuntimeError(
                    f"param group {gi} changed one of {tuple(NS_OPTION_KEYS.values())} after "
                    "construction: these decide the batching plan; build a new optimizer to "
                    "change them"
                )
        self._steps += 1
        diag = self._diagnostics if self._diagnostics and self._diagnostics.due(self._steps) \
            else None
        grads = [self.sharding.local_grad(p) for p in self._muon]
        adamw_grads = [self.sharding.local_grad(p) for _, p in self._adamw]
        if self._muon and all(g is None for g in grads) and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"DistributedMuon: step {self._steps} found no gradient on any of its "
                f"{len(self._muon)} Muon parameters (none will move): were its parameters "
                "replaced after it was built (e.g. by fully_shard) without being swapped in its "
                "param groups? Build it after wrapping the model", stacklevel=2)
        self.last_step_skipped = not self._all_finite(grads + adamw_grads)
        if self.last_step_skipped:
            self.skipped_steps += 1
            log.warning("DistributedMuon: non-finite gradient, step skipped on every rank "
                        "(%d skipped so far)", self.skipped_steps)
            if self.qk_clip is not None:
                self.qk_clip.discard()
            return loss
        seconds = dict.fromkeys(PHASES, 0.0)
        clock = _PhaseClock(self.profile or diag is not None, seconds, self.exchange.local.device)
        if diag is not None:
            diag.begin()
        with self.exchange.in_use():
            self._momentum(grads, groups)
            clock.tick("momentum")
            # to owners -> NS + scale per owned (sub-)batch -> to holders, pipelined in chunks.
            self.exchange.run(functools.partial(self._orthogonalize, groups=groups, diag=diag),
                              clock.tick)
            self._apply_muon(grads, groups)
        self._adamw_step(adamw_grads, groups)
        if self.qk_clip is not None:  # after the update, on local rows only
            for weight, row_factor in self.qk_clip.step(self.sharding.group,
                                                        self.exchange.local.device):
                scale_rows(self.sharding, weight, row_factor)
        clock.tick("update")
        if self.profile:
            for phase, t in seconds.items():
                self.phase_seconds[phase] += t
        if diag is not None:
            diag.record_rank(seconds, sum(len(b.matrices) for b in self.exchange.batches),
                             self.exchange.bytes_per_step, self.skipped_steps)
            diag.finish(self._steps)
        return loss

    def _orthogonalize(self, batch: Batch, groups: Sequence[Mapping[str, Any]],
                       diag: Diagnostics | None) -> None:
        """``batch.view``: momentum updates in, scaled orthogonalized updates out, in calls of
        at most `_NS_CALL_VALUES` values (at least one matrix): the workspace of Newton-Schulz
        is bounded by that, not by the batch, and large matrices keep the GPU busy anyway."""
        scale = shape_scale(batch.options.scale, batch.m, batch.n)
        per_call = max(1, _NS_CALL_VALUES // (batch.m * batch.n))
        for start in range(0, len(batch.matrices), per_call):
            view = batch.view[start:start + per_call]
            matrices = batch.matrices[start:start + per_call]
            ortho = orthogonalize(view, batch.options)
            if diag is not None:  # u is still in view
                diag.record_batch(matrices, view, ortho, [
                    groups[self._group_index_of_matrix(mid)]["lr"] * scale for mid in matrices],
                    sample=matrices[0] in self._sampled)
            view.copy_(ortho.mul_(scale))
        self.ns_matrices += len(batch.matrices)

    def _group_index_of_matrix(self, matrix: int) -> int:
        return self._muon_group_of[self.layout.matrices[matrix].param]

    def _all_finite(self, grads: list[torch.Tensor | None]) -> bool:
        present = [g for g in grads if g is not None and g.numel() > 0]
        device = self.exchange.local.device
        ok = torch.ones((), device=device)
        if present:
            norms = torch._foreach_norm(present)
            ok = torch.isfinite(torch.stack([n.to(device) for n in norms])).all().float()
        if self.sharding.group is not None:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.sharding.group)
        return bool(ok.item())

    def _momentum(self, grads: list[torch.Tensor | None],
                  groups: Sequence[Mapping[str, Any]]) -> None:
        """Update momentum of Muon parameters with a gradient; write ``u`` to the exchange."""
        views = self.exchange.local_views
        missing = [views[i] for i, g in enumerate(grads) if g is None]
        if missing:  # no gradient (an expert without tokens): send zeros, keep state
            torch._foreach_zero_(missing)
        for gi, idx in self._muon_by_group(grads):
            group = groups[gi]
            mu, form = group["momentum"], group["momentum_form"]
            g = [grads[i] for i in idx]
            bufs = []
            for i in idx:
                state = self.state[self._muon[i]]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grads[i])
                bufs.append(state["momentum_buffer"])
            momentum_(bufs, g, mu, form)
            nesterov_into([views[i] for i in idx], g, bufs, mu, form, group["nesterov"])

    def _apply_muon(self, grads: list[torch.Tensor | None],
                    groups: Sequence[Mapping[str, Any]]) -> None:
        views = self.exchange.local_views
        for gi, idx in self._muon_by_group(grads):
            group = groups[gi]
            params = [self.sharding.local(self._muon[i]) for i in idx]
            muon_update_(params, [views[i] for i in idx], group["lr"], group["weight_decay"])

    def _muon_by_group(self, grads: list[torch.Tensor | None]) -> list[tuple[int, list[int]]]:
        """Indices of Muon parameters that have a gradient, per param group."""
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(grads):
            if g is not None:
                by_group.setdefault(self._muon_group_of[i], []).append(i)
        return list(by_group.items())

    def _adamw_step(self, grads: list[torch.Tensor | None],
                    groups: Sequence[Mapping[str, Any]]) -> None:
        by_group: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (gi, p), g in zip(self._adamw, grads, strict=True):
            if g is not None:
                by_group.setdefault(gi, []).append((p, g))
        for gi, pairs in by_group.items():
            group = groups[gi]
            wd = group["weight_decay"] if group["adamw_weight_decay"] is None \
                else group["adamw_weight_decay"]
            m, v, steps = [], [], []
            for p, gr in pairs:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(gr)
                    state["exp_avg_sq"] = torch.zeros_like(gr)
                state["step"] += 1
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
                steps.append(state["step"].item())
            adamw_([self.sharding.local(p) for p, _ in pairs], [gr for _, gr in pairs], m, v,
                   steps, lr=_adamw_lr(group), betas=group["adamw_betas"],
                   eps=group["adamw_eps"], weight_decay=wd,
                   bias_correction=group["adamw_bias_correction"])


# Values one Newton-Schulz call orthogonalizes at most (64 Mi: 128 MiB in fp16/bf16, e.g. four
# 8192x2048 matrices): bounds the iteration's workspace whatever the batch.
_NS_CALL_VALUES = 1 << 26


def run_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss ``closure()`` returns, computed with gradients on (a step runs under
    ``torch.no_grad``, and the closure recomputes the loss and its gradients); None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_saved_options(gi: int, group: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a loaded group whose structural options differ from the optimizer's: they decide
    its layout and batching, so a step would fail later (or, for a state dict that predates
    an option, silently change what the saved run computed)."""

    def structure(g: dict[str, Any]) -> tuple:
        blocks = tuple(g["row_blocks"]) if g["row_blocks"] else None
        return ns_options(g), g["use_muon"], blocks, g["matrix_view"]

    if structure(group) == structure(current):
        return
    key = next((k for k in STRUCTURAL_OPTIONS if group[k] != current[k]), "ns_schedule")
    raise ValueError(
        f"the state dict was saved with {key}={group[key]!r} in param group {gi}, this optimizer "
        f"has {current[key]!r}: build it with the saved options (the Newton-Schulz defaults "
        "changed on 2026-12-05: docs/changelog.md)")


def _as_dtensor(value: Any, param: DTensor) -> Any:
    """``value`` (a local state tensor shaped like ``param``'s shard) as a DTensor laid out
    like ``param``; scalars (AdamW's step) and anything else unchanged."""
    local = param.to_local()
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor) \
            or value.shape != local.shape or value.ndim == 0:
        return value
    return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _local_state(value: Any, param: torch.Tensor, key: str,
                 local_shape: torch.Size | None) -> Any:
    """The local tensor the step works on, from a loaded state value."""
    if isinstance(value, DTensor):
        if not isinstance(param, DTensor) or value.placements != param.placements \
                or value.shape != param.shape:
            raise ValueError(
                f"state {key!r} of a parameter of shape {tuple(param.shape)} was loaded as a "
                f"DTensor of shape {tuple(value.shape)} and placements {value.placements}: load "
                "it with torch.distributed.checkpoint's set_optimizer_state_dict, which "
                "reshards it to the parameter's layout")
        value = value.to_local()
    if local_shape is not None and value.ndim > 0 and value.shape != local_shape:
        raise ValueError(
            f"state {key!r} has shape {tuple(value.shape)} but this rank's shard of the "
            f"{tuple(param.shape)} parameter is {tuple(local_shape)}: the state dict was saved "
            "at another world size or layout; save and load with torch.distributed.checkpoint "
            "(get/set_optimizer_state_dict) or distributed_muon.checkpoint to reshard")
    return value


def _warn_unnamed_matrices(groups: list[dict[str, Any]]) -> None:
    """Warn once when parameters without names go to Muon by shape alone: an embedding or an
    output head among them would be orthogonalized (HF Trainer hands over unnamed groups)."""
    if sum(len(g["params"]) for g in groups) < 2:
        return
    unnamed = sum(p.ndim >= 2 for g in groups if g["use_muon"] is None
                  and not g.get("param_names") for p in g["params"])
    if unnamed:
        warnings.warn(
            f"DistributedMuon: {unnamed} unnamed parameter(s) of 2+ dims go to Muon by shape, "
            "embeddings and output heads included: pass muon_param_groups(model) (or "
            "model.named_parameters()) so those get AdamW", stacklevel=3)


def _adamw_lr(group: Mapping[str, Any]) -> float:
    """AdamW's lr: ``lr``, or ``adamw_lr`` scaled as an LR scheduler has scaled ``lr``; 0 when
    ``lr`` is 0 (a frozen step, e.g. torch DCP's state initialization, moves nothing)."""
    if group["adamw_lr"] is None or group["lr"] == 0:
        return group["lr"]
    initial = group.get("initial_lr")  # set by torch.optim.lr_scheduler
    return group["adamw_lr"] * (group["lr"] / initial if initial else 1.0)


def ns_options(group: Mapping[str, Any]) -> NSOptions:
    """The `NSOptions` of a (validated) param group: its matrices' batching key."""
    values = {field: group[key] for field, key in NS_OPTION_KEYS.items()}
    values["dtype"] = parse_dtype(values["dtype"], "ns_dtype", NS_DTYPES)
    if not isinstance(values["schedule"], str):  # a custom list: hashable, as floats
        values["schedule"] = tuple(tuple(float(x) for x in c) for c in values["schedule"])
    return NSOptions(**values)


class _PhaseClock:
    """Adds wall time per phase to ``into`` when enabled (synchronizing CUDA to be honest).

    It waits for the current stream only, not the whole device: in a pipelined exchange the
    next chunk's all-to-all is in flight on the communication stream at a tick, and waiting
    for it would serialize what the pipeline overlaps."""

    def __init__(self, enabled: bool, into: dict[str, float], device: torch.device) -> None:
        self.enabled, self.into, self.device = enabled, into, device
        self.last = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()

    def tick(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self.into[phase] += now - self.last
            self.last = now

