"""DistributedMuon under real DeepSpeed engines (ZeRO-0/1/2/3, bf16, gas, MoE), gloo on CPU.

Each test spawns 2 or 3 ranks that build a ``deepspeed.initialize`` engine from a JSON config
with ``"type": "DistributedMuon"`` and compares the full fp32 weights after every step with one
process running the core `DistributedMuon` on the whole global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from torch import nn

deepspeed = pytest.importorskip("deepspeed")

from distributed_muon.integrations.replicated import ReplicatedSharding  # noqa: E402
from distributed_muon.launch.local import free_port  # noqa: E402

from distributed_muon import DistributedMuon  # noqa: E402

VOCAB, D, SEQ, MICRO = 32, 16, 8, 2
OPTIONS = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": "fp32", "comm_dtype": "fp32",
           "adamw_lr": 0.01}
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("deepspeed_comm_op")]


class TinyLM(nn.Module):
    """Embedding, two blocks of 2-D weights (one with rows not divisible by the world size),
    and a separate head: Muon for the blocks, AdamW for embedding, head and biases."""

    def __init__(self, moe: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.fc1 = nn.Linear(D, 3 * D + 1)
        self.fc2 = nn.Linear(3 * D + 1, D)
        self.moe = None
        if moe:
            from deepspeed.moe.layer import MoE

            expert = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
            self.moe = MoE(hidden_size=D, expert=expert, num_experts=4, ep_size=2, k=1,
                           min_capacity=SEQ * MICRO, drop_tokens=False)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        if self.moe is not None:
            h = h + self.moe(h)[0]
        logits = self.lm_head(h)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                           tokens[:, 1:].reshape(-1))


def _model(moe: bool = False) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(moe)


def _batches(steps: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (steps, rows, SEQ), generator=gen)


def _config(stage: int, world: int, gas: int = 1, bf16: bool = False, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO * gas * world,
        "optimizer": {"type": "DistributedMuon", "params": dict(OPTIONS)},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra)
    return cfg


def _init_env(rank: int, world: int) -> None:
    """DeepSpeed on the process group the test harness made (gloo, or NCCL on GPUs)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    import deepspeed as ds
    import distributed_muon.integrations.deepspeed  # noqa: F401  (registers the type)

    ds.init_distributed(dist_backend=torch.distributed.get_backend())


def _full_fp32(engine, model: nn.Module, stage: int) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in model.parameters():
        full = p if stage == 0 and not engine.bfloat16_enabled() else safe_get_full_fp32_param(p)
        out.append(full.detach().float().cpu().clone())
    return out


def _train(rank, world, cfg, steps, moe=False, ckpt=None):
    _init_env(rank, world)
    model = _model(moe)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    stage, gas = cfg["zero_optimization"]["stage"], cfg["gradient_accumulation_steps"]
    data = _batches(steps, world * gas * MICRO).view(steps, world, gas, MICRO, SEQ)
    history, losses = [], []
    for step in range(steps):
        for micro in range(gas):
            loss = engine(data[step, rank, micro].to(engine.device))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        history.append(_full_fp32(engine, model, stage))
    units = getattr(_inner(engine), "_units", {}).values()
    return {"history": history, "losses": losses, "ns": _inner(engine).ns_matrices,
            "chunks": sorted({len(u.optimizer.exchange.chunks) for u in units})}


def _inner(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _reference(world: int, steps: int, gas: int = 1) -> list[list[torch.Tensor]]:
    """One process, the core optimizer, the whole global batch per step."""
    model = _model()
    opt = DistributedMuon(model.named_parameters(), sharding=ReplicatedSharding(None), **OPTIONS)
    data = _batches(steps, world * gas * MICRO)
    history = []
    for step in range(steps):
        model(data[step]).backward()
        opt.step()
        opt.zero_grad()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def _assert_close(history, reference, tol):
    for step, (got, want) in enumerate(zip(history, reference)):
        for i, (g, w) in enumerate(zip(got, want)):
            err = (g - w).abs().max().item() / max(w.abs().max().item(), 1e-12)
            assert err < tol, f"step {step} parameter {i}: relative error {err:.2e}"


MUON_MATRICES = 2  # fc1.weight and fc2.weight; embedding, head and biases are AdamW


@pytest.mark.parametrize("stage,world", [(0, 2), (1, 2), (2, 2), (3, 2), (2, 3), (3, 3)])
def test_zero_stages_match_single_process(stage, world):
    steps = 3
    results = run_ranks(world, _train, _config(stage, world), steps, timeout=300)
    reference = _reference(world, steps)
    for r in results:
        _assert_close(r["history"], reference, 2e-5)
    # Exactly once: every matrix orthogonalized by one rank per step, none redundantly.
    assert sum(r["ns"] for r in results) == MUON_MATRICES * steps


def test_exchange_chunks_from_the_json():
    """``"exchange_chunks"`` in the JSON params reaches every partition's exchange; the
    pipelined steps match the reference as the unpipelined ones do."""
    steps, world = 2, 2
    cfg = _config(2, world)
    cfg["optimizer"]["params"]["exchange_chunks"] = 3
    results = run_ranks(world, _train, cfg, steps, timeout=300)
    reference = _reference(world, steps)
    for r in results:
        assert r["chunks"] == [3]
        _assert_close(r["history"], reference, 2e-5)
    assert sum(r["ns"] for r in results) == MUON_MATRICES * steps


def test_gradient_accumulation_equals_one_big_batch():
    steps, world = 2, 2
    results = run_ranks(world, _train, _config(2, world, gas=2), steps, timeout=300)
    reference = _reference(world, steps, gas=2)
    for r in results:
        _assert_close(r["history"], reference, 2e-5)
    assert sum(r["ns"] for r in results) == MUON_MATRICES * steps  # once per step, not micro


@pytest.mark.parametrize("stage,grad_accum_fp32", [(0, False), (1, True), (2, False), (3, False)])
def test_bf16_loss_falls(stage, grad_accum_fp32):
    world, steps = 2, 12
    extra = {"data_types": {"grad_accum_dtype": "fp32"}} if grad_accum_fp32 else {}
    cfg = _config(stage, world, bf16=True, **extra)
    cfg["optimizer"]["params"].update(ns_dtype="bf16", comm_dtype="bf16")
    # The same batch every step: the loss must fall steadily.
    results = run_ranks(world, _train_same_batch, cfg, steps, timeout=300)
    for r in results:
        assert r["losses"][-1] < 0.7 * r["losses"][0], r["losses"]
    assert sum(r["ns"] for r in results) == MUON_MATRICES * steps


def _train_same_batch(rank, world, cfg, steps):
    _init_env(rank, world)
    model = _model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    batch = _batches(1, world * MICRO).view(world, MICRO, SEQ)[rank]
    losses = []
    for _ in range(steps):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return {"losses": losses, "ns": _inner(engine).ns_matrices}


def _moe_worker(rank, world, stage, steps):
    """Per rank: the update of every Muon matrix (experts included) equals the independent
    reference applied to the full gradient DeepSpeed reduced (over the expert-data-parallel
    group for experts)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from reference import ReferenceMuon

    _init_env(rank, world)
    model = _model(moe=True)
    cfg = _config(stage, world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    named = [(n, p) for n, p in model.named_parameters()
             if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    ref = None
    data = _batches(steps, world * MICRO).view(steps, world, MICRO, SEQ)
    worst = 0.0
    for step in range(steps):
        loss = engine(data[step, rank])
        engine.backward(loss)
        grads = [safe_get_full_grad(p).float().clone() for _, p in named]
        before = [safe_get_full_fp32_param(p).float().clone() for _, p in named]
        if ref is None:
            ref = ReferenceMuon(before, lr=OPTIONS["lr"], weight_decay=OPTIONS["weight_decay"])
        else:
            for r, b in zip(ref.params, before):
                r.copy_(b)
        ref.step(grads)
        engine.step()
        for (_, p), want in zip(named, ref.params):
            got = safe_get_full_fp32_param(p).float()
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    experts = [n for n, _ in named if "experts" in n]
    return {"worst": worst, "experts": experts, "ns": _inner(engine).ns_matrices,
            "muon": len(named)}


def test_moe_experts_per_expert_data_parallel_group():
    """4 ranks, 4 experts, expert parallel 2: each rank holds 2 experts, each expert is shared
    by an expert-data-parallel group of 2 ranks."""
    world, steps = 4, 2
    results = run_ranks(world, _moe_worker, 2, steps, timeout=400)
    for r in results:
        assert len(r["experts"]) == 4  # 2 local experts x (fc in, fc out)
        assert r["worst"] < 2e-5, r["worst"]
    # Dense matrices once in the job, each local expert matrix once per expert-DP group.
    dense = results[0]["muon"] - len(results[0]["experts"])
    expert_matrices = 4 * 2  # 4 experts x 2 matrices, each in one expert-DP group
    assert sum(r["ns"] for r in results) == (dense + expert_matrices) * steps


class TinyAttention(nn.Module):
    """Embedding, a [D+1, D] Muon matrix ahead (so that ZeRO-1/2's flat range boundary falls
    inside a row of the K block), one causal attention layer with a fused QKV weight [3D, D]
    whose forward reports its per-head max logits, and a head: QK-clip under DeepSpeed."""

    heads = 4

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pre = nn.Linear(D, D + 1, bias=False)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.recorder = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + torch.tanh(self.pre(h))[..., :D]
        b, t, _ = h.shape
        q, k, v = (y.transpose(1, 2) for y in
                   self.qkv(h).view(b, t, 3, self.heads, D // self.heads).unbind(2))
        if self.recorder is not None and self.training:
            self.recorder.record_attention(q, k, causal=True)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(y.transpose(1, 2).reshape(b, t, D))
        logits = self.lm_head(h)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                           tokens[:, 1:].reshape(-1))


QK_TAU, QK_STEPS = 1.5, 3


def _attention_model():
    from distributed_muon.qk_clip import MaxLogitRecorder

    torch.manual_seed(0)
    model = TinyAttention()
    with torch.no_grad():
        model.qkv.weight.mul_(4)  # logits above tau from the first step
    model.recorder = MaxLogitRecorder(model.heads)
    return model, lambda opt: opt.register_qk(model.recorder, model.qkv.weight,
                                              head_dim=D // model.heads)


def _qk_clip_worker(rank, world, stage):
    _init_env(rank, world)
    model, register = _attention_model()
    cfg = _config(stage, world)
    cfg["optimizer"]["params"]["qk_clip_tau"] = QK_TAU
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    register(engine.basic_optimizer)
    data = _batches(QK_STEPS, world * MICRO).view(QK_STEPS, world, MICRO, SEQ)
    history, clipped = [], []
    for step in range(QK_STEPS):
        engine.backward(engine(data[step, rank]))
        engine.step()
        history.append(_full_fp32(engine, model, stage))
        clipped.append(engine.basic_optimizer.qk_clip.last_clipped)
    held = [u.sharding.fragments[model.qkv.weight][:2]
            for u in engine.basic_optimizer._units.values()
            if model.qkv.weight in getattr(u.sharding, "fragments", {})]
    return {"history": history, "clipped": clipped, "qkv_held": held}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_qk_clip_under_zero_matches_single_process(stage):
    """Each rank scales its own fragments of the clipped heads' q/k rows (ZeRO flat ranges
    cut rows): the weights equal the core optimizer's on the whole batch in one process."""
    world = 2
    model, register = _attention_model()
    opt = DistributedMuon(model.named_parameters(), sharding=ReplicatedSharding(None),
                          qk_clip_tau=QK_TAU, **OPTIONS)
    register(opt)
    data = _batches(QK_STEPS, world * MICRO)
    reference, clipped = [], []
    for step in range(QK_STEPS):
        model(data[step]).backward()
        opt.step()
        opt.zero_grad()
        reference.append([p.detach().clone() for p in model.parameters()])
        clipped.append(opt.qk_clip.last_clipped)
    assert all(clipped) and min(clipped) < TinyAttention.heads, clipped  # some, not all
    results = run_ranks(world, _qk_clip_worker, stage, timeout=300)
    for r in results:
        assert r["clipped"] == clipped
        _assert_close(r["history"], reference, 2e-5)
    if stage == 2:  # the two ranks' flat ranges meet inside a row of the K block
        (start, length), = results[1]["qkv_held"]
        assert D * D < start < 2 * D * D and start % D, start


def _checkpoint_worker(rank, world, stage, path, mode):
    """``mode="save"``: 2 steps, save, 2 more steps. ``"load"``: load, the same 2 steps."""
    _init_env(rank, world)
    model = _model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_config(stage, world))
    data = _batches(4, world * MICRO).view(4, world, MICRO, SEQ)
    first = 0
    if mode == "save":
        for step in range(2):
            engine.backward(engine(data[step, rank]))
            engine.step()
        engine.save_checkpoint(path, tag="step2")
    else:
        engine.load_checkpoint(path, tag="step2")
    first = 2
    losses = []
    for step in range(first, 4):
        loss = engine(data[step, rank])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "params": _full_fp32(engine, model, stage)}


@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_resumes_bit_for_bit(stage, tmp_path):
    world = 2
    saved = run_ranks(world, _checkpoint_worker, stage, str(tmp_path), "save", timeout=300)
    loaded = run_ranks(world, _checkpoint_worker, stage, str(tmp_path), "load", timeout=300)
    for s, r in zip(saved, loaded):
        assert s["losses"] == r["losses"]
        for a, b in zip(s["params"], r["params"]):
            assert torch.equal(a, b)


def _bad_config_worker(rank, world, cases):
    """Every case in one process: ``(params, extra config)`` -> the error message or None."""
    _init_env(rank, world)
    errors = []
    for params, extra in cases:
        cfg = _config(1, 1, **extra)
        cfg["optimizer"]["params"].update(params)
        model = _model()
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
            errors.append(None)
        except (ValueError, TypeError) as err:
            errors.append(str(err))
    return errors


BAD_CONFIGS = [
    ({"momentum": 1.5}, {}, "momentum"),
    ({"ns_dtype": "int8"}, {}, "ns_dtype"),
    ({"betas": [0.9, 0.95], "adamw_betas": [0.9, 0.95]}, {}, "adamw_betas"),
    ({"eps": 1e-8, "adamw_eps": 1e-8}, {}, "\"eps\" is the AdamW part's"),
    ({"bogus_option": 1}, {}, "unknown DistributedMuon option"),
    ({"scale": "bogus"}, {}, "scale"),
    ({"owner_strategy": "random"}, {}, "owner_strategy"),
    ({}, {"fp16": {"enabled": True}}, "fp16"),
    ({}, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
          "zero_force_ds_cpu_optimizer": False}, "offload"),
]


def test_bad_configs_fail_before_the_first_step():
    (errors,) = run_ranks(1, _bad_config_worker, [(p, e) for p, e, _ in BAD_CONFIGS],
                          timeout=200)
    for (params, extra, message), error in zip(BAD_CONFIGS, errors):
        assert error is not None and message in error, (params, extra, error)


def test_unknown_option_lists_what_the_json_takes():
    """The JSON ``params`` take the group options plus ``comm_dtype`` and ``owner_strategy``
    (``plan``, its former name, still works, with a FutureWarning); the core's
    Python-only ``process_group`` and ``sharding`` are not offered."""
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

    with pytest.raises(TypeError) as err:
        DeepSpeedMuon(_model().parameters(), bogus_option=1)
    message = str(err.value)
    for name in ("bogus_option", "comm_dtype", "owner_strategy", "adamw_betas", "ns_schedule",
                 "exchange_chunks"):
        assert name in message, message
    assert "process_group" not in message and "sharding" not in message, message
    with pytest.raises(ValueError, match="exchange_chunks=0 is not valid"):
        DeepSpeedMuon(_model().parameters(), exchange_chunks=0)


def test_unnamed_parameters_without_an_engine_are_refused():
    """Built outside ``deepspeed.initialize`` (no engine to name them), unnamed parameters
    would go to Muon by shape, the embedding and the head included: refused, naming the fix.
    Named groups, ``param_names`` and groups that set ``use_muon`` need no engine."""
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

    from distributed_muon import muon_param_groups

    model = _model()
    with pytest.raises(ValueError, match="muon_param_groups") as err:
        DeepSpeedMuon(model.parameters(), lr=0.02)
    assert "param_names" in str(err.value)
    named = DeepSpeedMuon(muon_param_groups(model), lr=0.02)
    assert [len(g) for g in named.group_names] == [2, 4]  # fc1/fc2 weights; the rest AdamW
    names, params = zip(*model.named_parameters())
    by_names = DeepSpeedMuon([{"params": list(params), "param_names": list(names)}])
    assert sorted(by_names.group_names[0]) == ["fc1.weight", "fc2.weight"]
    explicit = DeepSpeedMuon([{"params": [model.fc1.weight], "use_muon": True},
                              {"params": [model.embed.weight], "use_muon": False}])
    assert [g["use_muon"] for g in explicit.param_groups] == [True, False]


def _use_muon_worker(rank, world):
    _init_env(rank, world)
    model = _model()
    model.fc1.weight.use_muon = True  # what DeepSpeed's own Muon would act on
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(),
                             config=_config(2, 1))
    except ValueError as err:
        return str(err)
    return None


def test_refuses_parameters_tagged_for_deepspeeds_own_muon():
    (error,) = run_ranks(1, _use_muon_worker, timeout=120)
    assert error is not None and "use_muon" in error


GLOBAL_ROWS = 6  # divisible by 2 and 3: the same global batch at both sizes


def _reshard_worker(rank, world, stage, src, tag, mode):
    """``"save"``: 2 steps, save. ``"resume"``: DeepSpeed's own load at the same size.
    ``"reshard"``: load the converted topology-free checkpoint. Both then run steps 2 and 3."""
    from distributed_muon.integrations.deepspeed_checkpoint import load_topology_free

    _init_env(rank, world)
    model = _model()
    cfg = _config(stage, world)
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL_ROWS // world
    cfg["train_batch_size"] = GLOBAL_ROWS
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    data = _batches(4, GLOBAL_ROWS).view(4, world, GLOBAL_ROWS // world, SEQ)
    if mode == "save":
        for step in range(2):
            engine.backward(engine(data[step, rank]))
            engine.step()
        engine.save_checkpoint(src, tag=tag)
        return None
    if mode == "resume":
        engine.load_checkpoint(src, tag=tag)
    else:
        load_topology_free(engine, src)
    for step in range(2, 4):
        engine.backward(engine(data[step, rank]))
        engine.step()
    return _full_fp32(engine, model, stage)


@pytest.mark.parametrize("stage,to_stage,to_world", [(2, 2, 3), (3, 1, 3)])
def test_reshard_through_topology_free_form(stage, to_stage, to_world, tmp_path):
    from distributed_muon.launch.cli import main

    ds_dir, dcp_dir = tmp_path / "ds", tmp_path / "dcp"
    run_ranks(2, _reshard_worker, stage, str(ds_dir), "t", "save", timeout=300)
    assert main(["ckpt", str(ds_dir / "t"), str(dcp_dir)]) == 0
    want = run_ranks(2, _reshard_worker, stage, str(ds_dir), "t", "resume", timeout=300)[0]
    got = run_ranks(to_world, _reshard_worker, to_stage, str(dcp_dir), None, "reshard",
                    timeout=300)
    for r in got:
        _assert_close([r], [want], 1e-5)


def _roundtrip_worker(rank, world, cfg, src, dst, mode):
    """``"save"``: 2 bf16 steps, save. ``"load"``: load the topology-free form, save again."""
    from distributed_muon.integrations.deepspeed_checkpoint import load_topology_free

    _init_env(rank, world)
    model = _model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=cfg)
    if mode == "save":
        data = _batches(2, world * MICRO).view(2, world, MICRO, SEQ)
        for step in range(2):
            engine.backward(engine(data[step, rank]))
            engine.step()
    else:
        load_topology_free(engine, src)
    engine.save_checkpoint(dst, tag="t")


def test_bf16_optimizer_checkpoint_round_trips_through_another_size(tmp_path):
    """BF16_Optimizer (ZeRO-1, fp32 grad accumulation) at 2 ranks -> topology-free -> ZeRO-2
    at 3 ranks -> topology-free again: every weight and state tensor identical."""
    import torch.distributed.checkpoint as dcp
    from distributed_muon.launch.cli import main

    cfg = _config(1, 2, bf16=True, data_types={"grad_accum_dtype": "fp32"})
    run_ranks(2, _roundtrip_worker, cfg, None, str(tmp_path / "a"), "save", timeout=300)
    assert main(["ckpt", str(tmp_path / "a" / "t"), str(tmp_path / "a.dcp")]) == 0
    cfg3 = _config(2, 3, bf16=True)
    run_ranks(3, _roundtrip_worker, cfg3, str(tmp_path / "a.dcp"), str(tmp_path / "b"), "load",
              timeout=300)
    assert main(["ckpt", str(tmp_path / "b" / "t"), str(tmp_path / "b.dcp")]) == 0
    tensors = []
    for name in ("a.dcp", "b.dcp"):
        md = dcp.FileSystemReader(str(tmp_path / name)).read_metadata().state_dict_metadata
        sd = {k: torch.empty(v.size) for k, v in md.items() if hasattr(v, "size")}
        dcp.load(sd, checkpoint_id=str(tmp_path / name), no_dist=True)
        tensors.append(sd)
    a, b = tensors
    assert sorted(a) == sorted(b)
    assert any("momentum_buffer" in k for k in a) and any("exp_avg_sq" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ckpt_refuses_what_it_cannot_convert(tmp_path, capsys):
    from distributed_muon.launch.cli import main

    assert main(["ckpt", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no DeepSpeed ZeRO optimizer files" in capsys.readouterr().err
    assert main(["ckpt", str(tmp_path), str(tmp_path)]) == 2  # output exists
    assert "exists" in capsys.readouterr().err


LAUNCHED_SCRIPT = '''
import argparse, json
import deepspeed, torch
from torch import nn
import distributed_muon.integrations.deepspeed  # the one added line

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=0)
parser.add_argument("--out")
args = deepspeed.add_config_arguments(parser).parse_args()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 8))
engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model,
                                               model_parameters=model.parameters())
x, y = torch.randn(4, 16), torch.randn(4, 8)
losses = []
for _ in range(5):
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
json.dump({"losses": losses, "world": engine.world_size,
           "ns": optimizer.optimizer.ns_matrices}, open(f"{args.out}.{engine.global_rank}", "w"))
torch.distributed.destroy_process_group()  # as docs/deepspeed.md says: no abort at exit
'''


def test_deepspeed_launcher_runs_a_plain_script(tmp_path):
    """The `deepspeed` launcher, a script that only adds the import, the type in the JSON."""
    (tmp_path / "train.py").write_text(LAUNCHED_SCRIPT)
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "DistributedMuon", "params": {"lr": 0.02, "ns_dtype": "fp32"}}}))
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
         "--deepspeed", "--deepspeed_config", "ds.json", "--out", "result"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2 and r["losses"][-1] < r["losses"][0]
    assert sum(r["ns"] for r in ranks) == 2 * 5  # two matrices, five steps, once each
