"""Per-head NS under real DeepSpeed engines (ZeRO-1/2/3, gloo on CPU) from DeepSpeed's own
JSON key ``"per_head_muon": true``: flat partitions that cut heads give the update of one
process orthogonalizing every head of the whole matrices."""

from __future__ import annotations

import os

import pytest
import torch
from multiproc import run_ranks
from test_per_head import EXPECTED, HD, LR, WD, D, _net

deepspeed = pytest.importorskip("deepspeed")

from distributed_muon.integrations.replicated import ReplicatedSharding  # noqa: E402

from distributed_muon import DistributedMuon, muon_param_groups  # noqa: E402

MICRO, T, STEPS = 2, 5, 2
FP32 = {"ns_dtype": "fp32", "comm_dtype": "fp32"}
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("deepspeed_comm_op")]


def _data(world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(STEPS, world * MICRO, T, D, generator=gen)


def _worker(rank: int, world: int, stage: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param
    from distributed_muon.integrations.deepspeed import FlatSharding

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    import distributed_muon.integrations.deepspeed  # noqa: F401  (registers the type)

    deepspeed.init_distributed(dist_backend="gloo")
    net = _net()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "train_batch_size": MICRO * world, "gradient_clipping": 0.0,
              "steps_per_print": 10**9, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "DistributedMuon", "params": {
                  "lr": LR, "weight_decay": WD, "per_head_muon": True, **FP32}}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=config)
    for batch in _data(world).view(STEPS, world, MICRO, T, D):
        engine.backward(engine(batch[rank]))
        engine.step()
    opt = engine.basic_optimizer
    blocks = {n: g["row_blocks"] for g, names in zip(opt._groups, opt.group_names)
              if g["use_muon"] for n in names}
    # Whether some partition starts or ends inside a head of a per-head matrix.
    by_param = {p: n for n, p in net.named_parameters()}
    cuts = any((start % (HD * D) or (start + length) % (HD * D)) and by_param[p] in EXPECTED
               for unit in opt._units.values() if isinstance(unit.sharding, FlatSharding)
               for p, (start, length, _) in unit.sharding.fragments.items())
    full = [safe_get_full_fp32_param(p).detach().clone() for p in net.parameters()]
    return {"params": full, "row_blocks": blocks, "cuts": cuts}


def _reference(world: int) -> list[torch.Tensor]:
    """One process, the core optimizer with per-head groups, the whole global batch."""
    net = _net()
    opt = DistributedMuon(muon_param_groups(net, per_head=True), lr=LR, weight_decay=WD,
                          sharding=ReplicatedSharding(None), **FP32)
    for batch in _data(world):
        net(batch).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_per_head_muon_from_the_json(stage):
    world = 2
    want = _reference(world)
    for r in run_ranks(world, _worker, stage, timeout=300):
        assert {n: b for n, b in r["row_blocks"].items() if b} == EXPECTED
        assert r["cuts"]  # a flat range cuts a head: the case that needs the layout
        for got, w in zip(r["params"], want, strict=True):
            # Gradients reduced across ranks vs one batch: float rounding only.
            torch.testing.assert_close(got, w, rtol=2e-5, atol=2e-6)


def test_per_head_muon_must_be_a_bool():
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

    with pytest.raises(ValueError, match="per_head_muon"):
        DeepSpeedMuon(muon_param_groups(_net()), per_head_muon="yes")


def test_per_head_muon_without_an_engine_names_the_fix():
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

    with pytest.raises(ValueError, match=r"muon_param_groups\(model, per_head=True\)"):
        DeepSpeedMuon(muon_param_groups(_net()), per_head_muon=True)
