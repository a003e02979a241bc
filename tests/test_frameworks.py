"""DistributedMuon as a drop-in optimizer for real DDP- and FSDP2-wrapped models (gloo)."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from torch import nn

from distributed_muon import DistributedMuon

STEPS, MICRO = 3, 4  # micro-batch of 4 rows per rank per accumulation step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 8))


def _data(world: int, accum: int):
    gen = torch.Generator().manual_seed(1)
    n = world * accum * MICRO
    return torch.randn(STEPS, n, 16, generator=gen), torch.randn(STEPS, n, 8, generator=gen)


def _optimizer(model):
    return DistributedMuon(model.named_parameters(), lr=0.05, weight_decay=0.1,
                           ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")


def _worker(rank, world, wrapper, accum):
    model = _model()
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    opt = _optimizer(model)
    X, Y = _data(world, accum)
    for step in range(STEPS):
        # This rank's rows of the global batch, in ``accum`` micro-batches.
        xs = X[step].view(world, accum, MICRO, 16)[rank]
        ys = Y[step].view(world, accum, MICRO, 8)[rank]
        for micro in range(accum):
            loss = nn.functional.mse_loss(model(xs[micro]), ys[micro]) / accum
            loss.backward()
        opt.step()
        opt.zero_grad()
    from torch.distributed.tensor import DTensor

    full = [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for p in model.parameters()]
    return {"params": full, "ns": opt.ns_matrices}


def _single_process(world: int, accum: int):
    model = _model()
    opt = _optimizer(model)
    X, Y = _data(world, accum)
    for step in range(STEPS):
        nn.functional.mse_loss(model(X[step]), Y[step]).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("wrapper,world,accum", [("ddp", 2, 1), ("fsdp2", 2, 2),
                                                 ("fsdp2", 3, 1), ("ddp", 3, 2)])
def test_wrapped_model_trains_like_one_process(wrapper, world, accum):
    results = run_ranks(world, _worker, wrapper, accum)
    expected = _single_process(world, accum)
    initial = [p.detach() for p in _model().parameters()]
    for rank, res in enumerate(results):
        for got, want, p0 in zip(res["params"], expected, initial):
            err = float((got - want).norm() / (want - p0).norm())
            assert err < 1e-5, (wrapper, rank, err)
    # Two Muon matrices; NS ran once per optimizer step, not once per micro-batch.
    assert sum(r["ns"] for r in results) == 2 * STEPS
