"""The pipelined exchange (``exchange_chunks=K``): the same update bit for bit as K=1.

One launch of 4 ranks runs every world size (1-4, each the first ranks of the launch in a
process group of their own), every layout and every K, so the whole file stays fast. Layouts:
FSDP2 row shards (33 rows: ragged), column shards, ZeRO-like ragged flat ranges of one
concatenated buffer (cuts inside rows and across parameters), and replicas (DDP); matrices of
several shapes in param groups with different NS options (schedule, steps, dtype, method,
scale), 3-D experts that get no gradient on one step, and a fused QKV.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
from multiproc import run_ranks

from distributed_muon import DistributedMuon
from distributed_muon.exchange import chunk_of_matrices
from distributed_muon.layout import Region
from distributed_muon.plan import OwnershipPlan

STEPS = 2
# name, shape, group: matrices of 5 shapes in 3 groups with different NS options.
PARAMS = [
    ("w_uneven", (33, 16), 0),
    ("w_wide", (16, 40), 1),
    ("experts", (3, 8, 12), 0),
    ("qkv", (48, 16), 2),
    ("w_tall", (40, 24), 1),
    ("w_square", (24, 24), 0),
    ("bias", (24,), 3),
]
GROUPS = [
    {},
    {"ns_method": "gram", "ns_schedule": "polar_express", "ns_steps": 6, "scale": "original"},
    {"row_blocks": (16, 16, 16), "ns_dtype": "fp32", "weight_decay": 0.0},
    {"use_muon": False},
]
N_MATRICES = 1 + 1 + 3 + 3 + 1 + 1
CHUNKS = (2, 3, 12)  # 12: more chunks than matrices (10), some empty on every rank
LAYOUTS = ("fsdp2", "fsdp2_cols", "zero", "replicated")
WORLDS = (1, 2, 3, 4)


def _tensors():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen) for _, shape, _ in PARAMS]
    grads = []
    for step in range(STEPS):
        g = [torch.randn(shape, generator=gen) for _, shape, _ in PARAMS]
        if step == 1:
            g[2] = None  # experts without tokens: zeros travel, state kept
        grads.append(g)
    return params, grads


class _FlatRanges:
    """ZeRO-like: all parameters concatenated and cut into one ragged flat range per rank.

    The optimizer sees the full tensors only as handles; values live in ``flat``."""

    def __init__(self, params: list[torch.Tensor], group) -> None:
        import torch.distributed as dist

        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        # Ragged cuts: rank r gets about (r + 1) shares, so every range has its own length.
        weights = [r + 1 for r in range(world)]
        cuts = [total * sum(weights[:r]) // sum(weights) for r in range(world + 1)]
        lo, hi = cuts[rank], cuts[rank + 1]
        self.flat = torch.cat([p.reshape(-1) for p in params])[lo:hi].clone()
        self.grad: torch.Tensor | None = None
        self.fragments, self.shapes, start = {}, {}, 0
        for p, size in zip(params, sizes):
            a, b = max(lo, start), min(hi, start + size)
            if a < b:  # (start in the parameter, length, offset in flat)
                self.fragments[p] = (a - start, b - a, a - lo)
            self.shapes[p] = p.shape
            start += size
        self.lo, self.hi, self.rank = lo, hi, rank

    def set_grads(self, grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> None:
        full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        self.grad = torch.cat([g.reshape(-1) for g in full])[self.lo:self.hi].clone()

    def shape(self, param):
        return self.shapes[param]

    def local(self, param):
        _, length, offset = self.fragments.get(param, (0, 0, 0))
        return self.flat.narrow(0, offset, length)

    def local_grad(self, param):
        _, length, offset = self.fragments.get(param, (0, 0, 0))
        return self.grad.narrow(0, offset, length)

    def regions(self, param, spec):
        if param not in self.fragments:
            return []
        start, length, _ = self.fragments[param]
        return [Region.flat(rank=self.rank, replica=0, spec=spec, start=start,
                            stop=start + length)]


def _build(layout: str, mesh, chunks: int):
    """(optimizer, step(grads), local values) for one layout over ``mesh``'s ranks."""
    from torch.distributed.tensor import Shard, distribute_tensor

    params, _ = _tensors()
    kwargs = {"exchange_chunks": chunks, "lr": 0.02, "weight_decay": 0.1,
              "process_group": mesh.get_group()}
    if layout == "zero":
        handles = [p.clone() for p in params]
        sharding = _FlatRanges(handles, mesh.get_group())
        opt = DistributedMuon(_groups(handles), sharding=sharding, **kwargs)

        def step(grads):
            sharding.set_grads(grads, handles)
            opt.step()

        return opt, step, lambda: [sharding.flat.clone()]

    def make_grad(t):
        if layout == "replicated":
            return t.clone()
        placement = Shard(1) if layout == "fsdp2_cols" and t.ndim >= 2 else Shard(0)
        return distribute_tensor(t.clone(), mesh, [placement])

    ps = [torch.nn.Parameter(make_grad(t)) for t in params]
    opt = DistributedMuon(_groups(ps), **kwargs)

    def step(grads):
        for p, g in zip(ps, grads):
            p.grad = None if g is None else make_grad(g)
        opt.step()

    def values():
        return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in ps]

    return opt, step, values


def _groups(ps):
    return [{"params": [p for p, (_, _, g) in zip(ps, PARAMS) if g == gi], **opts}
            for gi, opts in enumerate(GROUPS)]


def _buffers(opt) -> list[int]:
    ex = opt.exchange
    ptrs = [ex.local.data_ptr(), ex._batch_flat.data_ptr()]
    for c in ex.chunks:
        for rt in (c.to_owners, c.to_holders):
            ptrs += [rt.send.data_ptr(), rt.recv.data_ptr()]
    return ptrs


def _worker(rank, world):
    """Every world size as the first ``w`` ranks of this launch (a process group each)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    calls = []
    original = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_to_all_single = counting  # the exchange looks it up on every call
    _, grads = _tensors()
    meshes = {w: DeviceMesh("cpu", list(range(w))) for w in WORLDS}  # every rank joins each
    out = {}
    try:
        for w, mesh in meshes.items():
            if rank < w:
                out[w] = _run_layouts(mesh, grads, calls)
    finally:
        dist.all_to_all_single = original
    return out


def _run_layouts(mesh, grads, calls):
    out = {}
    for layout in LAYOUTS:
        res = {}
        for chunks in (1, *CHUNKS):
            opt, step, values = _build(layout, mesh, chunks)
            before = _buffers(opt)
            per_step = []
            for g in grads:
                calls.clear()
                step(g)
                per_step.append(len(calls))
            ex = opt.exchange
            res[chunks] = {
                "values": values(),
                "ns": opt.ns_matrices,
                "world": opt.layout.world_size,
                # One process alone in its group (replicas at world 1) skips collectives.
                "calls": per_step if ex.group is not None else None,
                "same_buffers": _buffers(opt) == before,
                # Each direction's chunk buffers are narrows of one allocation.
                "storages": {len({getattr(c, d).send.untyped_storage().data_ptr()
                                  for c in ex.chunks if getattr(c, d).send.numel()})
                             for d in ("to_owners", "to_holders")} - {0},
                "whole": sorted(m for b in ex.batches for m in b.matrices),
                # A batch cut between chunks: NS on part of it must give the same bits.
                "split": len([sb for c in ex.chunks for sb in c.batches]) > len(ex.batches),
                "parts": [sorted(m for b in c.batches for m in b.matrices)
                          for c in ex.chunks],
                "views_ok": all(
                    sb.view.untyped_storage().data_ptr() == ex._batch_flat.untyped_storage(
                    ).data_ptr() and sb.view.shape == (len(sb.matrices), sb.m, sb.n)
                    for c in ex.chunks for sb in c.batches),
            }
        out[layout] = res
    return out


@pytest.fixture(scope="module")
def launch():
    """One launch of 4 ranks runs every world size, layout and number of chunks."""
    return run_ranks(max(WORLDS), _worker, timeout=240)


@pytest.mark.parametrize("world", WORLDS)
def test_pipelined_updates_are_bit_identical(world, launch):
    results = [r[world] for r in launch[:world]]
    for layout in LAYOUTS:
        for rank, res in enumerate(results):
            base = res[layout][1]
            assert base["calls"] in ([2] * STEPS, None), (layout, rank)
            for chunks in CHUNKS:
                got = res[layout][chunks]
                for a, b in zip(got["values"], base["values"]):
                    assert torch.equal(a, b), (layout, world, rank, chunks)
                # One all-to-all per chunk and direction, every rank, every step.
                if world > 1 or got["calls"] is not None:
                    assert got["calls"] == [2 * chunks] * STEPS, (layout, rank, chunks)
                assert got["same_buffers"] and got["views_ok"], (layout, rank, chunks)
                assert got["storages"] <= {1}, (layout, rank, chunks)
                assert got["world"] == world
                # The chunks' sub-batches are the whole batches' matrices, each once.
                assert sorted(m for p in got["parts"] for m in p) == got["whole"]
                assert len(got["parts"]) == chunks
        for chunks in (1, *CHUNKS):
            # Exactly once: every matrix orthogonalized by one rank per step.
            assert sum(r[layout][chunks]["ns"] for r in results) == N_MATRICES * STEPS
        # The pipeline is not vacuous: with 2 chunks some rank works in both.
        assert any(all(res[layout][2]["parts"]) for res in results), layout
    assert any(res[layout][k]["split"] for res in results for layout in LAYOUTS
               for k in CHUNKS)
    # The update moved the weights (bit-identity of two no-ops would prove nothing).
    params, _ = _tensors()
    if world == 1:
        moved = results[0]["replicated"][1]["values"]
        assert all(not torch.equal(a, b) for a, b in zip(moved, params))


def test_chunks_cut_each_owners_batches_by_cost():
    """Each owner's matrices in batch order (grouped by options and shape, first appearance
    first), cut into contiguous parts of about equal cost at the cost midpoints."""
    mats = [SimpleNamespace(id=i, key="a" if i != 2 else "b", m=4, n=4) for i in range(6)]
    layout = SimpleNamespace(matrices=mats, world_size=2)
    # Rank 0 owns 0, 2, 3, 5 -> batch order 0, 3, 5 (key a), 2 (key b); rank 1 owns 1, 4.
    plan = OwnershipPlan(owner=(0, 1, 0, 0, 1, 0), source=(0,) * 6,
                         cost=(4.0, 1.0, 2.0, 1.0, 1.0, 1.0), world_size=2)
    chunk = chunk_of_matrices(layout, plan, 2)
    # Rank 0: costs 4 | 1, 1, 2 (midpoints 2, 4.5, 5.5, 7 of 8); rank 1: 1 | 1.
    assert chunk == [0, 0, 1, 1, 1, 1]
    assert chunk_of_matrices(layout, plan, 1) == [0] * 6
    many = chunk_of_matrices(layout, plan, 10)
    assert [many[i] for i in (0, 3, 5, 2)] == sorted(many[i] for i in (0, 3, 5, 2))
    assert max(many) <= 9


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_bad_exchange_chunks_is_refused(bad):
    with pytest.raises(ValueError, match=r"exchange_chunks=.* must be an integer >= 1"):
        DistributedMuon([torch.zeros(4, 4)], exchange_chunks=bad)


def test_megatron_flag_maps_to_exchange_chunks(tmp_path):
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from distributed_muon.integrations import megatron_optimizer as mo
    from distributed_muon.integrations.megatron import MegatronSharding
    from megatron.core.optimizer import OptimizerConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="adam", choices=["adam"])
    mo.add_dmuon_arguments(parser)
    args = parser.parse_args(["--optimizer", "dmuon", "--dmuon-exchange-chunks", "3"])
    assert args.dmuon_exchange_chunks == 3
    assert parser.parse_args([]).dmuon_exchange_chunks == 1
    config = OptimizerConfig(optimizer="dmuon", lr=1e-3)
    assert mo.dmuon_options(config)["exchange_chunks"] == 1
    config.dmuon_exchange_chunks = 3
    opts = mo.dmuon_options(config)
    assert opts["exchange_chunks"] == 3
    with pytest.raises(ValueError, match="exchange_chunks=0"):
        mo.MegatronMuon([{"params": [torch.zeros(4, 4)]}], None, exchange_chunks=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.randn(6, 5))
        group = dist.group.WORLD
        sharding = MegatronSharding(module, group=group, tp_group=group)
        opt = mo.MegatronMuon([{"params": [module.w]}], sharding, **opts)
        opt.bind([[(module.w, None)]], None)
        assert opt.inner.exchange_chunks == 3 and len(opt.inner.exchange.chunks) == 3
    finally:
        dist.destroy_process_group()


def test_diagnostics_do_not_depend_on_the_chunks():
    """The sampled matrix is the first of each whole batch, not of each chunk's part."""
    params, grads = _tensors()
    measured = {}
    for chunks in (1, 12):
        ps = [torch.nn.Parameter(t.clone()) for t in params]
        opt = DistributedMuon(_groups(ps), exchange_chunks=chunks, diagnostics_every=1)
        assert len(opt.exchange.chunks) == chunks
        # The QKV batch (3 matrices) is cut: its last block is orthogonalized in a later chunk.
        assert (chunks > 1) == any(len(sb.matrices) == 2 for c in opt.exchange.chunks
                                   for sb in c.batches)
        for p, g in zip(ps, grads[0]):
            p.grad = g
        opt.step()
        measured[chunks] = {k: v for k, v in opt.diagnostics().items()
                            if not k.startswith("rank") and k != "ns_imbalance"}
    assert sum(1 for v in measured[12].values() if v == v) > N_MATRICES  # not all NaN
    assert measured[12].keys() == measured[1].keys()
    for key, value in measured[1].items():
        assert value == pytest.approx(measured[12][key], nan_ok=True), key
