"""Per-head Newton-Schulz under Megatron (``--dmuon-per-head``) on 4 gloo ranks, TP=2 x DP=2.

A real megatron-core 0.16.1 `TransformerLayer` of the local spec (GQA: 4 heads in 2 query
groups, fused ``linear_qkv`` in Megatron's grouped layout) and MLA up-projections
(`ColumnParallelLinear`s named as in `MLASelfAttention`, with an `MLATransformerConfig`; the
MLA layer itself needs Transformer Engine). Every rank loads the TP shards of the same full
tensors, cut here from Megatron's own parameter attributes, and steps them three ways:

- ``megatron_param_groups(..., per_head=True)`` with `DistributedMuon` (whole TP shards, one
  copy per DP rank);
- `MegatronMuon` built from ``OptimizerConfig`` + ``dmuon_per_head`` (the flag's route),
  stepping distributed-optimizer main shards: flat ranges over DP that cut heads;
- the same without the flag.

Each shard must equal the same shard of a single-process `DistributedMuon` on the full
matrices with one row block per head, exactly (fp32, standard Newton-Schulz, fp32 exchange).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from multiproc import run_ranks

from distributed_muon import DistributedMuon, muon_param_groups

pytest.importorskip("megatron.core")

TP, WORLD, STEPS, LR, WD = 2, 4, 2, 0.02, 0.1
HIDDEN, HEADS, GROUPS, CHANNELS = 16, 4, 2, 3
Q_LORA, KV_LORA, QK, ROPE, V = 6, 8, 3, 2, 4
QKV = "layer.self_attention.linear_qkv.weight"
Q_UP, KV_UP = "mla.linear_q_up_proj.weight", "mla.linear_kv_up_proj.weight"
# rows per head of each per-head weight
HEAD_ROWS = {QKV: CHANNELS, Q_UP: QK + ROPE, KV_UP: QK + V}


def _mla_config(v_head_dim=V):
    from megatron.core.transformer import MLATransformerConfig

    return MLATransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, qk_head_dim=QK,
        qk_pos_emb_head_dim=ROPE, v_head_dim=v_head_dim, q_lora_rank=Q_LORA,
        kv_lora_rank=KV_LORA, use_cpu_initialization=True, tensor_model_parallel_size=TP,
        add_bias_linear=False)


def _mla(config, q_rows=HEADS * (QK + ROPE), kv_rows=HEADS * (QK + V)):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    column = functools.partial(ColumnParallelLinear, config=config, bias=False,
                               init_method=torch.nn.init.normal_)
    mla = torch.nn.Module()
    mla.linear_q_up_proj = column(Q_LORA, q_rows)
    mla.linear_kv_up_proj = column(KV_LORA, kv_rows)
    return mla


def _model():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=CHANNELS, ffn_hidden_size=8, use_cpu_initialization=True,
        tensor_model_parallel_size=TP, add_bias_linear=False)
    model = torch.nn.Module()
    model.layer = TransformerLayer(config, get_gpt_layer_local_spec().submodules)
    model.mla = _mla(_mla_config())
    return model


def full_shape(p):
    """The full shape of a local tensor, from Megatron's own TP attributes."""
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= TP
    return tuple(shape)


def shard(p, full, tp_rank):
    if not getattr(p, "tensor_model_parallel", False):
        return full.clone()
    return full.chunk(TP, dim=p.partition_dim)[tp_rank].clone()


def full_tensors(shapes):
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=gen) for n, s in sorted(shapes.items())}
    grads = [{n: torch.randn(s, generator=gen) for n, s in sorted(shapes.items())}
             for _ in range(STEPS)]
    return params, grads


def _config(per_head):
    from megatron.core.optimizer import OptimizerConfig

    config = OptimizerConfig(optimizer="dmuon", lr=LR, weight_decay=WD)
    config.dmuon_per_head = per_head
    config.dmuon_scale = "match_rms_adamw"  # no Megatron x5 factor: lr and wd exactly as given
    config.dmuon_ns_dtype, config.dmuon_comm_dtype = "fp32", "fp32"
    return config


def muon_options():
    """The group options `--optimizer dmuon` steps with (what the references use too)."""
    from distributed_muon.integrations.megatron_optimizer import dmuon_options

    opts = dmuon_options(_config(True))
    assert opts["ns_method"] == "standard" and opts["scale_factor"] == 1.0
    return {k: opts[k] for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_steps",
                                 "ns_schedule", "scale", "ns_dtype", "ns_method")}


def _load(model, tp_rank):
    named = dict(model.named_parameters())
    params, grads = full_tensors({n: full_shape(p) for n, p in named.items()})
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(shard(p, params[n], tp_rank))
    return named, [{n: shard(named[n], g[n], tp_rank) for n in named} for g in grads]


def _library(tp_rank):
    """megatron_param_groups(per_head=True) + DistributedMuon on whole TP shards."""
    from distributed_muon.integrations.megatron import MegatronSharding, megatron_param_groups

    model = _model()
    named, grads = _load(model, tp_rank)
    sharding = MegatronSharding(model)
    groups = megatron_param_groups(model, sharding, per_head=True, **muon_options())
    blocks = {n: g["row_blocks"] for g in groups if g["use_muon"]
              for n, _ in g["params"] if g["row_blocks"]}
    opt = DistributedMuon(groups, comm_dtype="fp32", sharding=sharding)
    for g in grads:
        for n, p in named.items():
            p.grad = g[n].clone()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in named.items()}, "blocks": blocks,
            "ns": opt.ns_matrices}


def _flag(tp_rank, per_head):
    """MegatronMuon from the flag's options, stepping distributed-optimizer main shards: the
    params laid end to end in reverse order (`buffer_layout`), cut into two DP ranges 100
    values into the fused QKV (heads of 3 x 16 values: inside a head)."""
    import torch.distributed as dist
    from distributed_muon.integrations.megatron import MegatronSharding
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon, dmuon_options
    from distributed_muon.integrations.megatron_regions import buffer_layout
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import _get_param_groups

    model = _model()
    named, grads = _load(model, tp_rank)
    name_of = {id(p): n for n, p in named.items()}
    config = _config(per_head)
    opt = MegatronMuon(_get_param_groups([model], config, {}), MegatronSharding(model),
                       **dmuon_options(config))
    dp = ps.get_data_parallel_group()
    flat = [p for g in opt.param_groups for p in g["params"]]
    bases, _ = buffer_layout([p.numel() for p in flat], 1)
    cut = next(b for p, b in zip(flat, bases, strict=True) if name_of[id(p)] == QKV) + 100
    start, stop = ((0, cut), (cut, sum(p.numel() for p in flat)))[dist.get_rank(dp)]
    spans = {id(p): (min(max(start - b, 0), p.numel()), min(max(stop - b, 0), p.numel()))
             for p, b in zip(flat, bases, strict=True)}
    mains, held = [], {}
    for g in opt.param_groups:
        pairs = []
        for p in g["params"]:
            lo, hi = spans[id(p)]
            main = p.detach().view(-1)[lo:hi].clone() if lo < hi else None
            pairs.append((main, (lo, hi)))
            if main is not None:
                held[name_of[id(p)]] = ((lo, hi), main)
        g["params"] = [m for m, _ in pairs if m is not None]
        mains.append(pairs)
    opt.bind(mains, dp)
    for g in grads:
        for n, ((lo, hi), main) in held.items():
            main.grad = g[n].reshape(-1)[lo:hi].clone()
        opt.step()
    return {"shards": {n: (span, m.detach().clone()) for n, (span, m) in held.items()},
            "ns": opt.ns_matrices}


def _errors():
    """Bad input: an MLA weight whose rows are not the config's heads; a stage without
    attention."""
    from distributed_muon.integrations.megatron import MegatronSharding, megatron_param_groups

    out = {}
    bad = torch.nn.Module()
    bad.mla = _mla(_mla_config(v_head_dim=V + 1))  # config: 4 heads of 3 + 5 rows; weight: 28
    sharding = MegatronSharding(bad)
    megatron_param_groups(bad, sharding)  # without per-head, nothing to check
    try:
        megatron_param_groups(bad, sharding, per_head=True)
    except ValueError as err:
        out["mla"] = str(err)
    plain = torch.nn.Module()
    plain.fc = torch.nn.Linear(4, 4)
    try:
        megatron_param_groups(plain, MegatronSharding(plain), per_head=True)
    except ValueError as err:
        out["no_attention"] = str(err)
    return out


def _worker(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    try:
        tp_rank = ps.get_tensor_model_parallel_rank()
        return {"tp": tp_rank, "library": _library(tp_rank), "flag": _flag(tp_rank, True),
                "no_flag": _flag(tp_rank, False), "errors": _errors() if rank == 0 else {}}
    finally:
        ps.destroy_model_parallel()


def single_process(shapes):
    """`DistributedMuon` in this process on the full tensors: every 2-D weight a Muon matrix,
    the per-head ones split in one row block per head (Megatron's storage order)."""
    params, grads = full_tensors(shapes)
    ps = {n: torch.nn.Parameter(t) for n, t in params.items()}
    groups = [{"params": [(n, ps[n])],
               "row_blocks": (HEAD_ROWS[n],) * (shapes[n][0] // HEAD_ROWS[n])}
              for n in HEAD_ROWS]
    groups.append({"params": [(n, p) for n, p in ps.items()
                              if p.ndim == 2 and n not in HEAD_ROWS]})
    groups.append({"params": [(n, p) for n, p in ps.items() if p.ndim < 2], "use_muon": False})
    opt = DistributedMuon(groups, comm_dtype="fp32", **muon_options())
    for g in grads:
        for n, p in ps.items():
            p.grad = g[n].clone()
        opt.step()
    return {n: p.detach() for n, p in ps.items()}


@pytest.fixture(scope="module")
def results():
    return run_ranks(WORLD, _worker, timeout=300)


@pytest.fixture(scope="module")
def shapes():
    # Full shapes, from a rank's local ones (the model is rebuilt here without Megatron's
    # parallel state, so they are written down instead).
    q, kv = GROUPS * (HEADS // GROUPS + 2) * CHANNELS, HEADS * CHANNELS
    return {QKV: (q, HIDDEN), "layer.self_attention.linear_proj.weight": (HIDDEN, kv),
            "layer.mlp.linear_fc1.weight": (8, HIDDEN), "layer.mlp.linear_fc2.weight": (HIDDEN, 8),
            Q_UP: (HEADS * (QK + ROPE), Q_LORA), KV_UP: (HEADS * (QK + V), KV_LORA),
            **{f"layer.{norm}.{w}": (HIDDEN,) for norm in ("input_layernorm", "pre_mlp_layernorm")
               for w in ("weight", "bias")}}


def _local(name, full, tp_rank):
    """A full tensor's TP shard (column-parallel: rows; linear_proj, fc2: columns)."""
    if full.ndim < 2:
        return full
    dim = 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0
    return full.chunk(TP, dim=dim)[tp_rank]


def test_sharded_per_head_equals_the_shard_of_per_head_on_whole_matrices(results, shapes):
    want = single_process(shapes)
    for res in results:
        got = res["library"]
        assert set(got["params"]) == set(shapes)
        for name in HEAD_ROWS:
            heads = shapes[name][0] // HEAD_ROWS[name]
            assert got["blocks"][name] == (HEAD_ROWS[name],) * heads, name
        for name, mine in got["params"].items():
            if mine.ndim == 2:
                assert torch.equal(mine, _local(name, want[name], res["tp"])), name


def test_the_flag_steps_distributed_optimizer_shards_that_cut_heads(results, shapes):
    want = single_process(shapes)
    cut_heads = False
    for res in results:
        for name, ((lo, hi), mine) in res["flag"]["shards"].items():
            if mine.ndim == 1 and len(shapes[name]) == 2:
                ref = _local(name, want[name], res["tp"]).reshape(-1)[lo:hi]
                assert torch.equal(mine, ref), (name, lo, hi)
                if name in HEAD_ROWS:
                    head = HEAD_ROWS[name] * shapes[name][1]
                    cut_heads |= bool(lo % head or hi % head)
    assert cut_heads, "some main shard must cut a head"
    # Per step: one matrix per head (8 + 4 + 4) and 3 whole weights, each once over TP x DP.
    heads = sum(shapes[n][0] // HEAD_ROWS[n] for n in HEAD_ROWS)
    assert sum(r["flag"]["ns"] for r in results) == (heads + 3) * STEPS
    assert sum(r["library"]["ns"] for r in results) == (heads + 3) * STEPS


def test_without_the_flag_attention_updates_differ_and_the_rest_does_not(results, shapes):
    for res in results:
        flag, plain = res["flag"]["shards"], res["no_flag"]["shards"]
        assert flag.keys() == plain.keys()
        for name, (span, mine) in plain.items():
            assert flag[name][0] == span, name
            other = flag[name][1]
            if name in HEAD_ROWS:
                assert (mine - other).abs().max() > 1e-4, name
            else:
                assert torch.equal(mine, other), name


def test_heads_that_do_not_fit_the_config_get_one_clear_error(results):
    errors = results[0]["errors"]
    assert (f"{KV_UP} has {HEADS * (QK + V)} rows, not "
            f"num_attention_heads={HEADS} heads of qk_head_dim + v_head_dim = {QK + V + 1} rows"
            ) in errors["mla"]
    assert "--dmuon-per-head off" in errors["mla"]
    assert "no attention projection to split" in errors["no_attention"]


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = 2
        self.qkv = torch.nn.Linear(8, 24, bias=False)  # [q; k; v] of 2 heads of 4 rows each


def test_a_model_without_megatron_attention_splits_by_the_core_rule(tmp_path):
    """A plain torch model in Megatron's DDP (what `dmuon train --backend megatron` builds):
    the flag splits its attention by the core's name rule, the update of
    ``muon_param_groups(model, per_head=True)``."""
    import torch.distributed as dist
    from distributed_muon.integrations.megatron import MegatronSharding
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.attn, model.fc = _Attention(), torch.nn.Linear(8, 8)
        ref = copy.deepcopy(model)
        group = dist.group.WORLD
        sharding = MegatronSharding(model, group=group, tp_group=group)
        opts = {"lr": LR, "weight_decay": WD, "ns_dtype": "fp32", "ns_method": "standard"}
        opt = MegatronMuon([{"params": list(model.parameters())}], sharding, per_head=True,
                           comm_dtype="fp32", **opts)
        assert opt.head_blocks == {id(model.attn.qkv.weight): (4,) * 6}
        opt.bind([[(p, None) for p in g["params"]] for g in opt.param_groups], None)
        want = DistributedMuon(muon_param_groups(ref, per_head=True, **opts), comm_dtype="fp32")
        for _ in range(STEPS):
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            opt.step()
            want.step()
        for name in ("attn.qkv.weight", "fc.weight"):
            assert torch.equal(model.get_parameter(name), ref.get_parameter(name)), name
    finally:
        dist.destroy_process_group()


def test_dmuon_train_passes_per_head_to_megatron():
    from distributed_muon.launch.train_config import TrainConfig

    TrainConfig(backend="megatron", device="cuda", per_head=True).validate(world=2)
