"""`--optimizer dmuon` inside a real Megatron GPT-MoE on one GPU (skips without CUDA).

Megatron's DDP, its optimizer wrappers and its forward pass need CUDA. One process, NCCL,
TP=1: a 2-layer GPT with 4 SequentialMLP experts and grouped-query attention, bf16, wrapped in
Megatron's DDP, optimizer built by Megatron's own ``get_megatron_optimizer`` with
``OptimizerConfig(optimizer="dmuon")``, with and without ``use_distributed_optimizer``.

- parity: fp32 main weights after 3 steps equal an independent `DistributedMuon` over fp32
  copies given the same (Megatron-reduced) gradients, with Megatron's update size (its default
  ``spectral`` scale = 5 x match_rms_adamw) and its weight-decay rules;
- the grad norm Megatron reports is the norm of the gradients before orthogonalization;
- exactly once: matrices orthogonalized = matrices x steps;
- resume: Megatron's distributed checkpoint (torch_dist) of model and optimizer after step 2,
  loaded into a fresh model and optimizer, repeats step 3 bit for bit, with either wrapper (the
  distributed optimizer's state is saved in model space by the adapter; its legacy non-sharded
  format is refused with a clear error).
"""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LR, WD, STEPS, SEQ, VOCAB = 2e-3, 0.1, 3, 32, 128
HIDDEN, HEADS, GROUPS, EXPERTS = 64, 4, 2, 4


@pytest.fixture(scope="module")
def megatron():
    pytest.importorskip("megatron.core")
    import distributed_muon.integrations.megatron_optimizer  # noqa: F401  (registers dmuon)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _build(distributed: bool, init=None, dmuon=None, **overrides):
    """Megatron GPT-MoE in Megatron's DDP and ``get_megatron_optimizer(optimizer="dmuon")``.

    ``overrides``: `TransformerConfig` fields (parallel sizes, router top-k, ``bf16=False`` with
    fp32 dtypes); ``init(ddp)`` runs before the optimizer is built (its main params copy the
    weights); ``dmuon``: ``--dmuon-*`` options (e.g. ``{"ns_dtype": "fp32"}``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    fields = dict(
        num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=128, num_attention_heads=HEADS,
        num_query_groups=GROUPS, num_moe_experts=EXPERTS, moe_router_topk=2,
        moe_ffn_hidden_size=96, moe_grouped_gemm=False, moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall", add_bias_linear=False, bf16=True,
        hidden_dropout=0.0, attention_dropout=0.0,  # resume must not depend on the RNG state
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
    )
    config = TransformerConfig(**{**fields, **overrides})
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    if config.sequence_parallel:  # the local spec's torch norm refuses it (no TE/apex here)
        from distributed_muon.integrations.megatron_spec import local_gpt_block_spec

        spec = local_gpt_block_spec(config.num_layers, EXPERTS, moe_grouped_gemm=False)
    gpt = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                   max_sequence_length=SEQ).cuda()
    # As Megatron's get_model does for --bf16: every parameter bf16, inputs cast.
    model = Float16Module(config, gpt) if config.bf16 else gpt
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=distributed))
    if init is not None:
        init(ddp)
    opt_config = OptimizerConfig(optimizer="dmuon", lr=LR, weight_decay=WD, bf16=config.bf16,
                                 use_distributed_optimizer=distributed, clip_grad=0.0)
    for name, value in (dmuon or {}).items():
        setattr(opt_config, f"dmuon_{name}", value)
    return ddp, get_megatron_optimizer(opt_config, [ddp]), config


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen).cuda()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1).cuda()
    pos = torch.arange(SEQ).cuda().unsqueeze(0).expand(2, -1)
    return tokens[:, :-1], pos, mask, tokens[:, 1:]


def _train_step(ddp, opt, step: int) -> tuple[dict[str, torch.Tensor], float]:
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tokens, pos, mask, labels = _batch(step)
    loss = ddp(tokens, pos, mask, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.detach().float().clone() for n, p in ddp.module.named_parameters()}
    ok, norm, _ = opt.step()
    assert ok
    return grads, float(norm)


def _mains(ddp) -> dict[str, torch.Tensor]:
    # The fp32 main copy of a bf16 param (at DP=1 the distributed optimizer's shard is whole).
    return {n: getattr(p, "main_param", None).detach().view(p.shape).clone()
            for n, p in ddp.module.named_parameters()}


def _inner(opt):
    return [w.optimizer for w in opt.chained_optimizers]


def _reference(start: dict[str, torch.Tensor], config):
    """`DistributedMuon` on fp32 copies, grouped independently of the adapter by Megatron's
    rules: 2-D weights but the word embedding and output layer -> Muon (the learned position
    embedding too; QKV as [Q; K; V], rows regrouped here), the rest AdamW; no weight decay on
    1-D params and biases; spectral = 5 x match_rms_adamw; Megatron's per-step "quintic"."""
    from distributed_muon.integrations.megatron_parity import MEGATRON_COEFFICIENTS

    from distributed_muon import DistributedMuon

    q = HEADS // GROUPS * config.kv_channels
    qkv = (q, config.kv_channels, config.kv_channels)
    params, groups = {}, []
    for name, t in start.items():
        p = torch.nn.Parameter(_grouped(t, qkv) if name.endswith("linear_qkv.weight") else
                               t.clone())
        params[name] = p
        matrix = p.ndim == 2 and "word_embeddings" not in name and "output_layer" not in name
        group = {"params": [p], "use_muon": matrix}
        if matrix:
            group.update(lr=LR * 5, weight_decay=WD / 5)
            if name.endswith("linear_qkv.weight"):
                group["row_blocks"] = tuple(GROUPS * r for r in qkv)
        else:
            group.update(lr=LR, weight_decay=0.0 if p.ndim == 1 or name.endswith(".bias")
                         else WD)
        groups.append(group)
    # The adapter's Newton-Schulz under Megatron's defaults: standard, bf16 ("medium").
    opt = DistributedMuon(groups, momentum=0.95, nesterov=False, adamw_betas=(0.9, 0.999),
                          adamw_eps=1e-8, ns_schedule=MEGATRON_COEFFICIENTS["quintic"],
                          ns_method="standard", ns_dtype="bf16")

    def step(grads):
        for name, p in params.items():
            g = grads[name]
            p.grad = _grouped(g, qkv) if name.endswith("linear_qkv.weight") else g
        opt.step()

    def weights():
        return {n: _ungrouped(p.detach(), qkv) if n.endswith("linear_qkv.weight")
                else p.detach() for n, p in params.items()}

    return step, weights, opt


def _grouped(t, qkv):
    per = t.view(GROUPS, sum(qkv), -1)
    return torch.cat([s.reshape(-1, t.shape[-1]) for s in per.split(qkv, dim=1)])


def _ungrouped(t, qkv):
    parts = [x.view(GROUPS, r, -1) for x, r in zip(t.split([GROUPS * r for r in qkv]), qkv)]
    return torch.cat(parts, dim=1).reshape(t.shape)


@pytest.mark.parametrize("distributed", [False, True], ids=["float16-wrapper", "distopt"])
def test_megatron_gpt_moe_with_dmuon_equals_reference(megatron, distributed):
    ddp, opt, config = _build(distributed)
    step, weights, ref = _reference(_mains(ddp), config)
    n_matrices = sum(len(o.inner.layout.matrices) for o in _inner(opt))
    for s in range(STEPS):
        grads, norm = _train_step(ddp, opt, s)
        want_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        assert norm == pytest.approx(float(want_norm), rel=1e-4)
        step(grads)
    mine, want = _mains(ddp), weights()
    for name in want:
        err = (mine[name] - want[name]).norm() / want[name].norm()
        assert float(err) < 1e-4, (name, float(err))
    assert sum(o.ns_matrices for o in _inner(opt)) == n_matrices * STEPS
    assert ref.ns_matrices == n_matrices * STEPS


@pytest.mark.parametrize("distributed", [False, True], ids=["float16-wrapper", "distopt"])
def test_megatron_checkpoint_resume_is_exact(megatron, distributed, tmp_path):
    from megatron.core import dist_checkpointing

    ddp, opt, _ = _build(distributed)
    for s in range(2):
        _train_step(ddp, opt, s)
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)},
                            str(tmp_path))
    _train_step(ddp, opt, 2)
    after = _mains(ddp)

    ddp2, opt2, _ = _build(distributed)
    model_sd = ddp2.module.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": opt2.sharded_state_dict(model_sd, is_loading=True)},
        str(tmp_path))
    ddp2.module.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    _train_step(ddp2, opt2, 2)
    again = _mains(ddp2)
    for name in after:
        assert torch.equal(after[name], again[name]), name


def test_distributed_optimizer_legacy_checkpoint_is_refused_clearly(megatron):
    ddp, opt, _ = _build(True)
    _train_step(ddp, opt, 0)
    with pytest.raises(NotImplementedError, match="torch_dist"):
        opt.state_dict()


def test_megatron_argument_parser_takes_optimizer_dmuon(megatron):
    try:
        from megatron.training.arguments import parse_args
    except ImportError as err:  # megatron-core < 0.19 ships no megatron.training
        pytest.skip(f"megatron.training not importable here: {err}")
    import sys

    from distributed_muon.integrations.megatron_optimizer import register

    register()  # megatron.training may have been imported after the adapter
    argv = ["x", "--optimizer", "dmuon", "--dmuon-ns-method", "gram", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--lr", "1e-3",
            "--train-iters", "3", "--use-distributed-optimizer", "--bf16",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data"]
    old, sys.argv = sys.argv, argv
    try:
        args = parse_args()
        from megatron.training import arguments

        arguments.validate_args(args, {})
    finally:
        sys.argv = old
    assert (args.optimizer, args.dmuon_ns_method) == ("dmuon", "gram")
    # adam/sgd keep the flat distributed optimizer: dmuon must not be turned layer-wise
    assert args.use_distributed_optimizer and not args.use_layer_wise_distributed_optimizer


def _train(out, *flags):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "train",
                           "--out", str(out), "--device", "cuda", "--nproc", "1", *flags],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dmuon_train_megatron_backend_trains_and_resumes(tmp_path):
    """`dmuon train --backend megatron` (Megatron's DDP, distributed optimizer, --optimizer
    dmuon): the loss falls like FSDP2's on the same data, and a resume from its torch_dist
    checkpoint (the newest one made unreadable) repeats the steps exactly."""
    pytest.importorskip("megatron.core")
    run, fsdp = tmp_path / "megatron", tmp_path / "fsdp2"
    flags = ("--steps", "8", "--eval-every", "4", "--diagnostics-every", "0")
    _train(run, *flags, "--backend", "megatron", "--save-every", "4")
    straight = _metrics(run)
    assert [r["step"] for r in straight] == list(range(1, 9))
    (run / "ckpt" / "step_0000008" / "manifest.json").unlink()  # as if cut short
    proc = _train(run, *flags, "--backend", "megatron", "--resume")
    assert "resumed at step 4" in proc.stdout
    again = _metrics(run)
    assert [{**r, "time": 0} for r in again] == [{**r, "time": 0} for r in straight]
    _train(fsdp, *flags, "--backend", "fsdp2")
    ref = _metrics(fsdp)
    assert straight[-1]["loss"] < straight[0]["loss"]
    # Not equal: Megatron's param groups skip weight decay on 1-D params and biases.
    assert abs(straight[-1]["loss"] - ref[-1]["loss"]) < 0.05 * ref[-1]["loss"]
