"""What ``--optimizer dmuon`` shares with Megatron's Muon, checked on CPU (megatron-core 0.16.1,
one gloo rank): which parameters of a real Megatron GPT-MoE get Muon, the QKV split with an
output gate, the Newton-Schulz schedules and precision each ``--muon-*`` flag maps to.

One step against Megatron's Muon itself needs CUDA: tests/test_gpu_megatron_parity.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from distributed_muon.integrations import megatron_parity as parity  # noqa: E402

from distributed_muon.orthogonalize import orthogonalize  # noqa: E402

HEADS, GROUPS, CHANNELS, HIDDEN = 4, 2, 8, 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    store = tmp_path_factory.mktemp("store") / "s"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _gpt(**config):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, kv_channels=CHANNELS, ffn_hidden_size=64,
                            num_moe_experts=4, moe_router_topk=2, moe_grouped_gemm=False,
                            add_bias_linear=True, use_cpu_initialization=True, **config)
    spec = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64,
                    max_sequence_length=16, position_embedding_type="learned_absolute")


def _muon_names(model) -> set[str]:
    from distributed_muon.integrations.megatron import MegatronSharding
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon

    sharding = MegatronSharding(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MegatronMuon([{"params": params}], sharding,
                       marked=parity.marks_embeddings(params))
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for group, is_muon in opt._split(params) if is_muon
            for p in group["params"]}


def test_megatron_gpt_params_on_muon_are_megatrons(world):
    model = _gpt()
    got = _muon_names(model)
    # Megatron's Muon (megatron-core 0.16 and 0.19): 2-D and not marked embedding/output.
    want = {n for n, p in model.named_parameters()
            if p.ndim == 2 and not getattr(p, "is_embedding_or_output_parameter", False)}
    assert got == want
    assert "embedding.position_embeddings.weight" in got  # not marked by Megatron
    assert "decoder.layers.0.mlp.router.weight" in got
    assert "embedding.word_embeddings.weight" not in got
    assert "output_layer.weight" not in got
    assert not any(n.endswith(".bias") or "norm" in n for n in got)


def test_dmuon_adamw_globs_take_params_off_muon(world):
    model = _gpt()
    marked = parity.marks_embeddings(model.parameters())
    p = model.embedding.position_embeddings.weight
    name = "embedding.position_embeddings.weight"
    assert parity.uses_muon(p, name, tuple(p.shape), marked=marked)
    assert not parity.uses_muon(p, name, tuple(p.shape), marked=marked,
                                adamw=("*position_embeddings*",))


def test_unmarked_model_keeps_the_name_rule():
    embed = torch.nn.Parameter(torch.zeros(8, 4))
    experts = torch.nn.Parameter(torch.zeros(2, 8, 4))
    assert not parity.uses_muon(embed, "embed.weight", (8, 4), marked=False)
    assert parity.uses_muon(experts, "moe.experts", (2, 8, 4), marked=False)  # 3-D experts
    assert not parity.uses_muon(experts, "moe.experts", (2, 8, 4), marked=True)  # Megatron: 2-D


def test_qkv_split_with_output_gate(world):
    """Megatron splits a gated fused QKV in four: all q, all gates, all k, all v rows."""
    from distributed_muon.integrations.megatron import MegatronSharding

    from distributed_muon.params import MatrixSpec

    model = _gpt(attention_output_gate=True)
    sharding = MegatronSharding(model)
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    q = HEADS // GROUPS * CHANNELS
    sections = (q, q, CHANNELS, CHANNELS)
    blocks = sharding.qkv_row_blocks(qkv)
    assert blocks == tuple(GROUPS * s for s in sections)
    # The regions place every stored row at its row in [all q; all gates; all k; all v].
    spec = MatrixSpec.of(sharding.shape(qkv), row_blocks=blocks)
    local = qkv.detach().reshape(-1)
    grouped = torch.full((qkv.shape[0], qkv.shape[1]), float("nan"))
    for region in sharding.regions(qkv, spec):
        b = region.block
        n = b.stop - b.start
        grouped[b.row0:b.row1].view(-1)[b.start:b.stop] = local[region.offset:region.offset + n]
    per_group = qkv.detach().view(GROUPS, sum(sections), -1).split(sections, dim=1)
    want = torch.cat([s.reshape(-1, qkv.shape[1]) for s in per_group])
    assert torch.equal(grouped, want)


@pytest.mark.parametrize("kind, steps, first, last", [
    ("quintic", 5, (4.0848, -6.8946, 2.9270), (2.8366, -3.0525, 1.2012)),
    ("quintic", 7, (4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377)),  # cycles
    ("polar_express", 10, (8.2051, -22.9019, 16.4607), (1.8750, -1.2500, 0.3750)),  # repeats
    ("aol", 6, (4.0098, -7.0585, 2.4635), (3.4585, -5.5479, 2.5959)),
])
def test_coefficient_types_give_one_triple_per_step(kind, steps, first, last):
    schedule = parity.ns_schedule(kind, steps)
    assert len(schedule) == steps and schedule[0] == first and schedule[-1] == last


def test_simple_is_jordans_quintic_and_precision_maps_to_dtype():
    assert parity.ns_schedule("simple", 5) == "jordan"
    assert [parity.ns_dtype(p) for p in ("medium", "high", "highest")] == ["bf16", "fp32",
                                                                            "fp32"]
    with pytest.raises(ValueError, match="--muon-fp32-matmul-prec low"):
        parity.ns_dtype("low")


def test_quintic_schedule_orthogonalizes_as_megatron_defines_it():
    """Our Newton-Schulz with Megatron's per-step coefficients equals the iteration written
    out as Megatron defines it (fp32: X / max(||X||, eps), transposed when tall, then
    X <- a X + (b A + c A A) X with A = X X^T), up to the normalization's eps form."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 20, generator=gen, dtype=torch.float64) * 3
    schedule = parity.ns_schedule("quintic", 5)
    want = x.mT / x.norm().clamp_min(1e-7)
    for a, b, c in schedule:
        A = want @ want.mT
        want = a * want + (b * A + c * A @ A) @ want
    got = orthogonalize(x.float(), schedule, 5, dtype="fp32")
    assert torch.allclose(got.double(), want.mT, atol=2e-5)


def test_megatron_param_groups_follow_the_same_rule(world):
    """Your own loop (`megatron_param_groups`): the same Muon set as ``--optimizer dmuon``, the
    fused QKV in its own group split as Megatron splits it."""
    from distributed_muon.integrations.megatron import MegatronSharding, megatron_param_groups

    model = _gpt()
    sharding = MegatronSharding(model)
    groups = megatron_param_groups(model, sharding, lr=0.02)
    muon = {n for g in groups if g["use_muon"] for n in g["param_names"]}
    assert muon == _muon_names(model)
    qkv = next(g for g in groups if g.get("row_blocks"))
    assert qkv["param_names"] == ["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = HEADS // GROUPS * CHANNELS
    assert qkv["row_blocks"] == (GROUPS * q, GROUPS * CHANNELS, GROUPS * CHANNELS)
    assert all(g["lr"] == 0.02 for g in groups if g["use_muon"])


def test_tiny_moe_in_megatrons_ddp_splits_as_the_other_backends(world):
    """``dmuon train --backend megatron``: the tiny MoE's router and position table get AdamW and
    its fused qkv splits into Q, K, V, as `muon_param_groups` with the model's spec gives the
    other backends (the router and ``pos`` went to Muon and qkv stayed whole before)."""
    from distributed_muon.integrations.megatron import MegatronSharding
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon, dmuon_options
    from distributed_muon.launch.megatron_backend import megatron_spec
    from distributed_muon.launch.tiny_moe import ModelConfig, TinyMoE
    from megatron.core.optimizer import OptimizerConfig

    from distributed_muon import muon_param_groups

    model = TinyMoE(ModelConfig(d=32, layers=2, hidden=64, seq=16))
    want = {}
    for group in muon_param_groups(model, **model.param_groups_spec()):
        for name, _ in group["params"]:
            want[f"module.{name}"] = group["row_blocks"] if group["use_muon"] else "adamw"
    config = OptimizerConfig(optimizer="dmuon", lr=1e-3)
    for attr, value in megatron_spec(model.param_groups_spec()).items():
        setattr(config, attr, value)
    ddp = torch.nn.Module()
    ddp.module = model  # where Megatron's DistributedDataParallel keeps the model (CUDA only)
    params = list(ddp.parameters())
    opt = MegatronMuon([{"params": params}], MegatronSharding(ddp), **dmuon_options(config))
    got = {name: group.get("row_blocks") if is_muon else "adamw"
           for group, is_muon in opt._split(params) for name in group["param_names"]}
    assert got == want
    assert got["module.pos"] == got["module.blocks.0.moe.router.weight"] == "adamw"
    assert got["module.blocks.1.attn.qkv.weight"] == (32, 32, 32)
    # Without the spec, the unmarked rule: both on Muon, qkv whole.
    plain = MegatronMuon([{"params": params}], MegatronSharding(ddp),
                         **dmuon_options(OptimizerConfig(optimizer="dmuon", lr=1e-3)))
    bare = {name: group.get("row_blocks") for group, is_muon in plain._split(params) if is_muon
            for name in group["param_names"]}
    assert "module.pos" in bare and bare["module.blocks.1.attn.qkv.weight"] is None


def test_megatron_muon_takes_plan_as_its_former_name(world):
    from distributed_muon.integrations.megatron import MegatronSharding
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon

    model = torch.nn.Linear(4, 8)
    params = list(model.parameters())
    with pytest.warns(DeprecationWarning, match="MegatronMuon: plan is deprecated"):
        opt = MegatronMuon([{"params": params}], MegatronSharding(model), plan="round_robin")
    assert opt.owner_strategy == "round_robin"
    with pytest.raises(TypeError, match="pass owner_strategy only"):
        MegatronMuon([{"params": params}], MegatronSharding(model), plan="lpt",
                     owner_strategy="round_robin")
