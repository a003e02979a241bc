"""`Sharding`: the whole contract a framework adapter implements, and how one is found.

Read this first when writing an adapter. The core sees a framework only through a `Sharding`:
which process group the exchange runs over, each parameter's global shape, this rank's local
storage of a parameter and of its gradient, and which regions of the parameter that storage
holds (`distributed_muon.layout.Region`). Everything else (layout, plan, exchange, Muon math)
is the core's.

When ``DistributedMuon(..., sharding=None)``, `infer_sharding` asks the registered
*recognizers* in turn; the first that claims the parameters gives the `Sharding`. A recognizer
is ``(params, process_group) -> Sharding | None``. Adapters register theirs through the Python
entry-point group ``distributed_muon.shardings`` (declared in their package's
``pyproject.toml``; loaded once, on first use), or at runtime with `register_sharding`. The
core never imports an adapter: it only calls what was registered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Protocol

import torch
import torch.distributed as dist

from distributed_muon.layout import Region
from distributed_muon.params import MatrixSpec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "distributed_muon.shardings"

# Recognizers are tried from the highest priority down. A specific adapter (DTensor, ...) only
# claims parameters it recognizes; the replicated adapter claims any parameters at all, so it
# is the fallback and must be asked last, else it would take DTensor parameters for plain
# replicated ones. Ties go by name, so the order never depends on installation order.
PRIORITY_DEFAULT = 0
PRIORITY_FALLBACK = -100


class Sharding(Protocol):
    """How a framework stores parameters on this rank: the one thing an adapter provides.

    ``group`` is the process group the exchange runs over (None: one process). ``shape`` is a
    parameter's global (logical) shape. ``local`` and ``local_grad`` return this rank's
    contiguous storage of a parameter and of its gradient (same shape; ``None`` when it has no
    gradient this step). ``regions`` says which values of the parameter that storage holds, as
    `Region`s of ``spec``'s ``[E*m, n]`` view (checkpoints pass ``MatrixSpec.storage(shape)``
    for non-Muon parameters).
    """

    group: dist.ProcessGroup | None

    def shape(self, param: torch.Tensor) -> torch.Size: ...

    def local(self, param: torch.Tensor) -> torch.Tensor: ...

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None: ...

    def regions(self, param: torch.Tensor, spec: MatrixSpec) -> list[Region]: ...


Recognizer = Callable[[Sequence[torch.Tensor], dist.ProcessGroup | None], Sharding | None]

# (priority, name, recognizer), tried in sorted order (see `_ordered`).
_recognizers: list[tuple[int, str, Recognizer]] = []
_entry_points_loaded = False


def register_sharding(
    recognizer: Recognizer, *, priority: int | None = None, name: str | None = None
) -> None:
    """Let `infer_sharding` ask ``recognizer`` ``(params, process_group) -> Sharding | None``.

    ``priority`` (default: the recognizer's ``priority`` attribute, else `PRIORITY_DEFAULT`):
    higher is asked first. Registering the same function again changes nothing.
    """
    if any(fn is recognizer for _, _, fn in _recognizers):
        return
    if priority is None:
        priority = getattr(recognizer, "priority", PRIORITY_DEFAULT)
    if name is None:
        name = f"{recognizer.__module__}.{recognizer.__qualname__}"
    _recognizers.append((priority, name, recognizer))


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            recognizer = ep.load()
        except Exception as err:  # noqa: BLE001 - one broken plugin must not hide the others
            log.warning("distributed_muon: sharding entry point %r (%s) failed to load: %s",
                        ep.name, ep.value, err)
            continue
        register_sharding(recognizer, name=ep.name)


def _ordered() -> list[Recognizer]:
    _load_entry_points()
    return [fn for _, _, fn in sorted(_recognizers, key=lambda r: (-r[0], r[1]))]


def infer_sharding(
    params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None = None
) -> Sharding:
    """The `Sharding` of the first registered recognizer that claims ``params``.

    Raises ValueError when none does, naming the fix.
    """
    recognizers = _ordered()
    for recognize in recognizers:
        sharding = recognize(params, process_group)
        if sharding is not None:
            return sharding
    kinds = sorted({type(p).__name__ for p in params})
    raise ValueError(
        f"no sharding adapter recognizes these parameters (types {kinds}; {len(recognizers)} "
        f"recognizer(s) registered): pass sharding= an adapter to DistributedMuon, or register "
        f"one with distributed_muon.sharding.register_sharding or the {ENTRY_POINT_GROUP!r} "
        "entry-point group (is distributed_muon installed, e.g. pip install -e .?)"
    )
