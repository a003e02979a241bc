"""GPU runs: CUDA numerics and NCCL exchange. Skipped without CUDA (CI has none); run on a GPU
machine with ``python -m pytest tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from test_distributed import _groups, full_tensors, rel, single_process

from distributed_muon import DistributedMuon

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_step_matches_cpu():
    params, grads = full_tensors()
    expected = single_process(params, grads)
    ps = [torch.nn.Parameter(t.clone().cuda()) for t in params]
    opt = DistributedMuon(_groups(ps), lr=0.02, weight_decay=0.1, ns_dtype="fp32",
                          ns_method="standard", comm_dtype="fp32")
    for g in grads:
        for p, gi in zip(ps, g):
            p.grad = None if gi is None else gi.cuda()
        opt.step()
    for got, want, p0 in zip(ps, expected, params):
        # TF32 is off by default for matmuls, so fp32 on GPU tracks the CPU closely.
        assert rel(got.detach().cpu() - p0, want - p0) < 1e-4


def _nccl_worker(rank, world, chunks=1):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    params, grads = full_tensors()
    mesh = init_device_mesh("cuda", (world,))
    ps = [torch.nn.Parameter(distribute_tensor(t.cuda(), mesh, [Shard(0)])) for t in params]
    opt = DistributedMuon(_groups(ps), lr=0.02, weight_decay=0.1, ns_dtype="fp32",
                          ns_method="standard", comm_dtype="fp32", exchange_chunks=chunks)
    for g in grads:
        for p, gi in zip(ps, g):
            p.grad = None if gi is None else distribute_tensor(gi.cuda(), mesh, [Shard(0)])
        opt.step()
    return [p.full_tensor().cpu() for p in ps]


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_fsdp2_matches_one_process():
    params, grads = full_tensors()
    expected = single_process(params, grads)
    world = min(4, torch.cuda.device_count())
    for rank, got in enumerate(run_ranks(world, _nccl_worker, backend="nccl", timeout=300)):
        for x, want, p0 in zip(got, expected, params):
            assert rel(x - p0, want - p0) < 1e-4, rank


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_pipelined_exchange_matches_one_process():
    """Async all-to-alls on NCCL streams: a missed wait would unpack stale values. (Bits may
    differ from K=1 on GPUs, where a smaller batched matmul may take another kernel.)"""
    params, grads = full_tensors()
    expected = single_process(params, grads)
    world = min(4, torch.cuda.device_count())
    for rank, got in enumerate(run_ranks(world, _nccl_worker, 3, backend="nccl", timeout=300)):
        for x, want, p0 in zip(got, expected, params):
            assert rel(x - p0, want - p0) < 1e-4, rank


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_zero_on_gpus_matches_one_process(stage):
    """Real DeepSpeed engines on 2 GPUs with NCCL, "type": "DistributedMuon", fp32: the same
    updates as one CPU process with the whole batch, each matrix orthogonalized once."""
    pytest.importorskip("deepspeed")
    from test_deepspeed import MUON_MATRICES, _config, _model, _reference, _train

    steps = 3
    results = run_ranks(2, _train, _config(stage, 2), steps, timeout=300, backend="nccl")
    reference = _reference(2, steps)
    initial = [p.detach() for p in _model().parameters()]
    for r in results:
        for got, want in zip(r["history"], reference):
            for g, w, p0 in zip(got, want, initial):
                assert rel(g - p0, w - p0) < 1e-4
    assert sum(r["ns"] for r in results) == MUON_MATRICES * steps


@cuda
def test_cpu_ranks_on_a_gpu_machine(tmp_path):
    """`--device cpu` keeps every rank off CUDA (FSDP2's default mesh would take it: on a
    one-GPU machine rank 1 failed with 'invalid device ordinal')."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "train",
                           "--device", "cpu", "--nproc", "2", "--steps", "2", "--eval-every", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "muon on 2 ranks (fsdp2, cpu)" in proc.stdout
