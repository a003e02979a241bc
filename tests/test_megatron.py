"""Megatron-core tensor/expert-parallel parameters on 4 gloo ranks (TP=2 x DP=2, EP=2).

Real megatron-core layers (`ColumnParallelLinear`, `RowParallelLinear`, a fused QKV, GLU's
stride-2 fc1, per-expert linears, `VocabParallelEmbedding`) are built on CPU after
``parallel_state.initialize_model_parallel``. Every rank then loads the TP/EP shards of the
same full parameters and gradients, cut here independently of the adapter (as Megatron's
``_initialize_affine_weight_cpu`` cuts them), trains 3 steps, and each shard must equal the
same slice of a single-process `DistributedMuon` on the full matrices.

All checks share one 4-rank run: importing megatron-core takes seconds per process.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

from distributed_muon import DistributedMuon

pytest.importorskip("megatron.core")

TP, EP, WORLD = 2, 2, 4
STEPS = 3
LR, WD = 0.02, 0.1
HIDDEN, HEADS, GROUPS, CHANNELS = 16, 8, 4, 2
QKV = (HEADS // GROUPS * CHANNELS, CHANNELS, CHANNELS)  # rows of one query group: q, k, v
LOCAL_EXPERTS = 2

# name -> (full shape, TP partition dim or None, stride, expert). Experts: the stack of the EP
# ranks' i-th local expert, [EP, m, n].
PARAMS = {
    "embedding.weight": ((32, HIDDEN), 0, 1, False),
    "linear_qkv.weight": ((GROUPS * sum(QKV), HIDDEN), 0, 1, False),
    "linear_fc1.weight": ((24, HIDDEN), 0, 2, False),
    "linear_fc1.bias": ((24,), 0, 2, False),
    "linear_fc2.weight": ((HIDDEN, 24), 1, 1, False),
    "linear_fc2.bias": ((HIDDEN,), None, 1, False),
    "norm.weight": ((HIDDEN,), None, 1, False),
    "router.weight": ((4, HIDDEN), None, 1, False),
    **{f"experts.local_experts.{i}.linear_fc1.weight": ((EP, 6, HIDDEN), 0, 1, True)
       for i in range(LOCAL_EXPERTS)},
    "output_layer.weight": ((32, HIDDEN), 0, 1, False),
}
ADAMW = {"embedding.weight", "linear_fc1.bias", "linear_fc2.bias", "norm.weight",
         "output_layer.weight"}
# Logical matrices per step: Q, K, V + fc1 + fc2 + router + 2 local experts x EP.
N_MATRICES = 3 + 1 + 1 + 1 + LOCAL_EXPERTS * EP


def full_tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(spec[0], generator=gen) for n, spec in PARAMS.items()}
    grads = [{n: torch.randn(spec[0], generator=gen) for n, spec in PARAMS.items()}
             for _ in range(STEPS)]
    return params, grads


def shard(name, full, coords):
    """This rank's local tensor of a full parameter, cut the way Megatron cuts it."""
    _, dim, stride, expert = PARAMS[name]
    if expert:
        full = full[coords["ep"]]
    if dim is None:
        return full.clone()
    tp = coords["etp"] if expert else coords["tp"]
    chunk = full.shape[dim] // (TP * stride)
    return torch.cat(torch.split(full, chunk, dim=dim)[tp::TP], dim=dim).clone()


def grouped(qkv):
    """A fused QKV in Megatron's storage order (per query group q, k, v) -> [all q; k; v]."""
    per = qkv.view(GROUPS, sum(QKV), -1)
    return torch.cat([s.reshape(-1, qkv.shape[-1]) for s in per.split(QKV, dim=1)])


def ungrouped(x):
    q, k, v = x.split([GROUPS * r for r in QKV])
    parts = [t.view(GROUPS, r, -1) for t, r in zip((q, k, v), QKV)]
    return torch.cat(parts, dim=1).reshape(x.shape)


def _model():
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        kv_channels=CHANNELS, ffn_hidden_size=12, use_cpu_initialization=True,
        tensor_model_parallel_size=TP, expert_model_parallel_size=EP,
        num_moe_experts=EP * LOCAL_EXPERTS, add_bias_linear=False,
    )
    init = torch.nn.init.normal_

    def column(rows, **kw):
        return ColumnParallelLinear(HIDDEN, rows, config=config, init_method=init, **kw)

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_fc1 = column(6, bias=False, is_expert=True)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = VocabParallelEmbedding(32, HIDDEN, init_method=init, config=config)
            self.linear_qkv = column(GROUPS * sum(QKV), bias=False)
            self.linear_fc1 = column(24, bias=True, stride=2)  # GLU: [gate; up], stride 2
            self.linear_fc2 = RowParallelLinear(24, HIDDEN, config=config, init_method=init,
                                                bias=True, input_is_parallel=True,
                                                skip_bias_add=True)
            self.norm = torch.nn.LayerNorm(HIDDEN, bias=False)
            self.router = torch.nn.Linear(HIDDEN, 4, bias=False)
            self.experts = torch.nn.Module()
            self.experts.local_experts = torch.nn.ModuleList(
                Expert() for _ in range(LOCAL_EXPERTS))
            self.output_layer = column(32, bias=False)

    return Layer()


def _errors(model, sharding):
    """Each unsupported input's error message (all must raise)."""
    from distributed_muon.integrations.megatron import MegatronSharding, recognize
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from distributed_muon.sharding import register_sharding

    out = {}
    bad = torch.nn.Module()
    bad.w = torch.nn.Parameter(torch.zeros(2, 3, 4))
    set_tensor_model_parallel_attributes(bad.w, True, 2, 1)
    try:
        MegatronSharding(bad)
    except ValueError as err:
        out["partition_dim"] = str(err)
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = model.linear_qkv.config
    config.perform_initialization = False  # Megatron then sets no TP attributes on the weight
    uninit = ColumnParallelLinear(HIDDEN, 8, config=config, init_method=torch.nn.init.normal_,
                                  bias=False)
    config.perform_initialization = True
    try:
        MegatronSharding(uninit)
    except ValueError as err:
        out["no_attributes"] = str(err)
    try:
        sharding.shape(torch.nn.Parameter(torch.zeros(3, 3)))
    except ValueError as err:
        out["foreign"] = str(err)
    register_sharding(recognize)
    try:
        DistributedMuon(list(model.parameters()), lr=LR)
    except ValueError as err:
        out["no_sharding"] = str(err)
    return out


def _worker(rank, world):
    from distributed_muon.integrations.megatron import MegatronSharding, megatron_param_groups
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=TP, expert_model_parallel_size=EP)
    try:
        coords = {"tp": ps.get_tensor_model_parallel_rank(),
                  "etp": ps.get_expert_tensor_parallel_rank(),
                  "ep": ps.get_expert_model_parallel_rank()}
        model = _model()
        names = dict(model.named_parameters())
        assert set(names) == set(PARAMS), sorted(names)
        params, grads = full_tensors()
        with torch.no_grad():
            for name, p in names.items():
                p.copy_(shard(name, params[name], coords))
        sharding = MegatronSharding(model)
        groups = megatron_param_groups(model, sharding)
        opt = DistributedMuon(groups, lr=LR, weight_decay=WD, ns_dtype="fp32", ns_method="standard",
                              comm_dtype="fp32", sharding=sharding)
        adamw = sorted(n for g in groups if not g["use_muon"] for n in g["param_names"])
        regions = {}
        for p, spec in zip(opt.muon_params, opt.layout.specs):
            name = next(n for n, q in names.items() if q is p)
            regions[name] = (spec.row_blocks, sharding.regions(p, spec),
                             p.detach().clone().view(-1))
        for g in grads:
            for name, p in names.items():
                p.grad = shard(name, g[name], coords)
            opt.step()
        return {
            "coords": coords,
            "adamw": adamw,
            "regions": regions,
            "params": {n: p.detach().clone() for n, p in names.items()},
            "ns": opt.ns_matrices,
            "group_size": torch.distributed.get_world_size(sharding.group),
            "errors": _errors(model, sharding),
            "flat": _distributed_optimizer_shards(coords, params, grads),
        }
    finally:
        ps.destroy_model_parallel()


def _flat_ranges(params, size, rank):
    """This DP rank's range of each parameter when the parameters, laid end to end, are cut
    into ``size`` equal parts (as Megatron's distributed optimizer cuts a bucket; ranges
    ignore parameter and TP-block boundaries)."""
    total = sum(p.numel() for p in params)
    chunk = -(-total // size)
    lo, hi, pos, out = rank * chunk, min(total, (rank + 1) * chunk), 0, []
    for p in params:
        s, e = max(lo, pos) - pos, min(hi, pos + p.numel()) - pos
        out.append((s, e) if s < e else None)
        pos += p.numel()
    return out


def flat_shard_optimizer(groups, sharding, name_of, dp):
    """`MegatronMuon` over Megatron param ``groups`` whose params are then replaced, as
    Megatron's distributed optimizer does, by fp32 main shards: flat ranges cut over ``dp``'s
    ranks (`_flat_ranges`). Returns it, bound, and ``{name: (span, main)}`` of this rank."""
    import torch.distributed as dist
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon

    opt = MegatronMuon(groups, sharding, lr=LR, weight_decay=WD, ns_dtype="fp32",
                       ns_method="standard", comm_dtype="fp32")
    flat = [p for g in opt.param_groups for p in g["params"]]
    ranges = dict(zip(map(id, flat), _flat_ranges(flat, dist.get_world_size(dp),
                                                   dist.get_rank(dp))))
    mains, held = [], {}
    for g in opt.param_groups:
        pairs = []
        for p in g["params"]:
            span = ranges[id(p)]
            main = None if span is None else p.detach().view(-1)[span[0]:span[1]].clone()
            pairs.append((main, span))
            if main is not None:
                held[name_of[id(p)]] = (span, main)
        g["params"] = [m for m, _ in pairs if m is not None]
        mains.append(pairs)
    opt.bind(mains, dp)
    return opt, held


def _distributed_optimizer_shards(coords, params, grads):
    """`MegatronMuon` over Megatron's own param groups, stepping fp32 main shards that are flat
    ranges of the TP-local weights (dense: split over data parallel; experts: over expert data
    parallel), as Megatron's distributed optimizer hands them to its inner optimizer."""
    from distributed_muon.integrations.megatron import MegatronSharding
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    model = _model()
    names = dict(model.named_parameters())
    name_of = {id(p): n for n, p in names.items()}
    with torch.no_grad():
        for name, p in names.items():
            p.copy_(shard(name, params[name], coords))
    sharding = MegatronSharding(model)
    groups = _get_param_groups([model], OptimizerConfig(lr=LR, weight_decay=WD), {})
    ns, spans = 0, {}
    for expert in (False, True):
        mine = [g for g in groups if g["is_expert_parallel"] == expert]
        dp = ps.get_expert_data_parallel_group() if expert else ps.get_data_parallel_group()
        opt, held = flat_shard_optimizer(mine, sharding, name_of, dp)
        spans.update(held)
        for g in grads:
            for name, (span, main) in held.items():
                main.grad = shard(name, g[name], coords).reshape(-1)[span[0]:span[1]].clone()
            opt.step()
        ns += opt.ns_matrices
    out = {name: (span, main.detach().clone()) for name, (span, main) in spans.items()}
    return {"shards": out, "ns": ns}


def single_process(params, grads):
    """`DistributedMuon` in this process on the full tensors, QKV in the grouped order."""
    order = list(PARAMS)
    full = {n: params[n].clone() for n in order}
    full["linear_qkv.weight"] = grouped(full["linear_qkv.weight"])
    ps = {n: torch.nn.Parameter(t) for n, t in full.items()}
    muon = [n for n in order if n not in ADAMW and n != "linear_qkv.weight"]
    opt = DistributedMuon([
        {"params": [ps[n] for n in muon]},
        {"params": [ps["linear_qkv.weight"]], "row_blocks": tuple(GROUPS * r for r in QKV)},
        {"params": [ps[n] for n in order if n in ADAMW], "use_muon": False},
    ], lr=LR, weight_decay=WD, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
    for g in grads:
        for n in order:
            ps[n].grad = grouped(g[n]) if n == "linear_qkv.weight" else g[n].clone()
        opt.step()
    out = {n: p.detach() for n, p in ps.items()}
    out["linear_qkv.weight"] = ungrouped(out["linear_qkv.weight"])
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def results():
    return run_ranks(WORLD, _worker, timeout=240)


def test_regions_tile_every_matrix_once_per_replica_with_the_right_values(results):
    params, _ = full_tensors()
    for name in PARAMS:
        if name in ADAMW:
            continue
        full = params[name]
        view = grouped(full) if name == "linear_qkv.weight" else full.reshape(-1, full.shape[-1])
        filled: dict[int, torch.Tensor] = {}
        count: dict[int, torch.Tensor] = {}
        for res in results:
            row_blocks, regions, local = res["regions"][name]
            if name == "linear_qkv.weight":
                assert row_blocks == tuple(GROUPS * r for r in QKV)
            for reg in regions:
                b = reg.block
                assert (b.start, b.stop) == (0, (b.row1 - b.row0) * b.width)
                vals = local[reg.offset:reg.offset + b.size].view(b.row1 - b.row0, b.width)
                out = filled.setdefault(reg.replica, torch.zeros_like(view))
                cnt = count.setdefault(reg.replica, torch.zeros(view.shape, dtype=torch.int32))
                out[b.row0:b.row1, b.col0:b.col1] = vals
                cnt[b.row0:b.row1, b.col0:b.col1] += 1
        # TP-sharded weights: one copy per DP rank (2); whole ones: one per rank (4); experts:
        # one copy per expert-DP rank (1 at TP=2, EP=2 on 4 ranks).
        expected = {"router.weight": WORLD}.get(name, 1 if PARAMS[name][3] else WORLD // TP)
        assert len(filled) == expected, (name, sorted(filled))
        for replica in filled:
            assert bool((count[replica] == 1).all()), (name, replica)
            assert torch.equal(filled[replica], view), (name, replica)


def test_parity_with_single_process_on_full_matrices(results):
    params, grads = full_tensors()
    want = single_process(params, grads)
    for rank, res in enumerate(results):
        for name, mine in res["params"].items():
            p0 = shard(name, params[name], res["coords"])
            ref = shard(name, want[name], res["coords"])
            assert rel(mine - p0, ref - p0) < 1e-6, (rank, name)


def test_each_matrix_orthogonalized_exactly_once_across_tp_x_dp(results):
    assert all(res["group_size"] == WORLD for res in results)
    assert sum(res["ns"] for res in results) == N_MATRICES * STEPS


def test_distributed_optimizer_flat_shards_inside_tp_blocks(results):
    """Main shards cut across TP blocks, QKV groups and parameters: every shard equals the
    same range of the single-process result, the ranges of the DP ranks tile each local
    weight, and each matrix is still orthogonalized once per step across TP x DP."""
    params, grads = full_tensors()
    want = single_process(params, grads)
    covered: dict[tuple, int] = {}
    for rank, res in enumerate(results):
        for name, ((s, e), mine) in res["flat"]["shards"].items():
            p0 = shard(name, params[name], res["coords"]).reshape(-1)[s:e]
            ref = shard(name, want[name], res["coords"]).reshape(-1)[s:e]
            assert rel(mine - p0, ref - p0) < 1e-6, (rank, name, s, e)
            key = (name, res["coords"]["tp"] if not PARAMS[name][3] else
                   (res["coords"]["ep"], res["coords"]["etp"]))
            covered[key] = covered.get(key, 0) + e - s
    cut = {name for res in results for name, ((s, _), _) in res["flat"]["shards"].items()
           if s > 0 and PARAMS[name][1] is not None and name not in ADAMW}
    assert cut, "the simulated partition must cut some TP-sharded matrix inside its block"
    for (name, _), count in covered.items():
        full = params[name]
        local = shard(name, full, {"tp": 0, "etp": 0, "ep": 0})
        assert count == local.numel(), (name, count)
    assert sum(res["flat"]["ns"] for res in results) == N_MATRICES * STEPS


def test_param_groups_follow_megatron(results):
    for res in results:
        assert res["adamw"] == sorted(ADAMW)


def test_unsupported_parameters_get_one_clear_error(results):
    errors = results[0]["errors"]
    assert "partition_dim=2" in errors["partition_dim"]
    assert "use_muon=False" in errors["partition_dim"]
    assert "not a parameter of the model" in errors["foreign"]
    assert "perform_initialization=True" in errors["no_attributes"]
    assert "sharding=MegatronSharding(model)" in errors["no_sharding"]
