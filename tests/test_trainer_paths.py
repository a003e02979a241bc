"""The ways trainers build, shard and checkpoint an optimizer (issue 22), on gloo with FSDP2.

- Built before ``fully_shard``, its params swapped for the sharded ones by name (what
  Accelerate's ``prepare`` and HF Trainer do): trains exactly like an optimizer built after.
- Built before ``fully_shard`` and never told: warns that no Muon parameter has a gradient.
- torch DCP (``get/set_optimizer_state_dict`` + ``dcp.save/load``, with and without
  ``cpu_offload``): every rank gets its own shard back, also at 3 and 4 ranks and under HSDP.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from multiproc import run_ranks
from torch import nn

from distributed_muon import DistributedMuon, muon_param_groups

VOCAB, DIM, HIDDEN = 11, 16, 33  # 33 rows: uneven shards at 2, 3 and 4 ranks


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.relu(self.up(self.embed(tokens)))))


def _shard(model: nn.Module, mesh=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.up, model.down):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _opt(params) -> DistributedMuon:
    return DistributedMuon(params, lr=0.05, weight_decay=0.1, adamw_lr=0.01, ns_dtype="fp32",
                           comm_dtype="fp32")


def _train(model, opt, steps: int, rank: int, world: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, VOCAB, (world, 4, 6), generator=gen)[rank]
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def _full(tensors):
    from torch.distributed.tensor import DTensor

    return [(t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for t in tensors]


def _swap_to_sharded(opt, model) -> None:
    """What Accelerate's FSDP2 prepare does: each group's params replaced by name."""
    by_name = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [by_name[n] for n in group["param_names"]]


def _order_worker(rank, world):
    # Built after sharding: the reference.
    after = _shard(Tiny())
    opt = _opt(muon_param_groups(after))
    _train(after, opt, 3, rank, world)
    # Built before sharding, params swapped as Accelerate does.
    before = Tiny()
    opt_before = _opt(muon_param_groups(before))
    old = weakref.ref(before.up.weight)
    _shard(before)
    _swap_to_sharded(opt_before, before)
    _train(before, opt_before, 3, rank, world)
    gc.collect()
    # Built before sharding and never told: nothing has a gradient; it must say so.
    stale = Tiny()
    opt_stale = _opt(muon_param_groups(stale))
    _shard(stale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(stale, opt_stale, 1, rank, world)
    return {"after": _full(after.parameters()), "before": _full(before.parameters()),
            "initial": _full(Tiny().parameters()), "old_alive": old() is not None,
            "warnings": [str(w.message) for w in caught]}


def test_optimizer_built_before_sharding_trains_like_one_built_after():
    for result in run_ranks(2, _order_worker):
        for a, b, init in zip(result["after"], result["before"], result["initial"]):
            assert not torch.equal(a, init)  # it trained
            assert torch.equal(a, b)
        assert not result["old_alive"]  # the unsharded originals are not kept
        assert any("found no gradient on any of its" in w for w in result["warnings"])


def _dcp_state(model, opt, offload: bool):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(cpu_offload=offload)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, opt, options=options)}


def _dcp_load(model, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _dcp_state(model, opt, offload=False)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def _full_state(model, opt) -> dict[str, list[torch.Tensor]]:
    """Every state tensor (momentum, AdamW moments) of every parameter, whole, by name; and
    this rank's local state, to check it is the right shard of it."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    names = [n for g in opt.param_groups for n in g["param_names"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for index, state in sorted(sd["state"].items()):
        for key, value in sorted(state.items()):
            if key == "step":
                continue
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            local = opt.state[params[index]][key]
            out[f"{names[index]}/{key}"] = (whole.clone(), local.clone())
    return out


def _check_shards(full: dict, reference: dict, rank: int, world: int, mesh_shape) -> None:
    """Each rank's local state is its torch.chunk shard (Shard(0)) of the reference."""
    shard_ranks = mesh_shape[-1]
    for name, (_, local) in full.items():
        ref = reference[name][0]
        expected = torch.chunk(ref, shard_ranks, dim=0)
        index = rank % shard_ranks
        part = expected[index] if index < len(expected) else ref[:0]
        assert torch.equal(local, part), f"{name}: rank {rank} of {world} holds the wrong shard"


def _dcp_worker(rank, world, path, offload):
    import torch.distributed.checkpoint as dcp

    model = _shard(Tiny())
    opt = _opt(muon_param_groups(model))
    _train(model, opt, 2, rank, world)
    dcp.save(_dcp_state(model, opt, offload), checkpoint_id=path)
    saved = _full_state(model, opt)
    _train(model, opt, 2, rank, world, first=2)
    # A fresh run loads the checkpoint (DCP first runs a zero-lr step to create state).
    resumed = _shard(Tiny())
    opt2 = _opt(muon_param_groups(resumed))
    _dcp_load(resumed, opt2, path)
    loaded = _full_state(resumed, opt2)
    _train(resumed, opt2, 2, rank, world, first=2)
    return {"saved": saved, "loaded": loaded, "straight": _full(model.parameters()),
            "resumed": _full(resumed.parameters()),
            "group": {k: v for k, v in opt2.param_groups[0].items() if k != "params"}}


def _reshard_worker(rank, world, path, hsdp):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) \
        if hsdp else None
    model = _shard(Tiny(), mesh)
    opt = _opt(muon_param_groups(model))
    _dcp_load(model, opt, path)
    loaded = _full_state(model, opt)
    _train(model, opt, 1, rank, world, first=2)  # it steps on the loaded state
    return {"loaded": loaded, "mesh": (2, world // 2) if hsdp else (world,)}


@pytest.mark.parametrize("offload", [False, True])
def test_torch_dcp_round_trip_and_reshard(tmp_path, offload):
    path = str(tmp_path / "ckpt")
    results = run_ranks(2, _dcp_worker, path, offload)
    reference = results[0]["saved"]
    assert len(reference) == 10  # momentum of up, down; 2 AdamW moments of 2 biases, embed, head
    for rank, result in enumerate(results):
        assert result["group"]["ns_dtype"] == "fp32"
        for name, (whole, local) in result["loaded"].items():
            assert torch.equal(whole, reference[name][0]), name
            assert torch.equal(local, result["saved"][name][1]), f"rank {rank}: {name}"
        for a, b in zip(result["straight"], result["resumed"]):
            assert torch.equal(a, b)  # the resumed run continues exactly
    if offload:
        return  # the reshard checks do not depend on how the checkpoint was written
    for world, hsdp in ((3, False), (4, False), (4, True)):
        for rank, result in enumerate(run_ranks(world, _reshard_worker, path, hsdp)):
            _check_shards(result["loaded"], reference, rank, world, result["mesh"])


def _hsdp_worker(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _shard(Tiny(), mesh)
    opt = _opt(muon_param_groups(model))
    _train(model, opt, 2, rank, world)
    dcp.save(_dcp_state(model, opt, offload=True), checkpoint_id=path)
    saved = _full_state(model, opt)
    resumed = _shard(Tiny(), mesh)
    opt2 = _opt(muon_param_groups(resumed))
    _dcp_load(resumed, opt2, path)
    return {"saved": saved, "loaded": _full_state(resumed, opt2)}


def test_torch_dcp_round_trip_under_hsdp(tmp_path):
    for result in run_ranks(4, _hsdp_worker, str(tmp_path / "ckpt")):
        for name, (whole, local) in result["loaded"].items():
            assert torch.equal(whole, result["saved"][name][0]), name
            assert torch.equal(local, result["saved"][name][1]), name


# ------------------------------------------------------------------ one process


def _steps(model, opt, steps: int) -> None:
    _train(model, opt, steps, rank=0, world=1)


def test_unnamed_matrices_warn_and_named_ones_do_not():
    with pytest.warns(UserWarning, match=r"4 unnamed parameter\(s\).*muon_param_groups"):
        DistributedMuon(Tiny().parameters())  # embed, up, down, lm_head: all 2-D but biases
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistributedMuon(muon_param_groups(Tiny()))
        DistributedMuon(Tiny().named_parameters())
        DistributedMuon([torch.zeros(4, 4)])  # one matrix: nothing to confuse it with
        DistributedMuon([{"params": list(Tiny().parameters()), "use_muon": False}])


def test_one_process_fp32_newton_schulz_is_fp32_whatever_comm_dtype():
    """In one process nothing travels, so comm_dtype (bf16 by default) must not round the
    momentum before an fp32 Newton-Schulz."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(24, 40, generator=gen), torch.randn(40, 24, generator=gen)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    results = []
    for comm in ("bf16", "fp32"):
        ps = [p.clone().requires_grad_() for p in params]
        opt = DistributedMuon(ps, lr=0.02, weight_decay=0.1, ns_dtype="fp32", ns_method="standard",
                              comm_dtype=comm)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        assert opt.exchange.batches[0].view.dtype == torch.float32
        results.append([p.detach() for p in ps])
    for a, b, p0 in zip(*results, params):
        assert not torch.equal(a, p0) and torch.equal(a, b)


def test_deepcopy_gives_a_working_independent_optimizer():
    model = Tiny()
    opt = _opt(muon_param_groups(model))
    _steps(model, opt, 2)
    import copy

    model2 = copy.deepcopy(model)
    memo = {id(p): p2 for p, p2 in zip(model.parameters(), model2.parameters())}
    opt2 = copy.deepcopy(opt, memo)
    assert opt2.param_groups[0]["params"][0] is model2.up.weight
    _steps(model, opt, 2)
    _steps(model2, opt2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
        assert a is not b
    # A plain deepcopy (fresh parameters nobody trains) builds and steps without error.
    alone = copy.deepcopy(opt)
    for g in alone.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    alone.step()


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex parameters"):
        DistributedMuon([torch.zeros(4, 4, dtype=torch.complex64)])


def test_dcp_state_initialization_moves_nothing():
    """torch DCP's get_optimizer_state_dict runs a zero-lr step on a fresh optimizer: with
    adamw_lr and weight decay set, no parameter may move."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _opt(muon_param_groups(model, adamw_options={"weight_decay": 0.1}))
    state = get_optimizer_state_dict(model, opt)
    assert state["state"]  # it created state
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_add_param_group_is_planned_at_the_next_step():
    model = Tiny()
    opt = DistributedMuon([{"params": [model.up.weight], "param_names": ["up.weight"]}],
                          lr=0.05)
    opt.add_param_group({"params": [model.down.weight], "param_names": ["down.weight"]})
    before = model.down.weight.detach().clone()
    _steps(model, opt, 1)
    assert len(opt.muon_params) == 2 and not torch.equal(before, model.down.weight)


def test_swapping_parameters_after_state_exists_is_refused():
    model = Tiny()
    opt = _opt(muon_param_groups(model))
    _steps(model, opt, 1)
    opt.param_groups[0]["params"] = [p.detach().clone().requires_grad_()
                                     for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="momentum would be lost"):
        opt.step()


def test_checkpoint_written_with_dtype_objects_still_loads(tmp_path, monkeypatch):
    """distributed_muon.checkpoint files stored ns_dtype as a torch.dtype before it became a
    string; they load."""
    from distributed_muon import checkpoint

    model = Tiny()
    opt = _opt(muon_param_groups(model))
    _steps(model, opt, 1)
    old = checkpoint._group_options
    monkeypatch.setattr(checkpoint, "_group_options", lambda o: [
        {**g, "ns_dtype": torch.float32} for g in old(o)])
    checkpoint.save(opt, str(tmp_path / "old"))
    monkeypatch.undo()
    opt2 = _opt(muon_param_groups(model))
    checkpoint.load(opt2, str(tmp_path / "old"))
    assert opt2.param_groups[0]["ns_dtype"] == "fp32"
    for p in opt.muon_params:
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[p]["momentum_buffer"])
