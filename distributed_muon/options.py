"""Every option of `DistributedMuon`, once: name, default, check, help, and where it is set.

The one table (`OPTIONS`). What restates options derives from it: `DistributedMuon`'s defaults
and checks, the DeepSpeed JSON keys, Megatron's ``--dmuon-*`` flags and the ``dmuon bench`` /
``dmuon train`` flags. A surface that defaults an option differently says so, and why, next to
its own code (`surface_default`); ``tests/test_options.py`` checks every surface against this
table.

Scopes:

- ``group``: a param-group key, and a keyword of `DistributedMuon` (its default for groups);
- ``group_only``: a param-group key only (how a group's parameters are seen as matrices);
- ``optimizer``: optimizer-wide, a keyword of `DistributedMuon` only;
- ``groups``: how `distributed_muon.params.muon_param_groups` builds the groups.

Checks take ``(name, value)`` and return the value normalized (dtypes to their short names in
groups, to torch dtypes optimizer-wide), or raise a ValueError that names the option and the fix.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distributed_muon.cost import resolve_ns_cost
from distributed_muon.dtypes import COMM_DTYPES, NS_DTYPES, dtype_name, parse_dtype
from distributed_muon.exchange import check_chunks
from distributed_muon.orthogonalize import NS_METHODS, SCHEDULES, resolve_schedule
from distributed_muon.params import MATRIX_VIEWS
from distributed_muon.plan import STRATEGIES
from distributed_muon.scale import SCALE_MODES

Check = Callable[[str, Any], Any]
MOMENTUM_FORMS = ("ema", "sum")
SCOPES = ("group", "group_only", "optimizer", "groups")


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid: use one of {list(choices)}")


def check_range(option: str, value: float, low: float, high: float = math.inf) -> None:
    if not isinstance(value, (int, float)) or not (low <= value <= high) or math.isnan(value):
        bound = f"[{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{option}={value!r} is not valid: must be a number {bound}")


def _number(low: float, high: float = math.inf, *, optional: bool = False) -> Check:
    def check(name: str, value: Any) -> Any:
        if not (optional and value is None):
            check_range(name, value, low, high)
        return value
    return check


def _positive(name: str, value: Any) -> Any:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} is not valid: must be > 0")
    return value


def _one_of(choices: tuple) -> Check:
    def check(name: str, value: Any) -> Any:
        check_choice(name, value, choices)
        return value
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid: must be true or false")
    return value


def _integer(low: int, high: int | None = None, *, zero_means: str = "") -> Check:
    def check(name: str, value: Any) -> int:
        bad = not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high)
        if bad:
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{name}={value!r} is not valid: must be an integer {bound}"
                             f"{zero_means}")
        return value
    return check


def _schedule(name: str, value: Any) -> Any:
    resolve_schedule(value)
    return value


def _ns_dtype(name: str, value: Any) -> str:
    return dtype_name(parse_dtype(value, name, NS_DTYPES))


def _comm_dtype(name: str, value: Any) -> Any:
    return parse_dtype(value, name, COMM_DTYPES)


def _betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name}={value!r} is not valid: must be a pair (beta1, beta2)")
    for i, b in enumerate(value):
        check_range(f"{name}[{i}]", b, 0.0, 1.0)
    return tuple(float(b) for b in value)


def _tristate(name: str, value: Any) -> Any:
    if value not in (True, False, None):
        raise ValueError(f"{name}={value!r} is not valid: use true, false or none")
    return value


def _chunks(name: str, value: Any) -> int:
    check_chunks(value)
    return value


def _ns_cost(name: str, value: Any) -> Any:
    return resolve_ns_cost(value)


def _anything(name: str, value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Option:
    """One option. ``flag_type``: its type on a command line (None: structured, Python or JSON
    only); ``choices``: the values a flag offers."""

    name: str
    default: Any
    help: str
    scope: str
    check: Check = _anything
    flag_type: type | None = None
    choices: tuple | None = field(default=None)


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("lr", 1e-3, "learning rate of the Muon update (and of AdamW unless adamw_lr)",
           "group", _number(0.0), float),
    Option("momentum", 0.95, "Muon's momentum coefficient", "group", _number(0.0, 1.0), float),
    Option("nesterov", True, "Nesterov momentum", "group", _bool, bool),
    Option("momentum_form", "ema", "momentum as an average (ema) or a sum (sum)", "group",
           _one_of(MOMENTUM_FORMS), str, MOMENTUM_FORMS),
    Option("weight_decay", 0.0, "decoupled weight decay of the Muon parameters", "group",
           _number(0.0), float),
    Option("scale", "match_rms_adamw", "shape scale of the orthogonalized update", "group",
           _one_of(SCALE_MODES), str, SCALE_MODES),
    Option("ns_schedule", "jordan", "Newton-Schulz coefficients: a name or per-step (a, b, c)",
           "group", _schedule, str, tuple(SCHEDULES)),
    Option("ns_steps", 5, "Newton-Schulz iterations", "group", _integer(1, 100), int),
    Option("ns_dtype", "fp16", "dtype of the Newton-Schulz iteration: bf16, fp16, fp32 or fp64",
           "group", _ns_dtype, str, ("bf16", "fp16", "fp32", "fp64")),
    # Chosen by measurement: docs/muon.md, "Default Newton-Schulz".
    Option("ns_method", "gram", "Newton-Schulz iteration: standard or gram", "group",
           _one_of(NS_METHODS), str, NS_METHODS),
    Option("eps", 1e-7, "Newton-Schulz's normalization eps", "group", _number(0.0), float),
    Option("adamw_lr", None, "AdamW's learning rate (default: lr)", "group",
           _number(0.0, optional=True), float),
    Option("adamw_betas", (0.9, 0.95), "AdamW's (beta1, beta2)", "group", _betas),
    Option("adamw_eps", 1e-8, "AdamW's eps", "group", _positive, float),
    Option("adamw_weight_decay", None, "AdamW's weight decay (default: weight_decay)", "group",
           _number(0.0, optional=True), float),
    Option("adamw_bias_correction", True, "AdamW's bias correction", "group", _bool, bool),
    Option("use_muon", None, "Muon (true), AdamW (false) or by the rules of "
           "distributed_muon.params (none)", "group_only", _tristate),
    Option("row_blocks", None, "split of a fused weight's rows into matrices", "group_only"),
    Option("matrix_view", "experts", "how a >2-D parameter is seen as matrices", "group_only",
           _one_of(MATRIX_VIEWS), str, MATRIX_VIEWS),
    Option("comm_dtype", "bf16", "dtype of the gradient/update exchange: bf16 or fp32",
           "optimizer", _comm_dtype, str, ("bf16", "fp32", "fp64")),
    Option("owner_strategy", "lpt", "owner assignment: lpt (balanced by NS cost) or "
           "round_robin",
           "optimizer", _one_of(STRATEGIES), str, STRATEGIES),
    Option("process_group", None, "the data-parallel group (default: the world)", "optimizer"),
    Option("sharding", None, "a framework adapter (default: inferred from the parameters)",
           "optimizer"),
    # Checked by `QKClip`, which every surface builds at construction.
    Option("qk_clip_tau", None, "QK-clip threshold on max attention logits (none: off)",
           "optimizer", flag_type=float),
    Option("diagnostics_every", 0, "measure every matrix every N steps (0: off)", "optimizer",
           _integer(0, zero_means=" (0: off)"), int),
    Option("ns_cost", None, "plan on this measured NS cost table instead of NS FLOPs",
           "optimizer", _ns_cost, str),
    Option("exchange_chunks", 1, "pipeline the exchange with Newton-Schulz in this many chunks "
           "(1: one all-to-all each way)", "optimizer", _chunks, int),
    # For framework adapters (`distributed_muon.linked`): set in code, never from a config.
    Option("group_overrides", None, "for adapters: param group i's step options, read from the "
           "adapter's own optimizer", "optimizer"),
    Option("external_state", None, "for adapters: each parameter's state, kept in the "
           "adapter's own optimizer", "optimizer"),
    Option("per_head", False, "Newton-Schulz per attention head (Q, K, V rows split into one "
           "matrix per head)", "groups", _bool, bool),
)}

# Param-group keys and their defaults (`DistributedMuon.defaults`).
GROUP_OPTIONS: dict[str, Any] = {
    n: o.default for n, o in OPTIONS.items() if o.scope in ("group", "group_only")}
GROUP_ONLY = tuple(n for n, o in OPTIONS.items() if o.scope == "group_only")
OPTIMIZER_WIDE = tuple(n for n, o in OPTIONS.items() if o.scope == "optimizer")

# Options of other optimizers users pass by habit, and ours that do the same thing.
MISNAMED_OPTIONS = {
    "betas": "adamw_betas (the betas of the AdamW part; Muon's momentum is `momentum`)",
    "adam_betas": "adamw_betas",
    "adjust_lr_fn": "scale (torch.optim.Muon's adjust_lr_fn values are scale modes here)",
}
# Former names of optimizer-wide options, accepted with a DeprecationWarning until the release
# named here. `plan` was the strategy string, while `OwnershipPlan` is the object it builds.
RENAMED_OPTIONS = {"plan": ("owner_strategy", "0.2.0")}


def take_renamed_option(given: dict[str, Any], old: str, current: Any, *,
                        where: str = "DistributedMuon",
                        category: type[Warning] = DeprecationWarning) -> Any:
    """``current``, or the value passed under the former name ``old`` (removed from ``given``,
    with a warning naming the new name and the release that drops the old one). Both at once is
    an error, unless ``current`` is still the table's default. ``where`` names the surface in
    the messages; ``category``: FutureWarning where end users read it (a JSON config)."""
    if old not in given:
        return current
    new, until = RENAMED_OPTIONS[old]
    value = given.pop(old)
    if current != OPTIONS[new].default:
        raise TypeError(f"{where}: pass {new} only ({old} is its former name)")
    warnings.warn(f"{where}: {old} is deprecated and goes away in {until}: use "
                  f"{new}={value!r}", category, stacklevel=3)
    return value


def add_former_flags(parser: Any, option: str, flag: str, dest: str, prefix: str = "--",
                     **kwargs: Any) -> None:
    """Hidden flags (``prefix`` + former name) for the former names of ``option``
    (`RENAMED_OPTIONS`) beside its ``flag``: each sets ``dest`` (``kwargs``: its ``type``,
    ``choices``) and says on stderr which flag to use instead, and until when."""
    for old, (new, until) in RENAMED_OPTIONS.items():
        if new == option:
            parser.add_argument(prefix + old.replace("_", "-"), dest=dest,
                                action=_former_flag(flag, until), default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS, **kwargs)


def _former_flag(flag: str, until: str) -> type[argparse.Action]:
    class Former(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any,
                     option_string: str | None = None) -> None:
            print(f"{parser.prog}: {option_string} is deprecated and goes away in {until}: "
                  f"use {flag}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Former


def unknown_options_error(names: Iterable[str], wide: Iterable[str] = OPTIMIZER_WIDE) -> TypeError:
    """The error for option names `DistributedMuon` does not have: a misnamed one names its
    replacement, otherwise every valid name is listed (``wide``: the optimizer-wide ones the
    caller accepts)."""
    names = sorted(names)
    hints = [f"use {MISNAMED_OPTIONS[n]} instead of {n}" for n in names if n in MISNAMED_OPTIONS]
    if hints:
        return TypeError("DistributedMuon: " + "; ".join(hints))
    wide = list(wide)
    renamed = "".join(f"; {old!r} still works, until {until}, as the former name of {new!r}"
                      for old, (new, until) in RENAMED_OPTIONS.items() if new in wide)
    return TypeError(f"unknown DistributedMuon option(s) {names}: valid options are "
                     f"{sorted(GROUP_OPTIONS)} and the optimizer-wide {wide}{renamed}")


def group_defaults(**options: Any) -> dict[str, Any]:
    """The per-group defaults with ``options`` applied (for adapters that build the optimizer
    from a config). An unknown name raises, listing the valid ones."""
    unknown = set(options) - set(GROUP_OPTIONS)
    if unknown:
        raise unknown_options_error(unknown)
    return {**GROUP_OPTIONS, **options}


def check_group(group: dict[str, Any]) -> None:
    """Check and normalize one param group's options in place; every error names the fix."""
    for key in (*OPTIMIZER_WIDE, *RENAMED_OPTIONS):
        if key in group:
            raise ValueError(f"{key} is optimizer-wide: pass it to DistributedMuon, not a group")
    misnamed = set(group) & set(MISNAMED_OPTIONS)  # would be silently ignored in a group
    if misnamed:
        raise ValueError(str(unknown_options_error(misnamed)))
    for name in GROUP_OPTIONS:
        group[name] = OPTIONS[name].check(name, group[name])


def check_optimizer_wide(values: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer-wide ``values`` checked and normalized (``comm_dtype`` a torch dtype,
    ``ns_cost`` a callable)."""
    return {name: OPTIONS[name].check(name, value) for name, value in values.items()}


def surface_default(name: str, default: Any, why: str) -> tuple[str, Any, str]:
    """A surface's own default for option ``name``, differing from `OPTIONS` for ``why``: the
    record `tests/test_options.py` accepts the difference by."""
    if name not in OPTIONS:
        raise KeyError(f"{name} is not an option of distributed_muon.options.OPTIONS")
    if not why:
        raise ValueError(f"a surface default for {name} needs its reason")
    return name, default, why
