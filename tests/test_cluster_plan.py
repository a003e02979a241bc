"""`dmuon plan`: layouts from metadata, hand-checked costs, the JSON, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distributed_muon.launch.cli import main
from distributed_muon.launch.layouts import units
from distributed_muon.launch.model_configs import PRESETS, load_model, params_from_config
from distributed_muon.launch.plan import (
    Hardware,
    PlanConfig,
    layerwise_owners,
    predict,
    run_plan,
)

from distributed_muon.cluster import LAYOUTS, ModelParam, ParallelLayout
from distributed_muon.plan import OwnershipPlan, ns_flops
from tests.multiproc import run_ranks

# hidden 8, 2 layers, 2 heads of 4, 1 KV head, MLP 16: q [8, 8], k [4, 8], v [4, 8],
# o [8, 8], gate [16, 8], up [16, 8], down [8, 16] per layer.
TINY = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 16}
# NS FLOPs of 5 steps, 5 * (4 a^2 b + 2 a^3), a = min(m, n), b = max(m, n):
Q = 5 * (4 * 8 * 8 * 8 + 2 * 8**3)  # 8 x 8: 15360
K = 5 * (4 * 4 * 4 * 8 + 2 * 4**3)  # 4 x 8: 3200
MLP = 5 * (4 * 8 * 8 * 16 + 2 * 8**3)  # 16 x 8 and 8 x 16: 25600
TOTAL = 2 * (2 * Q + 2 * K + 3 * MLP)  # 227840
VALUES = 2 * (64 + 32 + 32 + 64 + 3 * 128)  # 1152
HW = Hardware("test", peak_tflops=1.0, hbm_gbs=1.0, intra_gbs=1.0, inter_gbs=0.5,
              gpus_per_node=8, ns_efficiency=0.5, elementwise_bytes=10.0)


def tiny_units(kind="fsdp2", world=2, **kw):
    return units(params_from_config(TINY), ParallelLayout(kind, world, **kw))


def test_config_gives_the_hand_counted_matrices():
    params = params_from_config(TINY)
    assert [p.shape for p in params[:7]] == [(8, 8), (4, 8), (4, 8), (8, 8), (16, 8), (16, 8),
                                            (8, 16)]
    assert sum(ns_flops(*p.shape, 5) for p in params) == TOTAL == 227840
    # DeepSeek-V3: 61 layers, 3 dense, 58 MoE of 256 experts (3 tensors each) and 1 shared.
    ds = load_model("deepseek-v3")
    experts = [p for p in ds if p.expert]
    assert len(experts) == 58 * 3 and experts[0].shape == (256, 2048, 7168)
    assert sum(np.prod(p.shape[:-2]) for p in ds) == 61 * 5 + 3 * 3 + 58 * (1 + 3 * 256 + 3)
    by_name = {p.name: p.shape for p in ds}
    assert by_name["layers.0.self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert by_name["layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    # Moonlight has no q LoRA: one q_proj; Qwen3's MoE has no shared experts.
    assert "layers.0.self_attn.q_proj.weight" in {p.name for p in load_model("moonlight-16b-a3b")}
    assert not any("shared" in p.name for p in load_model("qwen3-235b-a22b"))


def test_plan_flops_and_bytes_equal_a_hand_computation():
    # FSDP2 on 2 ranks splits every matrix in two halves: nothing is pinned. LPT: the six
    # MLP matrices 3 each, the four 8x8 2 each, the four 4x8 2 each: TOTAL / 2 per rank.
    lpt = predict(tiny_units(), "lpt", HW)
    assert lpt.ns_flops_max == lpt.ns_flops_mean == TOTAL / 2
    assert lpt.imbalance == 1.0
    assert lpt.ns_ms == pytest.approx(TOTAL / 2 / (1e12 * 0.5) * 1e3)
    assert lpt.per_rank["ns_flops"] == [TOTAL / 2] * 2
    assert lpt.per_rank["ns_ms"] == pytest.approx([lpt.ns_ms] * 2)
    # Each rank sends the half of every matrix it does not own and receives the half of every
    # one it owns, and the reverse for the update: all VALUES, in bf16, per rank.
    assert lpt.intra_bytes_max == lpt.intra_bytes_mean == 2 * VALUES
    assert lpt.inter_bytes_max == 0
    # To owners, each rank sends (and receives) a quarter of VALUES: VALUES / 2 bytes in bf16,
    # over 1 GB/s (1e6 bytes per ms).
    assert lpt.to_owners_ms == pytest.approx(VALUES / 2 / 1e6)
    # One GPU per node: the same bytes cross nodes, at 0.5 GB/s.
    one = predict(tiny_units(), "lpt", Hardware(**{**HW.__dict__, "gpus_per_node": 1}))
    assert one.inter_bytes_max == 2 * VALUES and one.intra_bytes_max == 0
    assert one.to_owners_ms == pytest.approx(2 * lpt.to_owners_ms)
    # Redundant NS: every rank orthogonalizes everything after gathering the other half.
    red = predict(tiny_units(), "redundant", HW)
    assert red.ns_flops_max == TOTAL and red.intra_bytes_max == VALUES // 2 * 2
    # Elementwise: the busiest rank's local values (half of all) x 10 bytes at 1 GB/s.
    assert lpt.elementwise_ms == pytest.approx(VALUES / 2 * 10 / 1e6)


def test_strategies_on_a_known_plan():
    unit = tiny_units(world=4)[0]
    layout = unit.layout(0)
    costs = [ns_flops(m.m, m.n, 5) for m in layout.matrices]
    rr = OwnershipPlan.build(layout, costs, "round_robin")
    assert list(rr.owner) == [i % 4 for i in range(14)]
    # Layer-wise: model order cut in 4 runs of equal cost (the midpoint of each matrix).
    owners = layerwise_owners(layout, costs)
    assert owners == sorted(owners) and owners[0] == 0 and owners[-1] == 3
    lpt = predict([unit], "lpt", HW)
    assert lpt.imbalance <= predict([unit], "round_robin", HW).imbalance


def _real_fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from distributed_muon import DistributedMuon

    out = {}
    for kind, mesh, placements in (
            ("fsdp2", init_device_mesh("cpu", (world,)), [Shard(0)]),
            ("hsdp", init_device_mesh("cpu", (2, world // 2)), [Replicate(), Shard(0)])):
        params = [torch.nn.Parameter(distribute_tensor(torch.zeros(p.shape), mesh, placements))
                  for p in params_from_config(MOE)]
        opt = DistributedMuon(params, lr=0.1)
        out[kind] = torch.from_numpy(opt.layout.table.copy())
    return out


# A tiny Qwen-style MoE: 3 experts over 4 ranks (uneven, one rank without any), 5-row q.
MOE = {"hidden_size": 6, "num_hidden_layers": 2, "num_attention_heads": 1, "head_dim": 5,
       "num_key_value_heads": 1, "intermediate_size": 10, "moe_intermediate_size": 3,
       "num_experts": 3, "decoder_sparse_step": 2}


def test_planned_layout_is_the_one_a_process_group_builds():
    results = run_ranks(4, _real_fsdp_worker, timeout=120)
    for kind, kw in (("fsdp2", {}), ("hsdp", {"replicate": 2})):
        (unit,) = units(params_from_config(MOE), ParallelLayout(kind, 4, **kw))
        planned = unit.layout(0).table
        for got in results:
            assert np.array_equal(got[kind].numpy(), planned), kind


# Even sizes for tensor parallel 2: 4 experts, MoE on layer 1.
MOE_EVEN = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "intermediate_size": 16, "moe_intermediate_size": 4,
            "num_experts": 4, "decoder_sparse_step": 2}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_layout_tiles_and_plans(kind):
    extra = ({"tp": 2} if kind.startswith("megatron") else {"replicate": 2} if kind == "hsdp"
             else {})
    params = params_from_config(MOE_EVEN)
    for pp in (1, 2):
        all_units = units(params, ParallelLayout(kind, 8, pp=pp, **extra))
        assert {u.stage for u in all_units} == set(range(pp))
        for u in all_units:
            lay = u.layout(0)  # validated: every replica tiles every matrix exactly once
            assert len(lay.matrices) == sum(len(s.matrices()) for s in u.specs)
        cost = predict(all_units, "lpt", HW)
        assert cost.ns_flops_max > 0 and cost.optimizer_ms > 0
    # Megatron TP 2: column-parallel weights are row halves, row-parallel ones column halves.
    (mega,) = units(params_from_config(TINY), ParallelLayout("megatron", 2, tp=2))
    q, o = mega.tables[0], mega.tables[3]
    assert q[:, 2:4].tolist() == [[0, 4], [4, 8]] and o[:, 4:6].tolist() == [[0, 4], [4, 8]]
    # With the distributed optimizer on 4 ranks (TP 2 x DP 2): each TP rank's buffer holds 576
    # values (288 per layer), filled in reverse, cut in two: layer 1 on DP rank 0 (ranks 0-1),
    # layer 0 on DP rank 1 (ranks 2-3), one replica; layer 0's q is TP halves of 32 values.
    (do,) = units(params_from_config(TINY), ParallelLayout("megatron_do", 4, tp=2))
    assert do.tables[0].tolist() == [[2, 0, 0, 4, 0, 8, 0, 32, 0], [3, 0, 4, 8, 0, 8, 0, 32, 0]]
    assert do.tables[7][:, 0].tolist() == [0, 1]


def test_expert_parallel_layouts():
    moe = [ModelParam("e", (8, 4, 6), 0, expert=True, tp="col")]
    # FSDP2 + EP 2 on 8 ranks: 4 local experts over 4 FSDP ranks: one whole expert each,
    # pinned (no traffic); experts of EP rank e on ranks with index % 2 == e.
    (unit,) = units(moe, ParallelLayout("fsdp2", 8, ep=2))
    lay = unit.layout(0)
    owners = OwnershipPlan.build(lay, [1.0] * 8).owner
    assert sorted(owners) == list(range(8)) and owners[1] == 2  # expert 1: EP 0, FSDP rank 1
    # 16 ranks: 4 local experts over 8 FSDP ranks: Shard(1), rows of every local expert.
    (unit,) = units(moe, ParallelLayout("fsdp2", 16, ep=2))
    assert {pc.rank for pc in unit.layout(0).pieces[0]} == {0, 2, 4, 6}
    # Megatron EP 4 (expert-TP 1): expert j of every EP rank is one [4, m, n] parameter.
    (unit,) = units(moe, ParallelLayout("megatron", 8, ep=4))
    assert len(unit.specs) == 2 and unit.specs[0].shape == (4, 4, 6)
    # ZeRO with EP: a dense unit over all ranks and an expert unit over the expert-DP group.
    zero = units(moe + [ModelParam("d", (4, 4), 0)], ParallelLayout("zero1", 8, ep=2))
    assert [(u.name, len(u.ranks), u.copies) for u in zero] == [
        ("stage 0", 8, 1), ("stage 0 experts", 4, 2)]
    assert zero[1].ranks.tolist() == [0, 2, 4, 6]


def test_zero_partitions():
    params = [ModelParam("a", (3, 5), 0), ModelParam("b", (2, 4), 0)]  # 15 + 8 = 23 values
    (unit,) = units(params, ParallelLayout("zero1", 4))  # ranges of 6: 0-6, 6-12, 12-18, 18-23
    assert unit.tables[0][:, [0, 6, 7]].tolist() == [[0, 0, 6], [1, 6, 12], [2, 12, 15]]
    assert unit.tables[1][:, [0, 6, 7]].tolist() == [[2, 0, 3], [3, 3, 8]]
    # DeepSpeed counts a sub-group's values per rank: a holds 4 of its 15 on each of 4 ranks.
    z3 = units(params, ParallelLayout("zero3", 4, sub_group_size=4))
    assert [u.names for u in z3] == [["a"], ["b"]]  # a new sub-group once 4 values are in
    assert z3[0].tables[0][:, [0, 6, 7]].tolist() == [[0, 0, 4], [1, 4, 8], [2, 8, 12],
                                                      [3, 12, 15]]


MOE_PRESETS = ("deepseek-v3", "kimi-k2", "qwen3-235b-a22b", "moonlight-16b-a3b")


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_every_preset_plans(model, tmp_path):
    out = tmp_path / "plan.json"
    # Every strategy on the small models; our LPT alone on the 40k-matrix ones (fast tests).
    big = model in ("deepseek-v3", "kimi-k2")
    argv = ["plan", "--model", model, "--gpus", "16", "--ep", "8" if model in MOE_PRESETS
            else "1", "--hardware", "h200", "--json", str(out)]
    assert main(argv + (["--strategies", "lpt"] if big else [])) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"model", "layout", "hardware", "matrices", "units", "strategies"}
    by = {s["strategy"]: s for s in result["strategies"]}
    assert list(by) == (["lpt"] if big else ["redundant", "round_robin", "lpt", "layerwise"])
    for s in by.values():
        assert set(s) >= {"ns_flops_max", "imbalance", "ns_ms", "to_owners_ms", "to_holders_ms",
                          "optimizer_ms", "floor_ms", "intra_bytes_max", "inter_bytes_max"}
        assert s["optimizer_ms"] >= s["floor_ms"] * 0.999
    if not big:
        assert by["lpt"]["imbalance"] <= by["round_robin"]["imbalance"]
        assert by["redundant"]["ns_flops_max"] == pytest.approx(by["lpt"]["ns_flops_mean"] * 16)


def test_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"text_config": TINY}))
    assert main(["plan", "--model", str(cfg), "--gpus", "2", "--strategies", "lpt"]) == 0
    out = capsys.readouterr().out
    assert "14 matrices" in out and "lpt" in out and "redundant" not in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--gpus", "8"], "neither a preset"),
    (["--model", "llama-3-70b", "--gpus", "12", "--layout", "megatron", "--tp", "8"],
     "not a multiple"),
    (["--model", "deepseek-v3", "--gpus", "24", "--ep", "24"], "do not split"),
    (["--model", "llama-3-70b", "--gpus", "8", "--tp", "2"], "needs the megatron"),
    (["--model", "llama-3-70b", "--gpus", "8", "--ns-efficiency", "2"], "at most 1"),
    (["--model", "llama-3-70b", "--gpus", "0"], "at least 1"),
    (["--model", "llama-3-70b", "--gpus", "800", "--pp", "100"], "100 stages"),
    (["--model", "BADFILE", "--gpus", "8"], "no 'hidden_size'"),
])
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"num_hidden_layers": 2}))
    argv = [str(bad) if a == "BADFILE" else a for a in argv]
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_run_plan_takes_params_directly():
    cfg = PlanConfig(model="x", layout="fsdp2", gpus=2, tp=1, ep=1, pp=1, replicate=1,
                     hardware="h100", gpus_per_node=None, peak_tflops=None, ns_efficiency=None,
                     hbm_gbs=None, intra_gbs=None, inter_gbs=None, ns_steps=5, comm_bytes=2,
                     strategies=("lpt",))
    result = run_plan(cfg, params_from_config(TINY))
    assert result["strategies"][0]["ns_flops_max"] == TOTAL / 2
    assert result["muon_values"] == VALUES


def test_hsdp_whole_matrices_go_to_a_holder():
    # HSDP 2 x 2: each expert lies whole on one rank of each replica. LPT picks the least
    # loaded holder, so nothing travels to the owners; the update goes to the other replica.
    (unit,) = units([ModelParam("e", (4, 4, 6), 0, expert=True)],
                    ParallelLayout("hsdp", 4, replicate=2))
    layout = unit.layout(0)
    plan = OwnershipPlan.build(layout, [1.0] * 4)
    assert plan.owner == (0, 2, 1, 3)  # holders {0, 2}, {0, 2}, {1, 3}, {1, 3}
    sent, recv = plan.flows(layout)
    assert sent[:, 0].sum() == 0 and recv[:, 0].sum() == 0  # to owners: nothing
    assert sent[:, 1].tolist() == [24] * 4  # to holders: one 4 x 6 expert to the other replica
