"""Per-head Newton-Schulz: head resolution from models, its errors, and that the per-head
update of a sharded projection is the shard of the per-head update of the whole matrix
(FSDP2 row and column shards at worlds 1-4, fp32: exactly)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks
from reference import ReferenceMuon
from torch import nn

from distributed_muon import AttentionHeads, DistributedMuon, muon_param_groups
from distributed_muon.heads import attention_row_blocks, head_row_blocks

D, HEADS, KV, HD = 12, 6, 2, 3
LR, WD = 0.02, 0.1


class GQAttention(nn.Module):
    """Llama-style grouped-query attention: the head counts are attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = HEADS, KV, HD
        self.q_proj = nn.Linear(D, HEADS * HD, bias=False)
        self.k_proj = nn.Linear(D, KV * HD, bias=False)
        self.v_proj = nn.Linear(D, KV * HD, bias=False)
        self.o_proj = nn.Linear(HEADS * HD, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, HEADS, HD).transpose(1, 2)
        k, v = (p(x).view(b, t, KV, HD).transpose(1, 2).repeat_interleave(HEADS // KV, 1)
                for p in (self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HEADS * HD))


class FusedAttention(nn.Module):
    """One fused ``[q | k | v]`` weight and only a head count (as `launch/tiny_moe.py`)."""

    def __init__(self, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(D, 3 * heads * HD, bias=False)
        self.proj = nn.Linear(heads * HD, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.transpose(1, 2) for y in
                   self.qkv(x).view(b, t, 3, self.heads, HD).unbind(2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * HD))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = GQAttention()
        self.fused = FusedAttention()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        x = x + self.fused(x)
        return (self.fc(x) ** 2).mean()


# What per-head splits in `Net`: heads of HD rows; o_proj, proj and fc stay whole.
EXPECTED = {"attn.q_proj.weight": (HD,) * HEADS, "attn.k_proj.weight": (HD,) * KV,
            "attn.v_proj.weight": (HD,) * KV, "fused.qkv.weight": (HD,) * 9}


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_heads_resolved_from_attributes_gqa_and_fused():
    assert attention_row_blocks(_net()) == EXPECTED


def test_heads_from_config_only():
    """A module with no head attributes: the model's config gives them (GQA, no head_dim:
    rows / heads for Q, the query's width for K and V)."""
    net = _net()
    for key in ("num_heads", "num_key_value_heads", "head_dim"):
        delattr(net.attn, key)
    net.config = SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=KV)
    assert attention_row_blocks(net) == EXPECTED


def test_multihead_attention_and_latent_attention():
    mha = nn.Sequential(nn.MultiheadAttention(12, 4), nn.Linear(12, 12))
    assert attention_row_blocks(mha) == {"0.in_proj_weight": (3,) * 12}

    class Latent(nn.Module):  # DeepSeek-style MLA: q_b 4 heads x (8 + 4), kv_b 4 x (8 + 6)
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.head_dim = 4, 4  # head_dim (the rope width) is not a Q head
            self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = 8, 4, 6
            self.q_a_proj, self.q_b_proj = nn.Linear(16, 10), nn.Linear(10, 48)
            self.kv_a_proj_with_mqa, self.kv_b_proj = nn.Linear(16, 14), nn.Linear(10, 56)
            self.o_proj = nn.Linear(24, 16)

    assert attention_row_blocks(nn.ModuleDict({"attn": Latent()})) == {
        "attn.q_b_proj.weight": (12,) * 4, "attn.kv_b_proj.weight": (14,) * 4}


def test_hugging_face_gqa_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, num_hidden_layers=1, intermediate_size=32,
                                   vocab_size=64)
    blocks = attention_row_blocks(transformers.Qwen3ForCausalLM(cfg))
    pre = "model.layers.0.self_attn."
    assert blocks == {pre + "q_proj.weight": (16,) * 4, pre + "k_proj.weight": (16,) * 2,
                      pre + "v_proj.weight": (16,) * 2}


def test_param_groups_per_head():
    groups = muon_param_groups(_net(), per_head=True, row_blocks={"fused.qkv.weight": (9, 9, 9)})
    got = {n: g["row_blocks"] for g in groups if g["use_muon"] for n, _ in g["params"]}
    assert got == {**EXPECTED, "attn.o_proj.weight": None, "fused.proj.weight": None,
                   "fc.weight": None}
    # Globs: only the named weights split.
    groups = muon_param_groups(_net(), per_head=["*.q_proj.weight"])
    got = {n: g["row_blocks"] for g in groups if g["use_muon"] for n, _ in g["params"]}
    assert got["attn.q_proj.weight"] == (HD,) * HEADS and got["fused.qkv.weight"] is None
    # An explicit override of the geometry wins over the attributes.
    blocks = attention_row_blocks(_net(), ["attn.[qkv]_proj.weight"],
                                  heads=AttentionHeads(3, 1, 6))
    assert blocks == {"attn.q_proj.weight": (6, 6, 6), "attn.k_proj.weight": (6,),
                      "attn.v_proj.weight": (6,)}


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_input_is_one_clear_line():
    net = _net()
    net.attn.num_heads = 4  # 18 rows do not split into 4 heads
    _one_line_error(lambda: attention_row_blocks(net), r"attn\.q_proj\.weight .*does not split")
    _one_line_error(lambda: attention_row_blocks(_net(), heads=AttentionHeads(2, 1, 9)),
                    r"attn\.k_proj\.weight .*does not split into 1 heads of 9")
    # Per-head asked, no attention at all.
    _one_line_error(lambda: muon_param_groups(nn.Sequential(nn.Linear(4, 4)), per_head=True),
                    "no attention projection")
    # An attention projection whose module and model say nothing of heads.
    net = _net()
    del net.fused.heads
    _one_line_error(lambda: attention_row_blocks(net), r"no head count found for fused\.qkv")
    # Explicit row blocks that cut a head; globs naming nothing or a non-attention weight.
    _one_line_error(lambda: muon_param_groups(_net(), per_head=True,
                                              row_blocks={"fused.qkv.weight": (10, 8, 9)}),
                    "cut through a head")
    _one_line_error(lambda: muon_param_groups(_net(), per_head=["*.nothing"]), "match no")
    _one_line_error(lambda: muon_param_groups(_net(), per_head=["fc.weight"]),
                    "not a Q, K, V")
    _one_line_error(lambda: head_row_blocks(10, 3, "w"), "w has 10 rows")
    _one_line_error(lambda: AttentionHeads(6, 4), "not a multiple")


def test_output_projection_and_mlp_stay_whole():
    blocks = attention_row_blocks(_net())
    assert not {"attn.o_proj.weight", "fused.proj.weight", "fc.weight"} & set(blocks)


# ------------------------------------------------------------------ FSDP2, worlds 1-4

STEPS = 2


def _grads(net: Net) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen) for p in net.parameters()]
            for _ in range(STEPS)]


def _reference(per_head: bool) -> list[torch.Tensor]:
    """Independent per-matrix Muon (tests/reference.py) on whole tensors, each head its own
    matrix: the per-head update of the whole matrix."""
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    ps = [p.detach().clone() for p in net.parameters()]
    muon = [i for i, n in enumerate(names) if ps[i].ndim == 2]
    blocks = {muon.index(i): EXPECTED[n] for i, n in enumerate(names)
              if per_head and n in EXPECTED}
    ref = ReferenceMuon([ps[i] for i in muon], lr=LR, weight_decay=WD, row_blocks=blocks)
    for g in _grads(net):
        ref.step([g[i] for i in muon])
    return [ps[i] for i in muon]


def _fsdp2_worker(rank: int, world: int, columns: bool) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    net = _net()
    grads = _grads(net)
    mesh = init_device_mesh("cpu", (world,))

    def placement(p: nn.Parameter) -> Shard:
        # FSDP2 shards columns only evenly: the matrices whose columns divide the world.
        return Shard(1) if columns and p.ndim == 2 and p.shape[1] % world == 0 else Shard(0)

    fully_shard(net, mesh=mesh, shard_placement_fn=placement)
    # Muon for every matrix here (the fc bias to AdamW), heads read from the sharded model.
    opt = DistributedMuon(muon_param_groups(net, per_head=True), lr=LR, weight_decay=WD,
                          ns_dtype="fp32", comm_dtype="fp32")
    for g in grads:
        for p, gi in zip(net.parameters(), g, strict=True):
            p.grad = distribute_tensor(gi, mesh, p.placements)
        opt.step()
    return [p.full_tensor() for p in net.parameters() if p.ndim == 2]


_WHOLE: list[torch.Tensor] = []


def _unsharded() -> list[torch.Tensor]:
    """The same optimizer at world 1: per-head NS of the whole matrices (computed once)."""
    if not _WHOLE:
        _WHOLE.extend(run_ranks(1, _fsdp2_worker, False, timeout=120)[0])
    return _WHOLE


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
def test_fsdp2_sharded_per_head_equals_whole(world, columns):
    """Row shards of 5/5/5/3 (4 ranks) or 6/6/6 rows cut the 3-row heads of q_proj and
    qkv; k/v's 6 rows go 2/2/2/0; column shards cut every head's columns. Each rank's shard
    after the steps is exactly (fp32) that shard of the world-1 result."""
    whole = _unsharded()
    for got in run_ranks(world, _fsdp2_worker, columns, timeout=120):
        for g, w in zip(got, whole, strict=True):
            assert torch.equal(g, w), float((g - w).abs().max())


def test_world_one_is_per_head_muon():
    """World 1 equals the independent per-matrix reference with every head its own matrix
    (fp32, to rounding: another order of the same float operations), and differs from
    whole-matrix Muon."""
    want, whole = _reference(per_head=True), _reference(per_head=False)
    for g, w in zip(_unsharded(), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    split = [0, 1, 2, 4]  # q, k, v, qkv (o_proj, proj and fc are whole in both)
    assert all(not torch.allclose(want[i], whole[i]) for i in split)
    assert all(torch.equal(want[i], whole[i]) for i in (3, 5, 6))


# ------------------------------------------------------------------ dmuon plan, cost model

# hidden 8, 2 layers, 2 heads of 4, 1 KV head, MLP 16 (as tests/test_cluster_plan.py's TINY).
TINY = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 16}


def test_plan_counts_heads_as_matrices():
    from distributed_muon.launch.model_configs import load_model, params_from_config
    from distributed_muon.launch.plan import PlanConfig, run_plan

    from distributed_muon.plan import ns_flops

    params = params_from_config(TINY, per_head=True)
    blocks = {p.name.split(".", 2)[2]: p.row_blocks for p in params if p.layer == 0}
    assert blocks["self_attn.q_proj.weight"] == (4, 4)
    assert blocks["self_attn.k_proj.weight"] == blocks["self_attn.v_proj.weight"] == (4,)
    assert blocks["self_attn.o_proj.weight"] is None
    cfg = PlanConfig(model="x", layout="fsdp2", gpus=2, tp=1, ep=1, pp=1, replicate=1,
                     hardware="h100", gpus_per_node=None, peak_tflops=None, ns_efficiency=None,
                     hbm_gbs=None, intra_gbs=None, inter_gbs=None, ns_steps=5, comm_bytes=2,
                     strategies=("redundant", "lpt"), per_head=True)
    result = run_plan(cfg, params)
    # Per layer: q's 2 heads + k + v (4 x 8 each), o (8 x 8), gate, up, down.
    assert result["matrices"] == result["units"][0]["matrices"] == 2 * (4 + 1 + 3)
    total = 2 * (4 * ns_flops(4, 8, 5) + ns_flops(8, 8, 5) + 3 * ns_flops(16, 8, 5))
    redundant, lpt = result["strategies"]
    assert redundant["ns_flops_max"] == total and lpt["ns_flops_max"] == total / 2
    # Latent attention: q_b per (nope + rope), kv_b per (nope + v); presets resolve per head.
    ds = {p.name.split(".", 2)[2]: p.row_blocks for p in load_model("deepseek-v3", True)
          if p.layer == 0}
    assert ds["self_attn.q_b_proj.weight"] == (192,) * 128
    assert ds["self_attn.kv_b_proj.weight"] == (256,) * 128
    assert ds["self_attn.q_a_proj.weight"] is None


def test_plan_per_head_needs_heads(capsys):
    from distributed_muon.launch.cli import main

    assert main(["plan", "--model", "bench-16x2048", "--gpus", "2", "--per-head"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no attention heads" in err, err


def test_trainer_factory_takes_per_head():
    from distributed_muon.integrations.transformers import muon_optimizer

    net = _net()
    opt = muon_optimizer(net, per_head=True, lr=0.01)
    split = {id(p) for g in opt.param_groups if g["row_blocks"] for p in g["params"]}
    assert split == {id(p) for n, p in net.named_parameters() if n in EXPECTED}
    blocks = {tuple(g["row_blocks"]) for g in opt.param_groups if g["row_blocks"]}
    assert blocks == {(HD,) * HEADS, (HD,) * KV, (HD,) * 9}
