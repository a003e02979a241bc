"""One step of ``--optimizer dmuon`` equals one step of Megatron's ``--optimizer muon``.

Both optimizers are built by ``get_megatron_optimizer`` from the same ``OptimizerConfig``
(Megatron's defaults for every ``--muon-*`` flag; only ``optimizer`` differs) for two copies of
one Megatron GPT-MoE (learned position embedding, GQA fused QKV, router, 4 experts, bf16 in
Megatron's DDP). Each step both get the *same* reduced gradients (computed on the Megatron copy,
copied into the dmuon copy's gradient buffers), so any difference is the optimizers' own.

Tolerances, from the Newton-Schulz precision:

- fp32 (``muon_fp32_matmul_prec="highest"``; dmuon then computes Newton-Schulz in fp32, and its
  exchange is fp32 here): the two differ in matmul kernels (batched vs not) and in the
  normalization ``u / (||u|| + eps)`` against ``u / max(||u||, eps)``, a relative ``eps/||u||``
  (eps = 1e-7). The loss is multiplied by ``LOSS_SCALE`` so that ``||u||`` >> 1e-4 and that
  term stays below fp32 rounding (Muon's direction and Adam's step do not depend on the
  gradient's scale beyond their eps): each parameter's update within 1e-3 of its norm.
- bf16 (the defaults, ``medium``): both iterate in bf16, whose rounding (2^-8) Newton-Schulz
  amplifies along small singular directions; dmuon also rounds ``u`` to bf16 before normalizing
  (its bf16 exchange). The bound is Megatron's own bf16 error: dmuon's distance to Megatron's
  bf16 step is at most twice Megatron's bf16 step's distance to its fp32 step (two independent
  roundings of equal size differ by about sqrt(2) of one).
- The AdamW part (embeddings, output layer, norms) and the grad norm: fp32 math, 1e-5.

Also checked: exactly the same parameters get Muon (Megatron's rule: 2-D and not marked as
embedding or output layer, so the position embedding and the router do).

Skips without CUDA, without megatron-core >= 0.19 or without emerging_optimizers.
"""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LR, WD, STEPS, SEQ, VOCAB, LOSS_SCALE = 2e-3, 0.1, 3, 32, 128, 1e3
HIDDEN, HEADS, GROUPS, EXPERTS = 64, 4, 2, 4


@pytest.fixture(scope="module")
def megatron():
    pytest.importorskip("megatron.core")
    pytest.importorskip("emerging_optimizers")
    from megatron.core import optimizer as core_optimizer

    if not hasattr(core_optimizer, "_get_megatron_emerging_optimizer"):
        pytest.skip("Megatron's Muon as compared here is megatron-core >= 0.19's")
    import distributed_muon.integrations.megatron_optimizer  # noqa: F401  (registers dmuon)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _model():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=128, num_attention_heads=HEADS,
        num_query_groups=GROUPS, num_moe_experts=EXPERTS, moe_router_topk=2,
        moe_ffn_hidden_size=96, moe_grouped_gemm=False, moe_aux_loss_coeff=0.0,
        # No linear biases: megatron-core 0.19's local-spec expert MLP adds its bias in place to
        # a custom Function's view output, which autograd refuses (mlp.py:354).
        add_bias_linear=False, bf16=True, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    gpt = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                   max_sequence_length=SEQ, position_embedding_type="learned_absolute").cuda()
    return DistributedDataParallel(
        config=config, module=Float16Module(config, gpt),
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))


def _build(optimizer: str, prec: str, start: dict[str, torch.Tensor] | None):
    """A model (weights ``start`` if given) and its optimizer from Megatron's defaults."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = _model()
    if start is not None:
        with torch.no_grad():
            for name, p in ddp.module.named_parameters():
                p.copy_(start[name])
    config = OptimizerConfig(optimizer=optimizer, lr=LR, weight_decay=WD, bf16=True,
                             clip_grad=0.0, muon_fp32_matmul_prec=prec)
    if optimizer == "dmuon" and prec != "medium":
        config.dmuon_comm_dtype = "fp32"  # isolate Newton-Schulz: nothing rounded on the way
    opt = get_megatron_optimizer(config, [ddp])
    # What Megatron's OptimizerParamScheduler sets before every training step. Without it,
    # Megatron's own optimizers decay every group by weight_decay, ignoring wd_mult (norms and
    # biases included), while dmuon applies wd_mult as the scheduler would (docs/megatron.md).
    for group in opt.param_groups:
        group["weight_decay"] = WD * group["wd_mult"]
    return ddp, opt


def _mains(ddp) -> dict[str, torch.Tensor]:
    return {n: p.main_param.detach().float().clone() for n, p in ddp.module.named_parameters()}


def _muon_names(ddp, opt) -> set[str]:
    """Names of the parameters each optimizer updates with Muon."""
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    out = set()
    for wrapper in opt.chained_optimizers:
        inner = wrapper.optimizer
        if hasattr(inner, "inner"):  # dmuon's MegatronMuon
            for group, (_, is_muon) in zip(inner.inner.param_groups, inner._inner_of,
                                           strict=True):
                if is_muon:
                    out.update(names[id(p)] for p in group["params"])
        elif type(inner).__name__.endswith("Muon"):  # Megatron's TensorParallelMuon
            out.update(names[id(p)] for group in wrapper.float16_groups for p in group)
    return out


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen).cuda()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1).cuda()
    pos = torch.arange(SEQ).cuda().unsqueeze(0).expand(2, -1)
    return tokens[:, :-1], pos, mask, tokens[:, 1:]


def _steps(runs: dict[str, tuple], steps: int) -> dict[str, list[float]]:
    """Step every (ddp, opt) of ``runs`` ``steps`` times on the gradients of the first one."""
    lead = next(iter(runs.values()))[0]
    norms: dict[str, list[float]] = {k: [] for k in runs}
    for s in range(steps):
        for ddp, opt in runs.values():
            ddp.zero_grad_buffer()
            opt.zero_grad()
        tokens, pos, mask, labels = _batch(s)
        (lead(tokens, pos, mask, labels=labels).float().mean() * LOSS_SCALE).backward()
        lead.finish_grad_sync()
        grads = {n: p.main_grad for n, p in lead.module.named_parameters()}
        for key, (ddp, opt) in runs.items():
            if ddp is not lead:
                for n, p in ddp.module.named_parameters():
                    p.main_grad.copy_(grads[n])
            ok, norm, _ = opt.step()
            assert ok
            norms[key].append(float(norm))
    return norms


def _update_errors(start, a, b) -> dict[str, float]:
    """Per parameter: ||(b - start) - (a - start)|| / ||a - start||, a the reference."""
    out = {}
    for name in start:
        step = a[name] - start[name]
        out[name] = float((b[name] - a[name]).norm() / step.norm().clamp_min(1e-30))
    return out


def _total(start, a, b, names) -> float:
    diff = sum(float((b[n] - a[n]).double().norm() ** 2) for n in names)
    size = sum(float((a[n] - start[n]).double().norm() ** 2) for n in names)
    return (diff / size) ** 0.5


def test_same_parameters_get_muon(megatron):
    ddp_m, muon = _build("muon", "medium", None)
    start = {n: p.detach().clone() for n, p in ddp_m.module.named_parameters()}
    ddp_d, dmuon = _build("dmuon", "medium", start)
    want, got = _muon_names(ddp_m, muon), _muon_names(ddp_d, dmuon)
    assert got == want
    assert any("position_embeddings" in n for n in got)  # Megatron's rule: not marked, 2-D
    assert any("router" in n for n in got)
    assert not any("word_embeddings" in n or "output_layer" in n for n in got)


@pytest.mark.parametrize("steps", [1, STEPS])
def test_dmuon_step_equals_megatron_muon(megatron, steps):
    ddp0, muon32 = _build("muon", "highest", None)
    start_weights = {n: p.detach().clone() for n, p in ddp0.module.named_parameters()}
    runs = {"muon32": (ddp0, muon32)}
    for key, optimizer, prec in (("dmuon32", "dmuon", "highest"), ("muon16", "muon", "medium"),
                                 ("dmuon16", "dmuon", "medium")):
        runs[key] = _build(optimizer, prec, start_weights)
    start = _mains(ddp0)
    norms = _steps(runs, steps)
    for key in runs:
        assert norms[key] == pytest.approx(norms["muon32"], rel=1e-5), key
    after = {key: _mains(ddp) for key, (ddp, _) in runs.items()}
    muon_names = _muon_names(ddp0, muon32)
    adam_names = set(start) - muon_names

    fp32 = _update_errors(start, after["muon32"], after["dmuon32"])
    print(f"\nfp32, {steps} step(s): max update error {max(fp32.values()):.2e}")
    for name, err in fp32.items():
        assert err < (1e-3 if name in muon_names else 1e-5), (name, err)

    bf16_noise = _total(start, after["muon32"], after["muon16"], muon_names)
    bf16_gap = _total(start, after["muon16"], after["dmuon16"], muon_names)
    print(f"bf16, {steps} step(s): dmuon vs Megatron {bf16_gap:.2e}; Megatron bf16 vs fp32 "
          f"{bf16_noise:.2e}")
    for name, err in sorted(_update_errors(start, after["muon16"], after["dmuon16"]).items()):
        print(f"  {name}: {err:.2e}")
        if name in adam_names:
            assert err < 1e-5, (name, err)
    assert bf16_gap <= 2 * bf16_noise + 1e-4


@pytest.mark.parametrize("kind", ["quintic", "polar_express", "simple", "aol", "cans"])
def test_newton_schulz_equals_emerging_optimizers(kind):
    """Our Newton-Schulz with the schedule ``--muon-coefficient-type`` maps to, against the one
    Megatron's Muon calls (emerging_optimizers), on a tall and a wide matrix: fp32 within
    1e-5; bf16 (Megatron's ``medium``) within twice its own bf16-vs-fp32 distance."""
    eo = pytest.importorskip("emerging_optimizers.orthogonalized_optimizers.muon_utils")
    from distributed_muon.integrations import megatron_parity as parity

    from distributed_muon.orthogonalize import orthogonalize

    gen = torch.Generator(device="cuda").manual_seed(0)
    schedule = parity.ns_schedule(kind, 5)
    previous = torch.get_float32_matmul_precision()
    try:
        for shape in ((96, 40), (40, 96)):
            x = torch.randn(*shape, device="cuda", generator=gen)
            torch.set_float32_matmul_precision("highest")
            want32 = eo.newton_schulz(x, steps=5, coefficient_type=kind)
            got32 = orthogonalize(x, schedule, 5, dtype="fp32")
            assert float((got32 - want32).norm() / want32.norm()) < 1e-5
            torch.set_float32_matmul_precision("medium")  # Megatron's bf16 iteration
            want16 = eo.newton_schulz(x, steps=5, coefficient_type=kind)
            torch.set_float32_matmul_precision("highest")
            got16 = orthogonalize(x, schedule, 5, dtype="bf16").float()
            noise = float((want16 - want32).norm() / want32.norm())
            gap = float((got16 - want16).norm() / want32.norm())
            print(f"\n{kind} {shape}: bf16 gap {gap:.2e}, Megatron's bf16 noise {noise:.2e}")
            assert gap <= 2 * noise + 1e-4
    finally:
        torch.set_float32_matmul_precision(previous)


def test_spectral_scale_is_five_times_match_rms_adamw():
    muon = pytest.importorskip("emerging_optimizers.orthogonalized_optimizers")
    from distributed_muon.scale import shape_scale

    for m, n in ((96, 40), (40, 96), (64, 64)):
        want = muon.get_muon_scale_factor(m, n, mode="spectral")
        assert 5 * shape_scale("match_rms_adamw", m, n) == pytest.approx(want, rel=1e-12)
        assert shape_scale("original", m, n) == pytest.approx(
            muon.get_muon_scale_factor(m, n, mode="shape_scaling"), rel=1e-12)
        assert shape_scale("spectral", m, n) == pytest.approx(
            muon.get_muon_scale_factor(m, n, mode="unit_rms_norm"), rel=1e-12)
