"""`DistributedMuon` reading its step options and its state from an adapter's own optimizer
(`distributed_muon.linked`): what DeepSpeed's and Megatron's adapters build on."""

from types import SimpleNamespace

import pytest
import torch

from distributed_muon import DistributedMuon

SHAPES = [(16, 32), (32,)]  # a Muon matrix and an AdamW vector
NAMES = ["layer.weight", "layer.bias"]


def _grads(step):
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _train(opt, params, steps, before_step=None):
    for step in range(steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        if before_step is not None:
            before_step(step)
        opt.step()


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


@pytest.fixture
def options():
    return {"lr": 0.02, "weight_decay": 0.1, "ns_method": "standard", "ns_dtype": "fp32"}


def test_overrides_are_read_at_every_step(options):
    """An outer group whose lr a scheduler changes drives the step as the group's own lr
    would, with no copy into the core's groups; the core's groups keep their values."""
    plain_params, linked_params = _params(), _params()
    plain = DistributedMuon([{"params": plain_params, "param_names": NAMES}], **options)
    outer = dict(options)
    linked = DistributedMuon([{"params": linked_params, "param_names": NAMES}],
                             **{**options, "lr": 99.0}, group_overrides=lambda i: outer)

    def schedule(opt_groups):
        def at(step):
            for g in opt_groups:
                g["lr"] = 0.02 * (step + 1)
        return at

    _train(plain, plain_params, 4, schedule(plain.param_groups))
    _train(linked, linked_params, 4, schedule([outer]))
    for a, b in zip(plain_params, linked_params):
        assert torch.equal(a, b)
    assert linked.param_groups[0]["lr"] == 99.0  # read through, never written


def test_overrides_do_not_change_the_layout_options(options):
    """``use_muon`` and the Newton-Schulz options decide the layout at setup: an override of
    use_muon is not taken, and one of ns_steps is refused, as on the core's own groups."""
    params = _params()
    outer = {**options, "use_muon": False}
    opt = DistributedMuon([{"params": params, "param_names": NAMES}], **options,
                          group_overrides=lambda i: outer)
    _train(opt, params, 1)
    assert "momentum_buffer" in opt.state[params[0]]  # still Muon
    outer["ns_steps"] = 7
    with pytest.raises(RuntimeError, match="ns_steps"):
        _train(opt, params, 1)


def test_external_state_is_looked_up_at_every_access(options):
    """State kept in a dict the adapter owns: a load that replaces that dict is seen at once
    (no relinking), and continuing from it equals continuing an uninterrupted run."""
    straight_params = _params()
    straight = DistributedMuon([{"params": straight_params, "param_names": NAMES}], **options)
    _train(straight, straight_params, 5)

    params = _params()
    holder = SimpleNamespace(state={})  # what DeepSpeed's or Megatron's optimizer is to the core
    opt = DistributedMuon([{"params": params, "param_names": NAMES}], **options,
                          external_state=lambda p: holder.state.setdefault(p, {}))
    _train(opt, params, 3)
    assert set(holder.state[params[0]]) == {"momentum_buffer"}
    assert set(holder.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    saved = {p: {k: v.clone() for k, v in s.items()} for p, s in holder.state.items()}
    weights = [p.detach().clone() for p in params]

    _train(opt, params, 1)  # a step that the load below undoes
    holder.state = saved  # the outer load replaces its state dict
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    for step in (3, 4):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
    for a, b in zip(straight_params, params):
        assert torch.equal(a, b)


def test_external_state_refuses_the_core_state_dict(options):
    params = _params()
    opt = DistributedMuon([{"params": params, "param_names": NAMES}], **options,
                          external_state=lambda p: {})
    with pytest.raises(RuntimeError, match="external_state"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="external_state"):
        opt.load_state_dict({"state": {}, "param_groups": []})
