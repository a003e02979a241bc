"""Pipeline parallelism: each stage's optimizer covers its own parameters and its collectives
stay inside the stage (4 gloo ranks, PP=2 x DP=2, real megatron-core parallel state).

The two stages hold different layers. Each stage builds `MegatronMuon` over Megatron's own
param groups of its chunk, stepping fp32 main shards split over its data-parallel ranks (as
Megatron's distributed optimizer does); the exchange group must be the stage's, and the result
equal a single-process `DistributedMuon` on that stage's full matrices.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

pytest.importorskip("megatron.core")

PP, WORLD, STEPS, LR, WD = 2, 4, 2, 0.02, 0.1
SHAPES = {0: {"fc1.weight": (12, 8), "fc2.weight": (8, 12), "norm.weight": (8,)},
          1: {"proj.weight": (10, 8), "gate.weight": (6, 10), "bias": (10,)}}


def full_tensors(stage):
    gen = torch.Generator().manual_seed(10 + stage)
    params = {n: torch.randn(s, generator=gen) for n, s in SHAPES[stage].items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in SHAPES[stage].items()}
             for _ in range(STEPS)]
    return params, grads


def _worker(rank, world):
    import torch.distributed as dist
    from distributed_muon.integrations.megatron import MegatronSharding
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from test_megatron import flat_shard_optimizer

    ps.initialize_model_parallel(pipeline_model_parallel_size=PP)
    try:
        stage = ps.get_pipeline_model_parallel_rank()
        _, grads = full_tensors(stage)
        model = _model(stage)
        name_of = {id(p): n for n, p in model.named_parameters()}
        sharding = MegatronSharding(model)
        groups = _get_param_groups([model], OptimizerConfig(lr=LR, weight_decay=WD), {})
        opt, held = flat_shard_optimizer(groups, sharding, name_of, ps.get_data_parallel_group())
        for g in grads:
            for name, (span, main) in held.items():
                main.grad = g[name].reshape(-1)[span[0]:span[1]].clone()
            opt.step()
        return {"stage": stage, "group": sorted(dist.get_process_group_ranks(sharding.group)),
                "stage_ranks": sorted(dist.get_process_group_ranks(
                    ps.get_tensor_and_data_parallel_group(with_context_parallel=True))),
                "ns": opt.ns_matrices,
                "shards": {n: (span, main.detach().clone()) for n, (span, main) in held.items()}}
    finally:
        ps.destroy_model_parallel()


def single_process(stage):
    """`DistributedMuon` in this process on ``stage``'s full tensors: its parameters (by name)
    after all steps, and the optimizer (for its state)."""
    from distributed_muon import DistributedMuon

    params, grads = full_tensors(stage)
    ps = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    opt = DistributedMuon([
        {"params": [p for p in ps.values() if p.ndim == 2]},
        {"params": [p for p in ps.values() if p.ndim == 1], "use_muon": False},
    ], lr=LR, weight_decay=WD, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
    for g in grads:
        for n, p in ps.items():
            p.grad = g[n].clone()
        opt.step()
    return ps, opt


def test_each_stage_steps_its_own_parameters_inside_the_stage():
    results = run_ranks(WORLD, _worker, timeout=240)
    for res in results:
        # The exchange never leaves the stage: its group is the stage's TP x DP group.
        assert res["group"] == res["stage_ranks"] and len(res["group"]) == WORLD // PP
    groups = {tuple(res["group"]) for res in results}
    assert len(groups) == PP and not set(groups.pop()) & set(groups.pop())
    covered = {}
    for res in results:
        (want, _), (start, _) = single_process(res["stage"]), full_tensors(res["stage"])
        for name, ((s, e), mine) in res["shards"].items():
            ref = want[name].detach().reshape(-1)[s:e]
            p0 = start[name].reshape(-1)[s:e]
            assert float((mine - ref).norm() / (ref - p0).norm()) < 1e-5, (res["stage"], name)
            covered[(res["stage"], name)] = covered.get((res["stage"], name), 0) + e - s
    for stage, shapes in SHAPES.items():
        for name, shape in shapes.items():
            assert covered[(stage, name)] == torch.Size(shape).numel()
    # 2 matrices per stage, each once per step within its stage.
    for stage in range(PP):
        assert sum(r["ns"] for r in results if r["stage"] == stage) == 2 * STEPS


def _model(stage):
    """A module holding ``stage``'s parameters (dotted names as submodules), full values."""
    params, _ = full_tensors(stage)
    model = torch.nn.Module()
    for name, value in params.items():
        owner = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    return model


def _reshard_worker(rank, world):
    from types import SimpleNamespace

    import torch.distributed as dist
    from distributed_muon.integrations.megatron import MegatronSharding
    from distributed_muon.integrations.megatron_optimizer import _model_space_checkpoints
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from test_megatron import flat_shard_optimizer

    ps.initialize_model_parallel()  # DP = 4
    try:
        dp = ps.get_data_parallel_group()
        _, grads = full_tensors(0)

        def model_sd(model):
            return {n: ShardedTensor.from_rank_offsets(f"model.{n}", p,
                                                       replica_id=(0, 0, dist.get_rank(dp)))
                    for n, p in model.named_parameters()}

        def build(group):
            model = _model(0)
            groups = _get_param_groups([model], OptimizerConfig(lr=LR, weight_decay=WD), {})
            name_of = {id(p): n for n, p in model.named_parameters()}
            opt, held = flat_shard_optimizer(groups, MegatronSharding(model), name_of, group)
            wrapper = SimpleNamespace()
            _model_space_checkpoints(wrapper, opt, group)
            return model, opt, held, wrapper

        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        model, opt, held, wrapper = build(dp)  # saved by a DP=4 distributed optimizer
        for g in grads:
            for name, (span, main) in held.items():
                main.grad = g[name].reshape(-1)[span[0]:span[1]].clone()
            opt.step()
        saved = wrapper.sharded_state_dict(model_sd(model))
        # Loaded by DP=2 distributed optimizers (ranks 0-1 and 2-3, one copy each).
        model, opt, held, wrapper = build(halves[rank // 2])
        wanted = wrapper.sharded_state_dict(model_sd(model), is_loading=True)
        # What Megatron's load returns for the same checkpoint keys (its file I/O needs CUDA
        # in megatron-core 0.16; the GPU test runs it): the saved tensors, by key.
        by_key = {sh.key: sh.data for sh in saved["param_state"].values()}
        assert {sh.key for sh in wanted["param_state"].values()} == set(by_key)
        loaded = {**saved, "param_state": {entry: by_key[sh.key].clone()
                                           for entry, sh in wanted["param_state"].items()}}
        wrapper.load_state_dict(loaded)
        out = {}
        for name, (span, main) in held.items():
            state = {k: v.clone() for k, v in opt.state[main].items() if v.ndim}
            out[name] = (span, main.detach().clone(), state)
        return {"shards": out, "steps": opt.steps}
    finally:
        ps.destroy_model_parallel()


def test_distributed_optimizer_checkpoint_loads_at_another_dp_size():
    """The adapter's distributed-optimizer checkpoint state, saved by a DP=4 distributed
    optimizer and loaded where DP=2 cuts the shards otherwise: every main value and state
    tensor equals the single-process run's (the state is in model space, keyed like the model's
    sharded tensors, not in the saver's shards)."""
    results = run_ranks(WORLD, _reshard_worker, timeout=240)
    ps, ref = single_process(0)
    for res in results:
        assert res["steps"] == STEPS
        assert res["shards"]  # every rank holds part of the parameters at DP=2
        for name, ((s, e), main, state) in res["shards"].items():
            want = ref.state[ps[name]]
            assert torch.allclose(main, ps[name].detach().reshape(-1)[s:e], atol=1e-6), name
            keys = {"momentum_buffer"} if ps[name].ndim == 2 else {"exp_avg", "exp_avg_sq"}
            assert set(state) == keys, (name, set(state))
            for key in keys:
                assert torch.allclose(state[key], want[key].reshape(-1)[s:e], atol=1e-6)
