import copy
import math

import pytest
import torch
from reference import ReferenceMuon

from distributed_muon import DistributedMuon
from distributed_muon.options import dtype_name

SHAPES = [(32, 64), (64, 32), (48, 48), (8, 200)]


def params_and_grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    return params, grads


def run(opt_factory, params, grads):
    """Copies of ``params`` after one optimizer step per gradient list."""
    ps = [p.clone().requires_grad_() for p in params]
    opt = opt_factory(ps)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_defaults_match_torch_muon_match_rms_adamw():
    params, grads = params_and_grads(SHAPES, 10)
    ours, _ = run(lambda ps: DistributedMuon(ps, lr=0.02, weight_decay=0.1), params, grads)
    ref, _ = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1,
                                             adjust_lr_fn="match_rms_adamw"), params, grads)
    for a, b, p0 in zip(ours, ref, params):
        # bf16 NS in both; the difference is bf16 rounding, far below one step's size.
        assert rel(a - p0, b - p0) < 2e-2
        assert not torch.equal(a, p0)


def test_original_scale_matches_torch_muon_default():
    params, grads = params_and_grads(SHAPES, 10, seed=1)
    ours, _ = run(lambda ps: DistributedMuon(ps, lr=0.02, weight_decay=0.1, scale="original"),
                  params, grads)
    ref, _ = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1), params, grads)
    for a, b, p0 in zip(ours, ref, params):
        assert rel(a - p0, b - p0) < 2e-2


@pytest.mark.parametrize("scale", ["match_rms_adamw", "original", "spectral", "none"])
@pytest.mark.parametrize("form,nesterov", [("ema", True), ("ema", False), ("sum", True),
                                           ("sum", False)])
def test_fp32_equals_the_design_reference(scale, form, nesterov):
    params, grads = params_and_grads(SHAPES, 10, seed=2)
    opts = dict(lr=0.01, momentum=0.9, nesterov=nesterov, momentum_form=form,
                weight_decay=0.05, scale=scale)
    ours, _ = run(lambda ps: DistributedMuon(ps, ns_dtype="fp32", comm_dtype="fp32", **opts),
                  params, grads)
    ref, _ = run(lambda ps: _Ref(ps, **opts), params, grads)
    for a, b, p0 in zip(ours, ref, params):
        assert rel(a - p0, b - p0) < 1e-5


class _Ref(torch.optim.Optimizer):
    """Adapts ReferenceMuon to the Optimizer-like call used by `run`."""

    def __init__(self, params, **kw):
        self.params = params
        self.ref = ReferenceMuon(params, **kw)

    def step(self):
        self.ref.step([p.grad for p in self.params])


def test_experts_equal_separate_matrices():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 16, 24, generator=gen)
    grads = [[torch.randn(4, 16, 24, generator=gen)] for _ in range(5)]
    opts = dict(lr=0.02, weight_decay=0.1, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
    (stacked,), _ = run(lambda ps: DistributedMuon(ps, **opts), [w], grads)
    separate, _ = run(lambda ps: DistributedMuon(ps, **opts), list(w.unbind(0)),
                      [list(g[0].unbind(0)) for g in grads])
    torch.testing.assert_close(stacked, torch.stack(separate), atol=1e-6, rtol=1e-6)


def test_row_blocks_equal_separate_matrices():
    gen = torch.Generator().manual_seed(4)
    blocks = (32, 8, 8)  # fused q, k, v
    w = torch.randn(48, 32, generator=gen)
    grads = [[torch.randn(48, 32, generator=gen)] for _ in range(5)]
    opts = dict(lr=0.02, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
    (fused,), _ = run(lambda ps: DistributedMuon([{"params": ps, "row_blocks": blocks}], **opts),
                      [w], grads)
    separate, _ = run(lambda ps: DistributedMuon(ps, **opts), list(w.split(blocks)),
                      [list(g[0].split(blocks)) for g in grads])
    torch.testing.assert_close(fused, torch.cat(separate), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(fused, run(lambda ps: DistributedMuon(ps, **opts), [w], grads)[0][0])


def test_conv_weight_is_viewed_as_out_by_rest():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 4, 3, 3, generator=gen)
    grads = [[torch.randn(16, 4, 3, 3, generator=gen)] for _ in range(3)]
    opts = dict(lr=0.02, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
    (conv,), _ = run(lambda ps: DistributedMuon(ps, **opts), [w], grads)
    (flat,), _ = run(lambda ps: DistributedMuon(ps, **opts), [w.reshape(16, 36)],
                     [[g[0].reshape(16, 36)] for g in grads])
    torch.testing.assert_close(conv.reshape(16, 36), flat, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adamw_part_equals_torch_adamw(bias_correction):
    gen = torch.Generator().manual_seed(6)
    shapes = [(10,), (50, 8), (7,)]  # the (50, 8) one is forced onto AdamW, like an embedding
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    opts = dict(lr=3e-3, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8)

    def ours_factory(ps):
        return DistributedMuon([{"params": ps, "use_muon": False}],
                               adamw_bias_correction=bias_correction, **opts)

    ours, _ = run(ours_factory, params, grads)
    if bias_correction:
        ref, _ = run(lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                                                  weight_decay=0.1), params, grads)
    else:
        ref = _adamw_no_bias_correction(params, grads, lr=3e-3, b1=0.9, b2=0.95, eps=1e-8,
                                        wd=0.1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _adamw_no_bias_correction(params, grads, lr, b1, b2, eps, wd):
    ps = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            ps[i] = ps[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ps[i] = ps[i] - lr * m[i] / (v[i].sqrt() + eps)
    return ps


def test_adamw_options_default_to_muon_ones_and_can_differ():
    params, grads = params_and_grads([(12,)], 4, seed=7)
    ours, _ = run(lambda ps: DistributedMuon(ps, lr=0.02, adamw_lr=1e-3, weight_decay=0.5,
                                             adamw_weight_decay=0.0), params, grads)
    ref, _ = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0),
                 params, grads)
    torch.testing.assert_close(ours[0], ref[0])


def test_lr_scheduler_drives_muon_and_adamw():
    params, grads = params_and_grads([(16, 32), (16,)], 4, seed=8)

    def train(with_scheduler):
        ps = [p.clone() for p in params]
        opt = DistributedMuon(ps, lr=0.02, adamw_lr=1e-3, ns_dtype="fp32", ns_method="standard",
                              comm_dtype="fp32")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t) if with_scheduler \
            else None
        deltas = []
        for step_grads in grads:
            before = [p.clone() for p in ps]
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
            deltas.append([float((p - b).norm()) for p, b in zip(ps, before)])
            if sched:
                sched.step()
        return deltas

    plain, halved = train(False), train(True)
    for t in range(4):
        for k in range(2):
            assert math.isclose(halved[t][k], plain[t][k] * 0.5**t, rel_tol=2e-3), (t, k)


def test_state_dict_round_trip_continues_exactly():
    params, grads = params_and_grads(SHAPES + [(5,)], 8, seed=9)
    ps = [p.clone() for p in params]
    opt = DistributedMuon(ps, lr=0.02, weight_decay=0.1)
    for step_grads in grads[:4]:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    saved_params = [p.clone() for p in ps]
    saved = copy.deepcopy(opt.state_dict())

    def finish(ps, opt):
        for step_grads in grads[4:]:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        return ps

    straight = finish(ps, opt)
    resumed_params = [p.clone() for p in saved_params]
    resumed_opt = DistributedMuon(resumed_params, lr=0.5)  # hyperparameters come from the file
    resumed_opt.load_state_dict(saved)
    assert resumed_opt.param_groups[0]["lr"] == 0.02
    resumed = finish(resumed_params, resumed_opt)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_state_dict_saves_with_weights_only(tmp_path):
    params, grads = params_and_grads([(8, 8), (3,)], 2)
    opt = DistributedMuon(params, lr=0.01, ns_dtype="fp32")
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["ns_dtype"] == "fp32"  # plain data, as torch DCP needs
    torch.testing.assert_close(loaded["state"][0]["momentum_buffer"],
                               opt.state_dict()["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_step(bad):
    params, grads = params_and_grads([(8, 16), (4,)], 3, seed=10)
    ps = [p.clone() for p in params]
    opt = DistributedMuon(ps, lr=0.02)
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.step()
    assert not opt.last_step_skipped
    before_p = [p.clone() for p in ps]
    before_s = copy.deepcopy(opt.state_dict())
    poisoned = grads[1][0].clone()
    poisoned[3, 5] = bad
    ps[0].grad, ps[1].grad = poisoned, grads[1][1]
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    for a, b in zip(ps, before_p):
        assert torch.equal(a, b)
    after_s = opt.state_dict()
    for k, st in before_s["state"].items():
        for name, value in st.items():
            assert torch.equal(after_s["state"][k][name], value)
    for p, g in zip(ps, grads[2]):
        p.grad = g
    opt.step()
    assert not opt.last_step_skipped and opt.skipped_steps == 1


def test_parameter_without_gradient_is_left_alone():
    params, grads = params_and_grads([(8, 16), (16, 8)], 3, seed=11)
    for step_grads in grads[1:]:
        step_grads[1] = None  # the second matrix gets no gradient after step 0
    ps, opt = run(lambda ps: DistributedMuon(ps, lr=0.02, weight_decay=0.1), params, grads)
    after_first, _ = run(lambda ps: DistributedMuon(ps, lr=0.02, weight_decay=0.1), params,
                         grads[:1])
    assert torch.equal(ps[1], after_first[1])
    assert not torch.equal(ps[0], after_first[0])


def test_ns_count_is_one_per_matrix_per_step():
    shapes = [(4, 8, 16), (32, 16), (6,)]
    params, grads = params_and_grads(shapes, 3)
    _, opt = run(lambda ps: DistributedMuon(ps, lr=0.01), params, grads)
    assert opt.ns_matrices == 3 * (4 + 1)


def test_group_options_must_stay_fixed_for_batching():
    p = torch.zeros(4, 4, requires_grad=True)
    opt = DistributedMuon([p], lr=0.01)
    opt.param_groups[0]["ns_steps"] = 7
    p.grad = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="after construction"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(momentum=1.5), "momentum"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(momentum_form="heavy"), "momentum_form"),
        (dict(scale="moonlight"), "scale"),
        (dict(ns_schedule="cubic"), "ns_schedule"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(ns_dtype="int8"), "ns_dtype"),
        (dict(comm_dtype="fp8"), "comm_dtype"),
        (dict(adamw_betas=(0.9,)), "adamw_betas"),
        (dict(adamw_betas=(0.9, 1.2)), "adamw_betas"),
        (dict(adamw_eps=0.0), "adamw_eps"),
        (dict(nesterov="yes"), "nesterov"),
        (dict(plan="random"), "strategy"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedMuon([torch.zeros(4, 4, requires_grad=True)], **kwargs)


def test_bad_parameter_setups_fail_at_construction():
    with pytest.raises(TypeError):
        DistributedMuon([torch.zeros(4, 4)], lr=0.1, betas=(0.9, 0.99))  # an unknown option
    with pytest.raises(ValueError, match="ndim < 2"):
        DistributedMuon([{"params": [torch.zeros(4)], "use_muon": True}])
    with pytest.raises(ValueError, match="row_blocks"):
        DistributedMuon([{"params": [torch.zeros(6, 4)], "row_blocks": (4, 4)}])
    with pytest.raises(ValueError, match="optimizer-wide"):
        DistributedMuon([{"params": [torch.zeros(6, 4)], "comm_dtype": "fp32"}])


def test_dtype_strings_are_accepted():
    for spelling, dtype in [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                            (torch.bfloat16, torch.bfloat16), ("fp32", torch.float32),
                            ("float32", torch.float32)]:
        opt = DistributedMuon([torch.zeros(4, 4)], ns_dtype=spelling, comm_dtype=spelling)
        # Groups hold the short name (plain data); the batching key holds the dtype.
        assert opt.param_groups[0]["ns_dtype"] == dtype_name(dtype) and opt.comm_dtype == dtype
        assert opt._ns_options[0].dtype == dtype
    for spelling in ("fp16", "float16", "half", torch.float16):
        opt = DistributedMuon([torch.zeros(4, 4)], ns_dtype=spelling)
        assert opt.param_groups[0]["ns_dtype"] == "fp16"


def test_fp16_is_refused_for_the_exchange_and_bad_dtypes_name_the_choices():
    with pytest.raises(ValueError, match=r"comm_dtype='fp16' is not supported: use one of "
                                         r"\['bfloat16', 'bf16', 'float32'"):
        DistributedMuon([torch.zeros(4, 4)], comm_dtype="fp16")
    with pytest.raises(ValueError, match=r"ns_dtype='int8' is not a dtype: use one of .*'fp16'"):
        DistributedMuon([torch.zeros(4, 4)], ns_dtype="int8")
    with pytest.raises(ValueError, match=r"ns_dtype=torch.int8 is not supported"):
        DistributedMuon([torch.zeros(4, 4)], ns_dtype=torch.int8)


def test_constructor_defaults_are_the_option_table():
    import inspect

    from distributed_muon.optimizer import GROUP_OPTIONS, group_defaults

    signature = inspect.signature(DistributedMuon.__init__).parameters
    keywords = {name: p.default for name, p in signature.items()
                if p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("self", "params")}
    keywords.pop("comm_dtype")  # optimizer-wide, not a group option
    group_only = {"use_muon", "row_blocks", "matrix_view"}
    assert keywords == {k: v for k, v in GROUP_OPTIONS.items() if k not in group_only}
    assert DistributedMuon([torch.zeros(4, 4)]).defaults == GROUP_OPTIONS
    assert group_defaults(lr=0.5) == {**GROUP_OPTIONS, "lr": 0.5}
    with pytest.raises(TypeError, match="unknown DistributedMuon option.*'plan'"):
        group_defaults(momentun=0.9)


def test_options_of_other_optimizers_name_ours():
    w = torch.zeros(4, 4)
    with pytest.raises(TypeError, match="use adamw_betas .* instead of betas"):
        DistributedMuon([w], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="use adamw_betas .* instead of betas"):
        DistributedMuon([{"params": [w], "betas": (0.9, 0.99)}])  # else silently ignored
    with pytest.raises(TypeError, match="use scale .* instead of adjust_lr_fn"):
        DistributedMuon([w], adjust_lr_fn="match_rms_adamw")
    with pytest.raises(ValueError, match="plan is optimizer-wide"):
        DistributedMuon([{"params": [w], "plan": "lpt"}])


def test_batches_carry_their_options_and_view():
    from distributed_muon.optimizer import ns_options
    from distributed_muon.orthogonalize import NSOptions

    a, b, c = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 8)
    opt = DistributedMuon([{"params": [a, b]},
                           {"params": [c], "ns_steps": 3, "ns_schedule": [[3.0, -3.0, 1.0]]}])
    assert opt.muon_params == (a, b, c)
    first, second = opt.exchange.batches
    assert first.options == ns_options(opt.param_groups[0]) == NSOptions(
        schedule="jordan", steps=5, dtype=torch.float16, eps=1e-7, scale="match_rms_adamw",
        method="gram")
    assert second.options.schedule == ((3.0, -3.0, 1.0),) and second.options.steps == 3
    assert first.matrices == (0, 1) and first.view.shape == (2, 4, 8)
    assert second.matrices == (2,) and second.view.shape == (1, 4, 8)
