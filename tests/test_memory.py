"""`DistributedMuon.memory_bytes`: the optimizer's memory by kind, per option, on CPU.

The expected bytes are computed here from the parameters' shapes, the option's dtypes and (at
world 2) which rows each rank holds, then compared with what the optimizer reads from the
tensors it holds. Issue 24 ("account for every byte"): the numbers a GPU peak is compared with.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

from distributed_muon import DistributedMuon
from distributed_muon.exchange import count_once

# Muon: an uneven matrix, a wide one, 3 experts, a fused QKV; AdamW: a bias and a norm weight.
SHAPES = [(33, 16), (16, 40), (3, 8, 12), (48, 16)]
ADAMW_SHAPES = [(24,), (16,)]
MUON_VALUES = sum(torch.Size(s).numel() for s in SHAPES)
ADAMW_VALUES = sum(torch.Size(s).numel() for s in ADAMW_SHAPES)
DIRECTIONS = [f"exchange_{d}_{s}_bytes" for d in ("to_owners", "to_holders")
              for s in ("send", "recv")]


def _optimizer(dtype: torch.dtype = torch.float32, **options):
    gen = torch.Generator().manual_seed(0)
    muon = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    adamw = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ADAMW_SHAPES]
    groups = [{"params": muon[:3], "use_muon": True},
              {"params": muon[3:], "use_muon": True, "row_blocks": (16, 16, 16)},
              {"params": adamw, "use_muon": False}]
    opt = DistributedMuon(groups, lr=0.02, **options)
    for p in muon + adamw:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return opt


# (options, bytes per Muon value of the batch buffer at world 1). In one process the batch
# buffer is comm_dtype when every matrix iterates in 16 bits, else fp32 (`_setup`).
OPTIONS = [
    ({}, 2),
    ({"momentum_form": "sum"}, 2),
    ({"nesterov": False}, 2),
    ({"ns_method": "standard"}, 2),
    ({"exchange_chunks": 2}, 2),
    ({"ns_dtype": "bf16"}, 2),
    ({"ns_dtype": "fp32"}, 4),
    ({"comm_dtype": "fp32"}, 4),
    ({"ns_dtype": "fp32", "comm_dtype": "fp32"}, 4),
]


@pytest.mark.parametrize("options,batch_bytes", OPTIONS, ids=[str(o) for o, _ in OPTIONS])
def test_world_one_bytes_per_param(options, batch_bytes):
    opt = _optimizer(**options)
    before = opt.memory_bytes()
    assert before["muon_params"] == MUON_VALUES and before["adamw_params"] == ADAMW_VALUES
    assert before["muon_state_bytes"] == before["adamw_state_bytes"] == 0  # state is lazy
    opt.step()
    mem = opt.memory_bytes()
    assert mem["muon_state_bytes"] == 4 * MUON_VALUES  # one fp32 momentum per value
    # exp_avg and exp_avg_sq (fp32) per value, plus one fp32 step scalar per AdamW tensor.
    assert mem["adamw_state_bytes"] == 8 * ADAMW_VALUES + 4 * len(ADAMW_SHAPES)
    # Every matrix is whole and owned here: each parameter's u and update sit in the batch.
    assert mem["exchange_local_bytes"] == 0
    assert mem["exchange_batch_bytes"] == batch_bytes * MUON_VALUES
    assert all(mem[k] == 0 for k in DIRECTIONS)  # nothing travels in one process
    assert mem["total_bytes"] == sum(v for k, v in mem.items() if k.endswith("_bytes")
                                     and k not in ("total_bytes", "between_steps_bytes"))
    # On the CPU the buffers stay between steps.
    assert mem["between_steps_bytes"] == mem["total_bytes"]
    # Another step allocates nothing new.
    opt.step()
    assert opt.memory_bytes() == mem


def test_world_one_bf16_parameters():
    """bf16 parameters: bf16 momentum and AdamW moments (like their gradients), an fp32 step
    scalar, and the batch in bf16."""
    opt = _optimizer(torch.bfloat16)
    opt.step()
    mem = opt.memory_bytes()
    assert mem["muon_state_bytes"] == 2 * MUON_VALUES
    assert mem["adamw_state_bytes"] == 4 * ADAMW_VALUES + 4 * len(ADAMW_SHAPES)
    assert mem["exchange_local_bytes"] == 0
    assert mem["exchange_batch_bytes"] == 2 * MUON_VALUES


def test_parameter_not_in_place_keeps_local_room():
    """A fused weight whose row blocks land in two batches, out of order (its second block has
    the shape of an earlier parameter): not one run of the batch, so it keeps its room in
    ``local``; the others are stored in place."""
    gen = torch.Generator().manual_seed(0)
    first = torch.nn.Parameter(torch.randn(32, 16, generator=gen))
    fused = torch.nn.Parameter(torch.randn(48, 16, generator=gen))
    opt = DistributedMuon([{"params": [first], "use_muon": True},
                           {"params": [fused], "use_muon": True, "row_blocks": (16, 32)}],
                          lr=0.02)
    ex = opt.exchange
    assert ex.local.numel() == fused.numel()
    base = ex._batch_flat.untyped_storage().data_ptr()
    assert ex.local_views[0].untyped_storage().data_ptr() == base
    assert ex.local_views[1].untyped_storage().data_ptr() == ex.local.untyped_storage(
    ).data_ptr()
    # The same update as a reference whose fused weight is two separate parameters.
    q = torch.nn.Parameter(fused.detach()[:16].clone())
    kv = torch.nn.Parameter(fused.detach()[16:].clone())
    ref = DistributedMuon([{"params": [first_ref := torch.nn.Parameter(first.detach().clone())],
                            "use_muon": True}, {"params": [q, kv], "use_muon": True}], lr=0.02)
    for _ in range(2):
        g1, g2 = torch.randn(32, 16, generator=gen), torch.randn(48, 16, generator=gen)
        first.grad, fused.grad = g1, g2
        first_ref.grad, q.grad, kv.grad = g1.clone(), g2[:16].clone(), g2[16:].clone()
        opt.step()
        ref.step()
    assert torch.equal(first, first_ref)
    assert torch.equal(fused.detach(), torch.cat([q.detach(), kv.detach()]))


def _freeing(monkeypatch):
    """Build exchanges that free their buffers between steps, as on an accelerator."""
    import distributed_muon.optimizer as optimizer_module

    exchange = optimizer_module.Exchange

    def freeing(*args, **kwargs):
        return exchange(*args, **{**kwargs, "free_between_steps": True})

    monkeypatch.setattr(optimizer_module, "Exchange", freeing)


@pytest.mark.parametrize("options", [{}, {"ns_dtype": "fp32"}, {"exchange_chunks": 2}],
                         ids=str)
def test_freed_between_steps_same_values(monkeypatch, options):
    """Buffers freed between steps (taken back, uninitialized, at each step) give the same
    parameters bit for bit, and hold no memory between steps."""
    kept = _optimizer(**options)
    _freeing(monkeypatch)
    freed = _optimizer(**options)
    assert freed.exchange.free_between_steps and not kept.exchange.free_between_steps
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(kept.param_groups, freed.param_groups, strict=True):
            for p, q in zip(a["params"], b["params"], strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
        kept.step()
        freed.step()
        assert all(s.untyped_storage().nbytes() == 0 for s in freed.exchange.buffers.values())
    for a, b in zip(kept.param_groups, freed.param_groups, strict=True):
        for p, q in zip(a["params"], b["params"], strict=True):
            assert torch.equal(p, q)
    mem = freed.memory_bytes()
    assert mem["total_bytes"] == kept.memory_bytes()["total_bytes"]
    assert mem["between_steps_bytes"] == mem["muon_state_bytes"] + mem["adamw_state_bytes"]


def test_shared_memory_counts_once():
    opt = _optimizer()
    buffers = opt.exchange.buffers
    # In one process each direction's receive buffer is its send buffer.
    assert buffers["to_owners_send"] is buffers["to_owners_recv"]
    assert buffers["to_holders_send"] is buffers["to_holders_recv"]
    t = torch.zeros(10)
    # The same memory (address and size) counts once, whatever the view's shape.
    assert count_once({"a": t, "b": t, "c": t.view(2, 5), "e": t[:0]}) == {
        "a": 40, "b": 0, "c": 0, "e": 0}
    assert count_once({"a": t, "b": torch.zeros(10, dtype=torch.bfloat16)}) == {"a": 40, "b": 20}


def _fsdp2_worker(rank, world, free=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)])

    muon = [torch.nn.Parameter(shard(torch.randn(s, generator=gen))) for s in SHAPES]
    adamw = [torch.nn.Parameter(shard(torch.randn(s, generator=gen))) for s in ADAMW_SHAPES]
    opt = DistributedMuon([{"params": muon[:3], "use_muon": True},
                           {"params": muon[3:], "use_muon": True, "row_blocks": (16, 16, 16)},
                           {"params": adamw, "use_muon": False}], lr=0.02)
    if free:  # as on an accelerator: buffers taken back, uninitialized, at each step
        opt.sync_layout()
        opt.exchange.free_between_steps = True
        opt.exchange._resize(allocated=False)
    for _ in range(2):
        for p in muon + adamw:
            p.grad = shard(torch.randn(p.shape, generator=gen))
        opt.step()
    return {"memory": opt.memory_bytes(), "owner": list(opt.plan.owner),
            "shapes": [(m.m, m.n) for m in opt.layout.matrices],
            "bytes_per_step": opt.exchange.bytes_per_step,
            "values": [p.to_local().clone() for p in muon + adamw]}


def _rows_held(rows: int, world: int) -> list[int]:
    """Rows of a ``Shard(0)`` dimension of size ``rows`` on each rank (torch.chunk's split)."""
    size = -(-rows // world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def test_world_two_fsdp2_buffers_are_the_pieces_that_travel():
    world = 2
    results = run_ranks(world, _fsdp2_worker, timeout=60)
    # Every logical matrix with the values each rank holds of it (Shard(0) cuts rows; the
    # experts' rows are experts, so each expert lies whole on one rank).
    matrices: list[tuple[int, int, list[int]]] = []
    for shape in SHAPES:
        if len(shape) == 3:
            holder = [r for r, n in enumerate(_rows_held(shape[0], world)) for _ in range(n)]
            for e in range(shape[0]):
                size = shape[1] * shape[2]
                matrices.append((shape[1], shape[2], [size * (r == holder[e])
                                                      for r in range(world)]))
        elif shape == (48, 16):  # fused QKV: three 16x16 blocks of rows 0-15, 16-31, 32-47
            for block in range(3):
                rows = [max(0, min(end, 16 * (block + 1)) - max(start, 16 * block))
                        for start, end in _starts(48, world)]
                matrices.append((16, 16, [r * 16 for r in rows]))
        else:
            matrices.append((shape[0], shape[1], [r * shape[1] for r in _rows_held(shape[0],
                                                                                  world)]))
    assert results[0]["shapes"] == [(m, n) for m, n, _ in matrices]
    owner = results[0]["owner"]
    assert all(r["owner"] == owner for r in results)
    for rank, result in enumerate(results):
        mem = result["memory"]
        local = sum(held[rank] for _, _, held in matrices)
        assert mem["muon_params"] == local
        assert mem["muon_state_bytes"] == 4 * local
        adamw_local = sum(_rows_held(s[0], world)[rank] for s in ADAMW_SHAPES)
        assert mem["adamw_params"] == adamw_local
        assert mem["adamw_state_bytes"] == 8 * adamw_local + 4 * len(ADAMW_SHAPES)
        # u and the update of what it holds, in the comm dtype (bf16); the experts it holds
        # are whole, and stored in place in the batch if it owns them all.
        experts = [i for i, (m, n, _) in enumerate(matrices) if (m, n) == (8, 12)]
        held = [i for i in experts if matrices[i][2][rank]]
        in_place = 8 * 12 * len(held) if all(owner[i] == rank for i in held) else 0
        assert mem["exchange_local_bytes"] == 2 * (local - in_place)
        # Whole matrices it owns, in the comm dtype (bf16).
        assert mem["exchange_batch_bytes"] == 2 * sum(
            m * n for (m, n, _), o in zip(matrices, owner, strict=True) if o == rank)
        # To owners: what it holds of others' matrices goes out, what others hold of its own
        # comes in; to holders is the same pieces back.
        out = sum(held[rank] for (_, _, held), o in zip(matrices, owner, strict=True)
                  if o != rank)
        into = sum(sum(held) - held[rank] for (_, _, held), o in zip(matrices, owner,
                                                                        strict=True) if o == rank)
        assert mem["exchange_to_owners_send_bytes"] == 2 * out
        assert mem["exchange_to_owners_recv_bytes"] == 2 * into
        assert mem["exchange_to_holders_send_bytes"] == 2 * into
        assert mem["exchange_to_holders_recv_bytes"] == 2 * out
        assert out > 0 and into > 0
        sent, received = result["bytes_per_step"]
        assert (sent, received) == (2 * (out + into), 2 * (out + into))


def _starts(rows: int, world: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the rows of each rank under ``Shard(0)``."""
    bounds, start = [], 0
    for n in _rows_held(rows, world):
        bounds.append((start, start + n))
        start += n
    return bounds


def test_world_two_freed_between_steps_same_values():
    """At world 2 the buffers freed between steps (uninitialized at each step: every value
    read must be written first) give the same parameters bit for bit."""
    kept = run_ranks(2, _fsdp2_worker, timeout=60)
    freed = run_ranks(2, _fsdp2_worker, True, timeout=60)
    for a, b in zip(kept, freed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a["values"], b["values"], strict=True))
        assert b["memory"]["between_steps_bytes"] == (b["memory"]["muon_state_bytes"]
                                                      + b["memory"]["adamw_state_bytes"])
