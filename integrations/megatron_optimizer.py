"""``--optimizer dmuon`` for Megatron: `DistributedMuon` inside Megatron's own optimizer wrappers.

``import distributed_muon.integrations.megatron_optimizer`` makes Megatron's
``get_megatron_optimizer`` build DistributedMuon when ``config.optimizer == "dmuon"`` (and, with
``megatron.training`` installed, adds ``dmuon`` to ``--optimizer`` and the ``--dmuon-*`` flags).

Megatron's wrappers keep doing what they do for Adam: fp32 main copies of bf16 weights, the
distributed optimizer's flat per-bucket shards (``--use-distributed-optimizer``), gradient
clipping and the logged grad norm on the main gradients (before orthogonalization), and
checkpoints of the inner optimizer's per-parameter state. The inner optimizer they wrap is
`MegatronMuon`: its param groups are Megatron's (main params, ``wd_mult``, ``max_lr``, ...,
driven by Megatron's scheduler); it steps one `DistributedMuon` over the *model* parameters of
the whole pipeline stage, whose local storage (`_MainSharding`) is this rank's main param or
main shard. Every rank thus describes the same matrices, and each is orthogonalized once across
TP x DP.

This module holds `MegatronMuon` and the translation of Megatron's flags; what it needs of
Megatron's private structures (param groups, wrappers, shard map, patches) is in
`megatron_internals`, the model-space checkpoint format in `megatron_checkpoint`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from distributed_muon.integrations import megatron_internals as internals
from distributed_muon.integrations import megatron_parity as parity
from distributed_muon.integrations.megatron import SUPPORTED, MegatronSharding
from distributed_muon.integrations.megatron_checkpoint import (
    model_space_checkpoints as _model_space_checkpoints,
)
from distributed_muon.integrations.megatron_heads import per_head_blocks
from distributed_muon.integrations.megatron_regions import restrict_regions
from torch import nn
from torch.optim import Optimizer

from distributed_muon.layout import Region
from distributed_muon.optimizer import DistributedMuon
from distributed_muon.options import (
    OPTIONS,
    add_former_flags,
    check_optimizer_wide,
    group_defaults,
    surface_default,
    take_renamed_option,
)
from distributed_muon.params import MatrixSpec

# Megatron's --muon-scale-mode as (our scale, factor): Megatron's "spectral" is
# sqrt(max(m, n)), i.e. Moonlight's 0.2 * sqrt(max(m, n)) times 5 (docs/muon.md).
SCALE_MODES = {
    "spectral": ("match_rms_adamw", 5.0),
    "shape_scaling": ("original", 1.0),
    "unit_rms_norm": ("spectral", 1.0),
}
# --dmuon-* flags and the option of `distributed_muon.options` each sets (Megatron rewrites a
# ``dist_`` prefix, so no flag here starts with it).
FLAG_OPTIONS = {"ns_method": "ns_method", "ns_dtype": "ns_dtype", "comm_dtype": "comm_dtype",
                "owner_strategy": "owner_strategy", "exchange_chunks": "exchange_chunks",
                "scale": "scale", "per_head": "per_head"}
# Where Megatron's defaults are not the table's, and why.
FLAG_DEFAULTS = {flag: surface_default(FLAG_OPTIONS[flag], default, why)[1:]
                 for flag, default, why in (
    ("ns_method", "standard", "Megatron's Muon iterates the standard way"),
    ("ns_dtype", None, "the one --muon-fp32-matmul-prec gives (medium: bf16, high and highest: "
                       "fp32)"),
    ("scale", None, "the one --muon-scale-mode and --muon-extra-scale-factor give"),
)}
# --dmuon-* flags: type, default, help.
FLAGS: dict[str, tuple[type, Any, str]] = {
    **{flag: (OPTIONS[option].flag_type,
              FLAG_DEFAULTS[flag][0] if flag in FLAG_DEFAULTS else OPTIONS[option].default,
              OPTIONS[option].help + (f"; default: {FLAG_DEFAULTS[flag][1]}"
                                      if flag in FLAG_DEFAULTS else ""))
       for flag, option in FLAG_OPTIONS.items()},
    # Megatron's own: which parameters get Muon is its rule (`megatron_parity.uses_muon`).
    "adamw": (str, None, "comma-separated parameter-name globs to update with AdamW instead "
                         "of Muon, e.g. '*position_embeddings*'"),
}


class _MainSharding:
    """`MegatronSharding` of the model parameters, stored in the wrapper's main params.

    ``mains[id(model_param)] = (main, (start, stop) or None)``: this rank's fp32 main param, a
    flat range of the model param's local storage under the distributed optimizer (None: a
    whole copy). A model param with no main here holds nothing of the matrix on this rank.
    ``replicas[id(model_param)]`` overrides the replica id (one copy spread over data parallel).
    """

    def __init__(self, base: MegatronSharding, mains: dict[int, tuple[torch.Tensor, Any]],
                 replicas: dict[int, int], device: torch.device) -> None:
        self.base, self.mains, self.replicas = base, mains, replicas
        self.group, self.rank = base.group, base.rank
        self._empty = torch.empty(0, device=device)

    def shape(self, param: torch.Tensor) -> torch.Size:
        return self.base.shape(param)

    def local(self, param: torch.Tensor) -> torch.Tensor:
        main = self.mains.get(id(param))
        return main[0] if main is not None else self._empty

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        main = self.mains.get(id(param))
        return main[0].grad if main is not None else None

    def regions(self, param: torch.Tensor, spec: MatrixSpec) -> list[Region]:
        main = self.mains.get(id(param))
        if main is None:
            return []
        regions = self.base.regions(param, spec)
        if main[1] is None:
            return regions
        # The rule `dmuon plan` cuts its distributed-optimizer tables by.
        return restrict_regions(regions, *main[1], self.replicas[id(param)])


class MegatronMuon(Optimizer):
    """The torch optimizer Megatron's wrappers hold for ``--optimizer dmuon``.

    ``param_groups`` are Megatron's (`megatron_internals.param_groups`), of model params until the
    wrapper swaps in its main params; `bind` then builds the `DistributedMuon` that steps them.
    ``options`` are `DistributedMuon` group options; ``scale_factor`` multiplies Muon updates
    (Megatron's ``--muon-extra-scale-factor`` and spectral mode): applied as ``lr * f`` with
    weight decay ``wd / f``, the same decoupled update. ``per_head`` (``--dmuon-per-head``):
    the stage's attention weights are orthogonalized one head at a time (`megatron_heads`).
    ``row_blocks`` (name glob -> blocks; ``config.dmuon_row_blocks``) splits fused weights
    Megatron does not know, as `muon_param_groups` does.
    """

    def __init__(self, param_groups: list[dict[str, Any]], sharding: MegatronSharding, *,
                 split_qkv: bool = True, scale_factor: float = 1.0,
                 comm_dtype: str = "bf16", owner_strategy: str = "lpt", exchange_chunks: int = 1,
                 marked: bool = False, adamw: Sequence[str] = (), per_head: bool = False,
                 row_blocks: dict[str, Sequence[int]] | None = None, **options: Any) -> None:
        if not scale_factor > 0:
            raise ValueError(f"--muon-extra-scale-factor must be > 0 (got {scale_factor})")
        owner_strategy = take_renamed_option(options, "plan", owner_strategy,
                                             where="MegatronMuon")
        # Checked before Megatron builds anything around it.
        wide = check_optimizer_wide({"comm_dtype": comm_dtype, "owner_strategy": owner_strategy,
                                     "exchange_chunks": exchange_chunks})
        self.exchange_chunks = exchange_chunks
        # Which params get Muon (`megatron_parity.uses_muon`): Megatron's rule when the model
        # marks its embeddings, else by shape and name; ``adamw`` globs always go to AdamW.
        self.marked, self.adamw = marked, tuple(adamw)
        self.row_blocks = {pattern: tuple(b) for pattern, b in (row_blocks or {}).items()}
        self.options = group_defaults(**options)
        self.sharding, self.split_qkv, self.scale_factor = sharding, split_qkv, scale_factor
        self.comm_dtype, self.owner_strategy = wide["comm_dtype"], owner_strategy
        # Over the whole stage (every chunk), so the dense and the expert optimizer agree.
        self.head_blocks = (per_head_blocks(sharding.chunks, sharding, self._uses_muon)
                            if OPTIONS["per_head"].check("per_head", per_head) else {})
        super().__init__(param_groups, {"lr": self.options["lr"]})
        self.model_params = [list(g["params"]) for g in self.param_groups]
        self.inner: DistributedMuon | None = None
        self._links: list[tuple[torch.Tensor, torch.Tensor, Any]] = []  # (model, main, span)
        self.steps = 0  # optimizer steps taken (not skipped): Megatron's common "step"
        self._inner_of: list[tuple[int, bool]] = []  # inner group -> (outer group, is Muon)

    def bind(self, mains: Sequence[Sequence[tuple[torch.Tensor, Any]]],
             dp_group: dist.ProcessGroup | None) -> None:
        """Build the inner optimizer once the wrapper has its main params.

        ``mains[g][i] = (main, (start, stop) or None)`` for model param ``i`` of group ``g``
        (``main`` None when this rank holds none of it); ``dp_group``: the group a
        distributed optimizer splits each copy over (None without one).
        """
        table, replicas = {}, {}
        for params, pairs in zip(self.model_params, mains, strict=True):
            for p, (main, span) in zip(params, pairs, strict=True):
                if main is not None:
                    table[id(p)] = (main, span)
                    self._links.append((p, main, span))
        if dp_group is not None:
            replicas = _shared_replicas(self.sharding, self.model_params, dp_group)
        device = next((m.device for m, _ in table.values()), torch.device("cpu"))
        sharding = _MainSharding(self.sharding, table, replicas, device)
        groups = []
        for gi, params in enumerate(self.model_params):
            for sub, is_muon in self._split(params):
                if sub["params"]:
                    groups.append({**self.options, **sub})
                    self._inner_of.append((gi, is_muon))
        # The inner optimizer reads lr and weight decay from this one's groups (which Megatron's
        # scheduler writes) and keeps its state in this one's, keyed by main param (what
        # Megatron's checkpoints save).
        main_of = {id(p): main for p, main, _ in self._links}
        elsewhere: dict[torch.Tensor, dict[str, Any]] = {}  # params with no main here: empty

        def state_of(p: torch.Tensor) -> dict[str, Any]:
            main = main_of.get(id(p))
            return self.state[main] if main is not None else elsewhere.setdefault(p, {})
        self.inner = DistributedMuon(groups, sharding=sharding, comm_dtype=self.comm_dtype,
                                     owner_strategy=self.owner_strategy,
                                     exchange_chunks=self.exchange_chunks,
                                     group_overrides=self._step_options, external_state=state_of)

    def _split(self, params: list[torch.Tensor]) -> Iterable[tuple[dict[str, Any], bool]]:
        """One Megatron group -> Muon params, one group per split QKV weight, AdamW params
        (`megatron_parity.uses_muon` says which)."""
        muon, adamw = [], []
        for p in params:
            info = self.sharding.info(p)
            matrix = self._uses_muon(p)
            blocks = self.sharding.row_blocks(
                p, heads=self.head_blocks, named=self.row_blocks,
                split_qkv=self.split_qkv) if matrix else None
            if blocks is not None:
                yield {"params": [p], "param_names": [info.name], "use_muon": True,
                       "row_blocks": blocks}, True
            else:
                (muon if matrix else adamw).append((p, info.name))
        for chosen, use in ((muon, True), (adamw, False)):
            yield {"params": [p for p, _ in chosen], "param_names": [n for _, n in chosen],
                   "use_muon": use}, use

    def _uses_muon(self, p: torch.Tensor) -> bool:
        info = self.sharding.info(p)
        return parity.uses_muon(p, info.name, info.shape, marked=self.marked, adamw=self.adamw)

    def _step_options(self, inner_group: int) -> dict[str, float]:
        """An inner group's lr and weight decay, from the Megatron group it came from: for
        Muon ``lr * f`` and ``wd / f`` (the same decoupled update, scaled by f)."""
        gi, is_muon = self._inner_of[inner_group]
        outer = self.param_groups[gi]
        f = self.scale_factor if is_muon else 1.0
        # Megatron's scheduler sets weight_decay (times wd_mult); without it, the option.
        wd = outer.get("weight_decay", self.options["weight_decay"] * outer.get("wd_mult", 1.0))
        return {"lr": outer["lr"] * f, "weight_decay": wd / f}

    def init_state(self) -> None:
        """Zero state for every main param (Megatron's ``init_state_fn``, before a load)."""
        keys = {id(p): k for p, k in self.state_keys()}
        for p, main, _ in self._links:
            state = self.state[main]
            if state:
                continue
            if "momentum_buffer" in keys[id(p)]:
                state["momentum_buffer"] = torch.zeros_like(main)
            else:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(main),
                             exp_avg_sq=torch.zeros_like(main))

    def state_keys(self) -> list[tuple[torch.Tensor, list[str]]]:
        """Every model param of this optimizer (the same list on every rank) and the tensors
        a checkpoint keeps of it: ``fp32_param``, then its optimizer state."""
        muon = {id(p) for g, (_, is_muon) in zip(self.inner.param_groups, self._inner_of,
                                                  strict=True) if is_muon for p in g["params"]}
        return [(p, ["fp32_param", "momentum_buffer"] if id(p) in muon
                 else ["fp32_param", "exp_avg", "exp_avg_sq"])
                for params in self.model_params for p in params]

    def main_shards(self) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
        """``(model param, main, (start, stop) or None)`` of every main held here."""
        return list(self._links)

    def set_steps(self, steps: int) -> None:
        """Restore the step count (AdamW's bias correction) after loading a checkpoint."""
        self.steps = steps
        for _, main, _ in self._links:
            state = self.state[main]
            if "step" in state:
                state["step"].fill_(float(steps))

    @property
    def ns_matrices(self) -> int:
        return self.inner.ns_matrices if self.inner is not None else 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self.inner is None:
            raise RuntimeError("MegatronMuon.bind(...) was not called: build it through "
                               "get_dmuon_optimizer (or Megatron's get_megatron_optimizer "
                               "with optimizer='dmuon')")
        loss = self.inner.step(closure)
        if not self.inner.last_step_skipped:
            self.steps += 1
        return loss


def _shared_replicas(sharding: MegatronSharding, groups: list[list[torch.Tensor]],
                     dp_group: dist.ProcessGroup) -> dict[int, int]:
    """Replica id of each model param whose copy a distributed optimizer spreads over
    ``dp_group``: the smallest replica id of the DP peers' copies (one MIN all-reduce)."""
    params = [p for ps in groups for p in ps]
    ids = torch.tensor([sharding.info(p).replica for p in params], dtype=torch.int64)
    if dist.get_backend(dp_group) == "nccl":
        ids = ids.cuda()
    dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=dp_group)
    return {id(p): int(r) for p, r in zip(params, ids.tolist(), strict=True)}


# ---------------------------------------------------------------------------- building


def dmuon_options(config: Any) -> dict[str, Any]:
    """`MegatronMuon` keywords from a Megatron ``OptimizerConfig``: the ``--muon-*`` options
    we share keep their meaning, ``dmuon_*`` attributes (the ``--dmuon-*`` flags) add ours."""
    mode = config.muon_scale_mode
    if mode not in SCALE_MODES:
        raise ValueError(f"--muon-scale-mode {mode} is not supported by --optimizer dmuon: use "
                         f"one of {sorted(SCALE_MODES)} (or --dmuon-scale)")
    coefficients = getattr(config, "muon_coefficient_type", "quintic")  # 0.16: quintic only
    schedule = parity.ns_schedule(coefficients, config.muon_num_ns_steps)
    scale, factor = SCALE_MODES[mode]
    explicit = getattr(config, "dmuon_scale", None)
    if explicit is not None:
        scale, factor = explicit, 1.0
    nesterov = getattr(config, "muon_nesterov", getattr(config, "muon_use_nesterov", False))
    ns_dtype = getattr(config, "dmuon_ns_dtype", None) or parity.ns_dtype(
        getattr(config, "muon_fp32_matmul_prec", "medium"))
    adamw = getattr(config, "dmuon_adamw", None) or ""
    strategy = getattr(config, "dmuon_owner_strategy", FLAGS["owner_strategy"][1])
    if getattr(config, "dmuon_plan", None) is not None:  # its former name, set in Python
        strategy = take_renamed_option({"plan": config.dmuon_plan}, "plan", strategy,
                                       where="config.dmuon_plan", category=FutureWarning)
    return {
        "lr": config.lr, "weight_decay": config.weight_decay,
        "momentum": config.muon_momentum, "nesterov": bool(nesterov),
        "ns_steps": config.muon_num_ns_steps, "ns_schedule": schedule, "scale": scale,
        "scale_factor": factor * config.muon_extra_scale_factor,
        "split_qkv": config.muon_split_qkv, "ns_dtype": ns_dtype,
        "adamw": tuple(g.strip() for g in adamw.split(",") if g.strip()),
        # Python only (no flag): {name glob: row blocks} for fused weights Megatron does not know.
        "row_blocks": dict(getattr(config, "dmuon_row_blocks", None) or {}),
        "adamw_betas": (config.adam_beta1, config.adam_beta2), "adamw_eps": config.adam_eps,
        "owner_strategy": strategy,
        **{name: getattr(config, f"dmuon_{name}", default)
           for name, (_, default, _) in FLAGS.items()
           if name not in ("scale", "ns_dtype", "adamw", "owner_strategy")},
    }


def check_supported(config: Any) -> None:
    """Refuse, before anything is built, what `MegatronMuon` does not support."""
    version = _megatron_version()
    if version is not None and not _in_range(version):
        raise RuntimeError(f"megatron-core {version} is outside the range --optimizer dmuon "
                           f"supports ({SUPPORTED}): pip install 'megatron-core{SUPPORTED}'")
    refusals = {
        "fp16": "fp16 loss scaling is not supported with --optimizer dmuon: use --bf16",
        "optimizer_cpu_offload": "--optimizer-cpu-offload is not supported with --optimizer "
                                 "dmuon: DistributedMuon steps on the GPU",
        "use_precision_aware_optimizer": "--use-precision-aware-optimizer is not supported "
                                         "with --optimizer dmuon",
        "overlap_param_gather_with_optimizer_step": "--overlap-param-gather-with-optimizer-step"
                                                    " is not supported with --optimizer dmuon",
    }
    for attr, message in refusals.items():
        if getattr(config, attr, False):
            raise ValueError(message)
    if not getattr(config, "decoupled_weight_decay", True):
        raise ValueError("decoupled_weight_decay=False (Adam with L2 regularization) is not "
                         "supported with --optimizer dmuon: its AdamW part decays weights "
                         "decoupled, as Megatron's default")
    scalar = getattr(config, "muon_scalar_optimizer", "adam")
    if scalar != "adam":
        raise ValueError(f"--muon-scalar-optimizer {scalar} is not supported with --optimizer "
                         "dmuon: its non-matrix parameters get AdamW (--muon-scalar-optimizer "
                         "adam)")


def get_dmuon_optimizer(config: Any, model_chunks: list[nn.Module],
                        config_overrides: dict | None = None,
                        use_gloo_process_groups: bool = True,
                        pg_collection: Any = None, **_: Any) -> Any:
    """Megatron's optimizer for ``config.optimizer == "dmuon"``: per pipeline stage, one
    wrapper for dense and one for expert parameters (Megatron reduces their gradients over
    different groups), each a `MegatronMuon` inside Megatron's ``DistributedOptimizer``
    (``config.use_distributed_optimizer``), ``Float16OptimizerWithFloat16Params`` (bf16) or
    ``FP32Optimizer``, chained like Megatron's own."""
    from megatron.core.optimizer import ChainedOptimizer

    check_supported(config)
    options = dmuon_options(config)
    sharding = MegatronSharding(model_chunks)
    options["marked"] = parity.marks_embeddings(p for c in model_chunks for p in c.parameters())
    groups = internals.param_groups(model_chunks, config, config_overrides)
    distributed = bool(config.use_distributed_optimizer)
    if distributed and internals.optimizer_instances(model_chunks) != 1:
        raise ValueError("--num-distributed-optimizer-instances > 1 is not supported with "
                         "--optimizer dmuon")
    wrappers = []
    for expert in (False, True):
        mine = [g for g in groups if g["is_expert_parallel"] == expert]
        if not mine:
            continue
        inner = MegatronMuon(mine, sharding, **options)
        if distributed:
            wrapper, dp = internals.distributed_wrapper(inner, config, model_chunks, expert,
                                                        _init_state_fn)
            shards = internals.main_shards(wrapper)
            inner.bind([[shards.get(id(p), (None, None)) for p in params]
                        for params in inner.model_params], dp)
            _model_space_checkpoints(wrapper, inner, dp)
        else:
            wrapper = internals.local_wrapper(inner, config, expert, _init_state_fn)
            # Group g's i-th param is now the main copy of model param i (the same tensor
            # for fp32 params).
            inner.bind([[(main, None) for main in g["params"]] for g in inner.param_groups],
                       None)
        wrappers.append(wrapper)
    return ChainedOptimizer(wrappers)


def _init_state_fn(opt: MegatronMuon, config: Any = None) -> None:
    opt.init_state()


def _megatron_version() -> str | None:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _in_range(version: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return version in SpecifierSet(SUPPORTED)


# ---------------------------------------------------------------------------- registration


def add_dmuon_arguments(parser: Any) -> Any:
    """Add ``dmuon`` to Megatron's ``--optimizer`` and the ``--dmuon-*`` flags."""
    internals.add_optimizer_choice(parser, "dmuon")
    group = parser.add_argument_group("distributed_muon", "--optimizer dmuon only")
    for name, (kind, default, text) in FLAGS.items():
        flag, dest = f"--dmuon-{name.replace('_', '-')}", f"dmuon_{name}"
        if kind is bool:  # a switch, as dmuon train's --per-head
            group.add_argument(flag, action="store_true", default=default, dest=dest, help=text)
            continue
        group.add_argument(flag, type=kind, default=default, dest=dest, help=text)
        if name in FLAG_OPTIONS:  # its former names stay flags, with a line saying which to use
            add_former_flags(group, FLAG_OPTIONS[name], flag, dest, prefix="--dmuon-", type=kind)
    return parser


def _build_from_training_args(config: Any, model_chunks: Any, **kwargs: Any) -> Any:
    """`get_dmuon_optimizer`, with the ``--dmuon-*`` flags of Megatron-LM's parsed arguments
    (which ``OptimizerConfig`` lacks) copied onto ``config`` first."""
    training_args = internals.training_args()
    if training_args is not None:
        for name in FLAGS:
            setattr(config, f"dmuon_{name}", getattr(training_args, f"dmuon_{name}",
                                                     FLAGS[name][1]))
    return get_dmuon_optimizer(config, model_chunks, **kwargs)


def _patched_get_optimizer(original: Callable) -> Callable:
    """``original`` (a ``get_megatron_optimizer``), building DistributedMuon for dmuon."""
    return internals.route_dmuon(original, _build_from_training_args)


def register() -> None:
    """Patch Megatron (idempotent): ``get_megatron_optimizer`` where it is bound, and with
    ``megatron.training`` the argument parser and its validation (`megatron_internals`)."""
    internals.patch_get_megatron_optimizer(_patched_get_optimizer)
    internals.patch_emerging_optimizer()
    if internals.patch_arguments(add_dmuon_arguments):
        internals.patch_validate_args()


register()

__all__ = ["MegatronMuon", "add_dmuon_arguments", "dmuon_options", "get_dmuon_optimizer",
           "register"]
