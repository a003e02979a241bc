"""Multi-process (gloo) parity of DistributedMuon with the single-process reference.

Every rank's result is returned and checked. Parameters and gradients are generated from a
seed on every rank, then laid out as each framework would (replicated / FSDP2 DTensor shards /
HSDP), so the distributed step must reproduce the reference update exactly (fp32) or to bf16
tolerance.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks
from reference import ReferenceMuon

from distributed_muon import DistributedMuon

STEPS = 4
LR, WD = 0.02, 0.1
# name, shape, group options. Uneven rows (33 over 2 and 4 ranks), a wide matrix, 3 experts
# (fewer than 4 ranks: empty shards), a fused QKV, and a bias for AdamW.
PARAMS = [
    ("w_uneven", (33, 16), {}),
    ("w_wide", (16, 40), {}),
    ("experts", (3, 8, 12), {}),
    ("qkv", (48, 16), {"row_blocks": (16, 16, 16)}),
    ("bias", (24,), {"use_muon": False}),
]
N_MATRICES = 1 + 1 + 3 + 3


def full_tensors(seed: int = 0, no_grad_steps: tuple[int, ...] = (1,)):
    """Parameters and per-step gradients; the experts get no gradient on ``no_grad_steps``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen) for _, shape, _ in PARAMS]
    grads = []
    for step in range(STEPS):
        g = [torch.randn(shape, generator=gen) for _, shape, _ in PARAMS]
        if step in no_grad_steps:
            g[2] = None
        grads.append(g)
    return params, grads


def reference(params, grads):
    ps = [p.clone() for p in params]
    muon = ReferenceMuon(ps[:4], lr=LR, weight_decay=WD, row_blocks={3: [16, 16, 16]})
    bias = ps[4].clone().requires_grad_()
    adamw = torch.optim.AdamW([bias], lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    for g in grads:
        muon.step(g[:4])
        bias.grad = g[4]
        adamw.step()
    return ps[:4] + [bias.detach()]


def _layout_fns(layout: str, world: int):
    """(make parameter, make gradient) from a full tensor, for one layout."""
    if layout == "replicated":
        return (lambda t: torch.nn.Parameter(t.clone())), (lambda t: t.clone())
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))

        def placements(t):
            return [Replicate(), Shard(0)]
    else:
        mesh = init_device_mesh("cpu", (world,))

        def placements(t):
            return [Shard(1)] if layout == "fsdp2_cols" and t.ndim >= 2 else [Shard(0)]

    def make(t):
        return torch.nn.Parameter(distribute_tensor(t.clone(), mesh, placements(t)))

    def grad(t):
        return distribute_tensor(t.clone(), mesh, placements(t))

    return make, grad


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _groups(ps):
    return [
        {"params": ps[:3]},
        {"params": [ps[3]], **PARAMS[3][2]},
        {"params": [ps[4]], **PARAMS[4][2]},
    ]


def _train_worker(rank, world, layout, poison_rank=None):
    params, grads = full_tensors()
    make, make_grad = _layout_fns(layout, world)
    out = {}
    for precision in ("fp32", "bf16"):
        ps = [make(t) for t in params]
        # The standard iteration, as the reference's (Gram amplifies fp32 rounding).
        opt = DistributedMuon(_groups(ps), lr=LR, weight_decay=WD, ns_dtype=precision,
                              comm_dtype=precision, ns_method="standard")
        for step, g in enumerate(grads):
            for p, gi in zip(ps, g):
                p.grad = None if gi is None else make_grad(gi)
            if poison_rank is not None and step == 2 and rank == poison_rank:
                local = opt.sharding.local_grad(ps[0])
                if local.numel():
                    local.view(-1)[0] = float("nan")
            opt.step()
        out[precision] = {
            "params": [_full(p) for p in ps],
            "ns": opt.ns_matrices,
            "skipped": opt.skipped_steps,
            "imbalance": opt.plan.imbalance(),
        }
    return out


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp(min=1e-30))


def single_process(params, grads, precision="fp32"):
    """The same optimizer in this process: the world-size-1 result distribution must match."""
    ps = [torch.nn.Parameter(t.clone()) for t in params]
    opt = DistributedMuon(_groups(ps), lr=LR, weight_decay=WD, ns_dtype=precision,
                          comm_dtype=precision, ns_method="standard")
    for g in grads:
        for p, gi in zip(ps, g):
            p.grad = gi
        opt.step()
    return [p.detach() for p in ps]


def check_parity(results, params, grads, ref=None):
    ref = ref or reference(params, grads)
    single = single_process(params, grads)
    for rank, res in enumerate(results):
        for i, (mine, one, want, p0) in enumerate(
            zip(res["fp32"]["params"], single, ref, params)
        ):
            # fp32: the single-process optimizer to 1e-6, the independent reference to 1e-5
            # (different but equally valid fp32 operation orders).
            assert rel(mine - p0, one - p0) < 1e-6, (rank, PARAMS[i][0], "fp32 vs 1 rank")
            assert rel(mine - p0, want - p0) < 1e-5, (rank, PARAMS[i][0], "fp32 vs reference")
        for i, (mine, want, p0) in enumerate(zip(res["bf16"]["params"], ref, params)):
            assert rel(mine - p0, want - p0) < 3e-2, (rank, PARAMS[i][0], "bf16")
    # Each logical matrix orthogonalized exactly once per step across the whole job.
    for precision in ("fp32", "bf16"):
        assert sum(r[precision]["ns"] for r in results) == N_MATRICES * STEPS


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["replicated", "fsdp2"])
def test_parity_with_reference(layout, world):
    params, grads = full_tensors()
    results = run_ranks(world, _train_worker, layout)
    check_parity(results, params, grads)


@pytest.mark.parametrize("layout,world", [("hsdp", 4), ("fsdp2_cols", 3)])
def test_parity_hsdp_and_column_shards(layout, world):
    params, grads = full_tensors()
    results = run_ranks(world, _train_worker, layout)
    check_parity(results, params, grads)


def test_non_finite_gradient_on_one_rank_skips_everywhere():
    params, grads = full_tensors()
    results = run_ranks(3, _train_worker, "fsdp2", 1)
    # Step 2 was skipped on every rank: the result equals training without that step.
    expected = single_process(params, grads[:2] + grads[3:])
    for res in results:
        assert res["fp32"]["skipped"] == 1 and res["bf16"]["skipped"] == 1
        for mine, want, p0 in zip(res["fp32"]["params"], expected, params):
            assert rel(mine - p0, want - p0) < 1e-6


def _few_matrices_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(5, 7, generator=gen)  # 5 rows over 4 ranks: 2, 2, 1, 0
    g = torch.randn(5, 7, generator=gen)
    p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(0)]))
    opt = DistributedMuon([p], lr=LR, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
    p.grad = distribute_tensor(g, mesh, [Shard(0)])
    opt.step()
    return {"param": p.full_tensor(), "local_rows": p.to_local().shape[0], "ns": opt.ns_matrices,
            "bytes": opt.exchange.bytes_per_step}


def test_fewer_matrices_than_ranks_with_empty_shards():
    results = run_ranks(4, _few_matrices_worker)
    assert [r["local_rows"] for r in results] == [2, 2, 1, 0]
    assert sum(r["ns"] for r in results) == 1
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(5, 7, generator=gen)
    g = torch.randn(5, 7, generator=gen)
    ref = [full.clone()]
    ReferenceMuon(ref, lr=LR).step([g])
    for r in results:
        assert rel(r["param"] - full, ref[0] - full) < 1e-5
    # The rank holding no rows and owning nothing takes part in the collectives, moving 0 bytes.
    assert results[3]["ns"] == 0 and results[3]["bytes"] == (0, 0)


def _experts_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    whole = torch.nn.Parameter(distribute_tensor(torch.randn(4, 8, 12), mesh, [Shard(0)]))
    inside = torch.nn.Parameter(distribute_tensor(torch.randn(2, 8, 12), mesh, [Shard(1)]))
    opt = DistributedMuon([whole, inside], lr=LR)
    lay, plan = opt.layout, opt.plan
    pinned = []
    for m in lay.matrices:
        holders = {pc.rank for pc in lay.pieces[m.id]}
        pinned.append((m.param, holders, plan.owner[m.id]))
    sent, recv = plan.traffic(lay, 2)
    return {"pinned": pinned, "sent": sent, "planned": (sent[rank], recv[rank]),
            "built": opt.exchange.bytes_per_step}


def test_whole_experts_stay_where_they_lie():
    results = run_ranks(2, _experts_worker)
    pinned = results[0]["pinned"]
    for param, holders, owner in pinned:
        if param == 0:  # Shard(0) over experts: each expert lies whole on one rank
            assert holders == {owner}
        else:  # Shard(1): rows of each expert on both ranks, exchanged like any matrix
            assert holders == {0, 1}
    assert results[0]["pinned"] == results[1]["pinned"]
    # Only the two experts of the row-sharded tensor cross the network: 2 matrices x half of
    # 8 x 12 values x 2 bytes, in and out.
    assert sum(results[0]["sent"]) == 2 * 2 * (4 * 12) * 2
    # The plan's metadata-only byte count is what the exchange actually moves.
    assert all(r["planned"] == r["built"] for r in results)


def _traffic_worker(rank, world):
    """Per layout: the plan, its byte counts, and the counts the exchange passes to its two
    all-to-alls (what really moves), as built on this rank."""
    params, _ = full_tensors()
    out = {}
    for layout in ("replicated", "fsdp2", "fsdp2_cols", "hsdp"):
        make, _ = _layout_fns(layout, world)
        opt = DistributedMuon(_groups([make(t) for t in params]), lr=LR)
        ex, lay = opt.exchange, opt.layout
        (chunk,) = ex.chunks  # unpipelined: one all-to-all each way
        routes = {"to_owners": chunk.to_owners, "to_holders": chunk.to_holders}
        out[layout] = {
            "plan": opt.plan,
            "pieces": lay.pieces,
            "traffic": opt.plan.traffic(lay, opt.comm_dtype.itemsize),
            "itemsize": opt.comm_dtype.itemsize,
            "send": {k: list(r.send_counts) for k, r in routes.items()},
            "recv": {k: list(r.recv_counts) for k, r in routes.items()},
            "buffers": {k: (r.send.numel(), r.recv.numel()) for k, r in routes.items()},
        }
    return out


def test_plan_and_traffic_agree_with_the_exchange_on_every_rank():
    world = 4
    results = run_ranks(world, _traffic_worker)
    for layout, first in results[0].items():
        # Every rank of the real process group computed the same layout and plan.
        for r in range(1, world):
            assert results[r][layout]["plan"] == first["plan"], (layout, r)
            assert results[r][layout]["pieces"] == first["pieces"], (layout, r)
        sent, recv = first["traffic"]
        item = first["itemsize"]
        for r, res in enumerate(results):
            mine = res[layout]
            for route in ("to_owners", "to_holders"):
                # Both ends of every pair agree on what crosses between them ...
                for peer in range(world):
                    assert mine["send"][route][peer] == \
                        results[peer][layout]["recv"][route][r], (layout, route, r, peer)
                # ... and the buffers hold exactly that.
                assert mine["buffers"][route] == (sum(mine["send"][route]),
                                                  sum(mine["recv"][route]))
            assert mine["send"]["to_owners"][r] == mine["recv"]["to_owners"][r] == 0
            # The plan's metadata-only byte counts are what the all-to-alls move.
            assert sent[r] == item * (sum(mine["send"]["to_owners"]) +
                                      sum(mine["send"]["to_holders"])), (layout, r)
            assert recv[r] == item * (sum(mine["recv"]["to_owners"]) +
                                      sum(mine["recv"]["to_holders"])), (layout, r)
    # Replicated: nothing goes to the owners (each computes from its own copy), and each
    # matrix's update goes to the 3 other ranks: 3 x 2224 values (33x16 + 16x40 + 3 experts
    # 8x12 + 48x16) in bf16.
    assert all(sum(res["replicated"]["send"]["to_owners"]) == 0 for res in results)
    assert sum(results[0]["replicated"]["traffic"][0]) == 3 * 2224 * 2


def _mismatch_worker(rank, world):
    from distributed_muon.layout import LayoutError

    shape = (8, 8) if rank == 0 else (8, 9)
    try:
        DistributedMuon([torch.zeros(shape)], lr=0.1)
    except LayoutError as err:
        return str(err)
    return "no error"


def test_ranks_with_different_models_fail_alike():
    messages = run_ranks(2, _mismatch_worker, timeout=60)
    assert all("different Muon parameters" in m for m in messages)
