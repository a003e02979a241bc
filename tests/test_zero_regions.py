"""`dmuon plan`'s ZeRO tables equal what real DeepSpeed engines hold (ZeRO-1/2/3, gloo, CPU).

Three ranks build a ``deepspeed.initialize`` engine per stage with ``"type": "DistributedMuon"``
and step once, so every flat partition becomes a `DeepSpeedMuon` unit. Each unit's layout (the
regions its `FlatSharding` reported, gathered over the group) and this rank's fragments must
equal the prediction from shapes alone (`zero_regions`, `launch.layouts.units`). Sizes are
chosen so that partitions cut parameters inside rows, ZeRO-1/2's padding matters (1616 Muon
values over 3 ranks) and ZeRO-3 makes several sub-groups.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from multiproc import run_ranks
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

from distributed_muon.integrations.zero_regions import (  # noqa: E402
    partition_fragments,
    sub_groups,
    zero3_fragments,
)
from distributed_muon.launch.layouts import units  # noqa: E402

from distributed_muon.cluster import ModelParam, ParallelLayout  # noqa: E402

WORLD, D = 3, 16
SUB_GROUP = 500  # values per rank: ZeRO-3 closes a sub-group after fc1 + fc2 (262 + 262)
# The Muon matrices (biases go to AdamW, in their own flat partitions).
MUON = [ModelParam("fc1.weight", (49, D), 0), ModelParam("fc2.weight", (D, 49), 0),
        ModelParam("fc3.weight", (3, D), 0)]
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("deepspeed_comm_op")]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, 49), nn.Linear(49, D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))).square().mean()


def _engine_units(stage: int, world: int) -> list[dict]:
    """Step one engine at ``stage``; per Muon unit: names, gathered piece table, fragments."""
    torch.manual_seed(0)
    model = Tiny()
    cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * world,
           "optimizer": {"type": "DistributedMuon", "params": {"lr": 0.02}},
           "zero_optimization": {"stage": stage, "sub_group_size": SUB_GROUP},
           "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    engine.backward(engine(torch.randn(2, D)))
    engine.step()
    opt = engine.optimizer.optimizer  # DeepSpeed's ZeRO wrapper holds the DeepSpeedMuon
    names = {p: n for n, p in model.named_parameters()}
    out = []
    for unit in opt._units.values():
        inner = unit.optimizer
        if not inner.param_groups[0]["use_muon"]:
            continue
        params = inner.param_groups[0]["params"]
        out.append({"names": [names[p] for p in params],
                    "table": inner.layout.table.copy(),
                    "fragments": {names[p]: f for p, f in unit.sharding.fragments.items()}})
    return out


def _worker(rank: int, world: int) -> dict[int, list[dict]]:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    import distributed_muon.integrations.deepspeed  # noqa: F401  (registers the type)

    deepspeed.init_distributed(dist_backend="gloo")
    return {stage: _engine_units(stage, world) for stage in (1, 2, 3)}


@pytest.fixture(scope="module")
def live():
    return run_ranks(WORLD, _worker, timeout=240)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_planned_zero_units_are_the_live_ones(live, stage):
    planned = units(MUON, ParallelLayout(f"zero{stage}", WORLD, sub_group_size=SUB_GROUP))
    for got in live:
        assert [u["names"] for u in got[stage]] == [u.names for u in planned]
        for unit, want in zip(got[stage], planned, strict=True):
            assert np.array_equal(unit["table"], want.layout(0).table), (stage, want.name)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_predicted_fragments_are_deepspeeds(live, stage):
    numels = [int(np.prod(p.shape)) for p in MUON]
    if stage == 3:
        groups = sub_groups([-(-n // WORLD) for n in numels], SUB_GROUP)
        predicted = [zero3_fragments([numels[i] for i in g], WORLD) for g in groups]
    else:
        groups = [list(range(len(MUON)))]
        predicted = [partition_fragments(numels, WORLD)]
    for rank, got in enumerate(live):
        for unit, idx, frags in zip(got[stage], groups, predicted, strict=True):
            want = {MUON[i].name: tuple(row[1:]) for i, per in zip(idx, frags, strict=True)
                    for row in per.tolist() if row[0] == rank}
            assert unit["fragments"] == want, (stage, rank)
