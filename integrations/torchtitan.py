"""torchtitan: ``optimizer_name="DistributedMuon"`` in ``OptimizersContainer.Config``.

torchtitan resolves an optimizer name to a factory called as
``factory(param_groups, **optimizer_factory_kwargs)`` (``OptimizersContainer.
_resolve_optimizer_factory``); register `distributed_muon_factory` there (docs/trainers.md).
Its groups carry ``param_names``, so the core's name rule sends embeddings and the ``output``
head to AdamW. Imports nothing of torchtitan.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from distributed_muon.optimizer import DistributedMuon

# Keys torchtitan adds to every group for torch's own optimizers (its ``implementation``).
_IMPLEMENTATION_KEYS = ("fused", "foreach")


def distributed_muon_factory(param_groups: Iterable[dict[str, Any]],
                             **optimizer_wide: Any) -> DistributedMuon:
    """A `DistributedMuon` over torchtitan's param groups of one model part.

    Group keys are `DistributedMuon` options (``lr``, ``weight_decay``, ``use_muon``, ...);
    ``optimizer_wide`` (torchtitan's ``optimizer_factory_kwargs_by_name["DistributedMuon"]``)
    takes the optimizer-wide ones (``comm_dtype``, ``plan``, ``exchange_chunks``, ...).
    """
    groups = []
    for group in param_groups:
        if not group.get("param_names") and group.get("use_muon") is None:
            raise ValueError(
                "distributed_muon_factory: a param group has no param_names, so embeddings and "
                "the output head cannot be told from matrices: pass torchtitan's groups (they "
                "carry names) or set use_muon on the group")
        groups.append({k: v for k, v in group.items() if k not in _IMPLEMENTATION_KEYS})
    return DistributedMuon(groups, **optimizer_wide)
