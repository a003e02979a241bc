"""`units`: a model's exchange groups under a `ParallelLayout`, every rank's regions from
the rule of the framework that layout names (each rule lives next to its live adapter in
``distributed_muon.integrations``, so `dmuon plan` and a real run describe ranks alike)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from distributed_muon.integrations.fsdp2_regions import data_parallel_units
from distributed_muon.integrations.megatron_regions import megatron_units
from distributed_muon.integrations.zero_regions import zero_units

from distributed_muon.cluster import LAYOUTS, ModelParam, ParallelLayout, Unit, stages

# One stage's units: (the stage's parameters, the layout, the stage index) -> units.
Rule = Callable[[list[ModelParam], ParallelLayout, int], list[Unit]]
RULES: dict[str, Rule] = {
    "ddp": data_parallel_units, "fsdp2": data_parallel_units, "hsdp": data_parallel_units,
    "zero1": zero_units, "zero2": zero_units, "zero3": zero_units,
    "megatron": megatron_units, "megatron_do": megatron_units,
}
assert set(RULES) == set(LAYOUTS), "every layout kind needs its rule"


def units(params: Sequence[ModelParam], layout: ParallelLayout) -> list[Unit]:
    """The exchange groups ``layout`` gives ``params``, with every rank's regions: each
    pipeline stage's, stages in order."""
    layout.check(params)
    rule = RULES[layout.kind]
    out = []
    for s, stage_params in enumerate(stages(params, layout.pp)):
        out.extend(rule(stage_params, layout, s))
    return out
