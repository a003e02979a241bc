"""Checkpoints: exact resume, and resharding across world sizes and layouts (gloo)."""

from __future__ import annotations

import io

import pytest
import torch
from multiproc import run_ranks
from test_distributed import _full, _groups, _layout_fns, full_tensors, rel, single_process

from distributed_muon import DistributedMuon, checkpoint

SAVE_AFTER = 2


def _optimizer(ps):
    # Standard NS: Gram amplifies fp32 rounding differences between batch shapes past 1e-6.
    return DistributedMuon(_groups(ps), lr=0.02, weight_decay=0.1, ns_dtype="fp32",
                           ns_method="standard", comm_dtype="fp32")


def _steps(ps, opt, grads, make_grad):
    for g in grads:
        for p, gi in zip(ps, g):
            p.grad = None if gi is None else make_grad(gi)
        opt.step()


def _save_worker(rank, world, layout, path):
    params, grads = full_tensors()
    make, make_grad = _layout_fns(layout, world)
    ps = [make(t) for t in params]
    opt = _optimizer(ps)
    _steps(ps, opt, grads[:SAVE_AFTER], make_grad)
    checkpoint.save(opt, path, extra={"model": {str(i): p for i, p in enumerate(ps)}})
    _steps(ps, opt, grads[SAVE_AFTER:], make_grad)  # the uninterrupted run goes on
    return [_full(p) for p in ps]


def _load_worker(rank, world, layout, path):
    params, grads = full_tensors()
    make, make_grad = _layout_fns(layout, world)
    ps = [make(torch.zeros_like(t)) for t in params]  # weights come from the checkpoint
    opt = _optimizer(ps)
    model = {str(i): p for i, p in enumerate(ps)}
    checkpoint.load(opt, path, extra={"model": model})
    _steps(ps, opt, grads[SAVE_AFTER:], make_grad)
    return [_full(p) for p in ps]


@pytest.mark.parametrize("layout", ["fsdp2", "replicated"])
def test_resume_is_bit_exact_at_the_same_world_size(tmp_path, layout):
    path = str(tmp_path / "ckpt")
    straight = run_ranks(2, _save_worker, layout, path)
    resumed = run_ranks(2, _load_worker, layout, path)
    for a, b in zip(straight, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.timeout(900)
def test_reshard_4_fsdp2_to_2_hsdp_1_and_replicated(tmp_path):
    path = str(tmp_path / "ckpt")
    params, grads = full_tensors()
    straight = run_ranks(4, _save_worker, "fsdp2", path)
    expected = single_process(params, grads)
    for got in straight:
        for x, want, p0 in zip(got, expected, params):
            assert rel(x - p0, want - p0) < 1e-6
    for world, layout in [(2, "fsdp2"), (1, "fsdp2"), (3, "replicated"), (4, "hsdp")]:
        resumed = run_ranks(world, _load_worker, layout, path)
        for rank, got in enumerate(resumed):
            for i, (x, want, p0) in enumerate(zip(got, expected, params)):
                assert rel(x - p0, want - p0) < 1e-6, (world, layout, rank, i)


def test_load_refuses_another_model(tmp_path):
    path = str(tmp_path / "ckpt")
    ps = [torch.nn.Parameter(torch.randn(8, 8))]
    opt = DistributedMuon(ps, lr=0.1)
    ps[0].grad = torch.randn(8, 8)
    opt.step()
    checkpoint.save(opt, path)
    other = DistributedMuon([torch.nn.Parameter(torch.randn(8, 9))], lr=0.1)
    with pytest.raises(ValueError, match="different model"):
        checkpoint.load(other, path)
    before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    bad_ns = DistributedMuon([ps[0]], lr=0.1, ns_steps=7)
    with pytest.raises(ValueError, match="ns_steps"):
        checkpoint.load(bad_ns, path)
    assert not bad_ns.state  # a refused load leaves the optimizer as it was
    assert all(torch.equal(opt.state[ps[0]][k], v) for k, v in before.items())


def test_load_never_unpickles_code(tmp_path):
    path = str(tmp_path / "ckpt")
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = DistributedMuon([p], lr=0.1)

    class Sneaky:  # an object whose unpickling would run code under weights_only=False
        def __reduce__(self):
            return (print, ("pwned",))

    payload = checkpoint.state_dict(opt)
    meta = torch.load(io.BytesIO(payload["dmuon/meta"]), weights_only=True)
    meta["evil"] = Sneaky()
    buf = io.BytesIO()
    torch.save(meta, buf)
    payload["dmuon/meta"] = buf.getvalue()
    import torch.distributed.checkpoint as dcp

    dcp.save(payload, checkpoint_id=path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        checkpoint.load(opt, path)


def test_checkpoints_from_before_an_option_existed_load_with_its_default(tmp_path, monkeypatch):
    """A checkpoint (or state dict) written before ``ns_method`` existed has no such key: it ran
    the standard iteration, which an optimizer built alike loads; one built with today's
    default (Gram) is refused in one line instead of silently computing another way."""
    ps = [torch.nn.Parameter(torch.randn(8, 16))]
    opt = DistributedMuon(ps, lr=0.1, ns_method="standard")
    ps[0].grad = torch.randn(8, 16)
    opt.step()
    old_options = checkpoint._group_options
    monkeypatch.setattr(checkpoint, "_group_options", lambda o: [
        {k: v for k, v in g.items() if k != "ns_method"} for g in old_options(o)])
    checkpoint.save(opt, str(tmp_path / "ckpt"))
    sd = opt.state_dict()
    del sd["param_groups"][0]["ns_method"]
    for load, source in ((checkpoint.load, str(tmp_path / "ckpt")),
                         (lambda o, src: o.load_state_dict(src), sd)):
        today = DistributedMuon([torch.nn.Parameter(torch.zeros(8, 16))], lr=0.1)
        with pytest.raises(ValueError, match="ns_method='standard'.*has 'gram'"):
            load(today, source)
        assert today.param_groups[0]["ns_method"] == "gram" and not today.state
        alike = DistributedMuon([torch.nn.Parameter(torch.zeros(8, 16))], lr=0.1,
                                ns_method="standard")
        load(alike, source)
        assert alike.param_groups[0]["ns_method"] == "standard"
        alike.param_groups[0]["params"][0].grad = torch.randn(8, 16)
        alike.step()
