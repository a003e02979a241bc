"""How a framework adapter's own optimizer hands `DistributedMuon` its options and its state.

DeepSpeed and Megatron hold an optimizer of their own shape (flat partitions, main params):
their LR schedulers write its param groups, their checkpoints save and load its ``state``. The
`DistributedMuon` that steps it reads both from there, at the time it needs them, instead of
keeping copies the adapter would have to refresh every step and relink after every load:

- ``group_overrides(i)``: the options of the core's param group ``i`` for this step (``lr``,
  ``weight_decay``, ...), read at each step start (`step_groups`). Only the step's
  hyperparameters are taken from it (`STEP_OPTIONS`); what decides the layout
  (``use_muon``, ``row_blocks``, ``matrix_view``) stays the core group's own, fixed at setup.
- ``external_state(p)``: the state dict of parameter ``p``, looked up at each access
  (`ExternalState`), so a load that replaces the outer ``state`` is seen at once.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from distributed_muon.options import GROUP_ONLY, GROUP_OPTIONS

GroupOverrides = Callable[[int], Mapping[str, Any]]
StateOf = Callable[[torch.Tensor], dict[str, Any]]

# The group keys a step reads: the options but `GROUP_ONLY` (they decide the layout at setup),
# and torch's LR schedulers' ``initial_lr`` (``adamw_lr`` follows ``lr``'s schedule by it).
STEP_OPTIONS = frozenset(GROUP_OPTIONS) - frozenset(GROUP_ONLY) | {"initial_lr"}


def step_groups(groups: Sequence[dict[str, Any]],
                overrides: GroupOverrides | None) -> Sequence[Mapping[str, Any]]:
    """The param groups as one step reads them: ``groups`` themselves, or each overridden by
    ``overrides(i)``'s `STEP_OPTIONS` (a view: nothing is written into ``groups``)."""
    if overrides is None:
        return groups
    return [ChainMap({k: v for k, v in overrides(i).items() if k in STEP_OPTIONS}, group)
            for i, group in enumerate(groups)]


class ExternalState(Mapping[torch.Tensor, dict[str, Any]]):
    """An optimizer's per-parameter ``state`` kept elsewhere: ``state_of(p)`` is looked up at
    every access. ``params()`` lists the parameters it is over (for iteration)."""

    def __init__(self, params: Callable[[], list[torch.Tensor]], state_of: StateOf) -> None:
        self._params, self._state_of = params, state_of

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        return self._state_of(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._params())

    def __len__(self) -> int:
        return len(self._params())
