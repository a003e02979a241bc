"""Whole-step benchmark of a Megatron GPT-MoE on GPUs: ``--optimizer dmuon`` against Megatron's
own Muon and Adam.

    torchrun --standalone --nproc-per-node 2 scripts/bench_megatron.py \\
        --optimizer dmuon --tp 2 --ep 2 --out results.jsonl

The model is a Megatron GPT-MoE of the local spec (no Transformer Engine): every layer MoE with
SequentialMLP experts, grouped-query attention, bf16 weights in Megatron's ``Float16Module``
and DDP (fp32 gradient buffers, no overlap of communication), sequence parallel when TP > 1
(Megatron requires it for MoE with TP), expert TP 1. Optimizers, each configured as a user of
Megatron's ``get_megatron_optimizer`` would:

- ``dmuon``: ``OptimizerConfig(optimizer="dmuon", use_distributed_optimizer=True)`` (this
  project, through ``distributed_muon.integrations.megatron_optimizer``);
- ``muon_duplicated`` / ``muon_distributed``: Megatron's Muon with ``muon_tp_mode`` set, and
  ``--use-distributed-optimizer`` as Megatron's arguments turn it for Muon: its layer-wise
  distributed optimizer (``use_layer_wise_distributed_optimizer=True``, the DDP buffers laid out
  by ``LayerWiseDistributedOptimizer.compute_full_param_layout``). Needs the
  ``emerging-optimizers`` package;
- ``adam``: Megatron's Adam with its distributed optimizer.

Per step, with ``torch.cuda.synchronize()`` around it: the whole step (forward, backward,
gradient reduction, optimizer) and ``optimizer.step()`` alone, each the max over ranks; median,
min and max over ``--steps`` steps after ``--warmup``. Also the peak ``max_memory_allocated``
(max over ranks) and, for ``dmuon``, the matrices orthogonalized summed over ranks against
logical matrices x steps. Rank 0 appends one JSON line to ``--out`` and prints a summary.
"""

from __future__ import annotations

import os

# NVLink multicast off in every process, before torch.distributed is imported.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

PROG = "bench_megatron.py"
OPTIMIZERS = ("dmuon", "muon_duplicated", "muon_distributed", "adam")
SIZES = {  # flag: (default, help)
    "layers": (8, "transformer layers (every one MoE)"),
    "hidden": (2048, "hidden size"),
    "heads": (16, "attention heads"),
    "groups": (4, "query groups (GQA)"),
    "experts": (8, "experts per layer"),
    "ffn": (1408, "FFN hidden size of each expert"),
    "topk": (2, "experts per token"),
    "seq": (2048, "sequence length"),
    "micro_batch": (1, "sequences per micro-batch per data-parallel rank"),
    "accum": (1, "micro-batches per step (gradient accumulation)"),
    "vocab": (32000, "vocabulary size"),
    "warmup": (3, "untimed steps first"),
    "steps": (10, "timed steps"),
}


def fail(message: str) -> NoReturn:
    """One line on stderr (from rank 0 only under torchrun), exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Whole-step time, optimizer time and peak memory of a Megatron "
        "GPT-MoE with --optimizer dmuon, Megatron's Muon (duplicated, distributed) or Adam. "
        "Run under torchrun on GPUs.")
    parser.add_argument("--optimizer", required=True, choices=OPTIMIZERS)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel size (default 2)")
    for name, (default, text) in SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default,
                            help=f"{text} (default {default})")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    parser.add_argument("--dmuon", action="append", default=[], metavar="KEY=VALUE",
                        help="a --dmuon-* option of --optimizer dmuon, e.g. ns_method=gram or "
                        "comm_dtype=fp32 (repeatable; VALUE is JSON or a bare string)")
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    for name in ("tp", "ep", *SIZES):
        value = getattr(args, name)
        if value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive (got {value})")
    rules = [
        (args.hidden % args.heads == 0, "--hidden must be a multiple of --heads"),
        (args.heads % args.groups == 0, "--heads must be a multiple of --groups"),
        (args.groups % args.tp == 0, "--groups must be a multiple of --tp"),
        (args.experts % args.ep == 0, "--experts must be a multiple of --ep"),
        (args.topk <= args.experts, "--topk must be at most --experts"),
        (args.vocab % args.tp == 0, "--vocab must be a multiple of --tp"),
        (args.seq % args.tp == 0, "--seq must be a multiple of --tp (sequence parallel)"),
    ]
    for ok, message in rules:
        if not ok:
            parser.error(message)
    overrides = {}
    for item in args.dmuon:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--dmuon {item!r}: use KEY=VALUE, e.g. ns_method=gram")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string: ns_method=gram
    if overrides and args.optimizer != "dmuon":
        parser.error("--dmuon options apply to --optimizer dmuon only")
    args.dmuon = overrides
    return args


def check_environment(args: argparse.Namespace) -> None:
    """Everything that needs GPUs or packages, before any process group: one clear line."""
    import torch

    if not torch.cuda.is_available():
        fail("needs CUDA GPUs (Megatron's DDP and optimizers allocate on CUDA): run it on a GPU "
             "machine under torchrun")
    if "LOCAL_RANK" not in os.environ:
        fail("run it under torchrun: torchrun --standalone --nproc-per-node N "
             f"scripts/{PROG} ...")
    if importlib.util.find_spec("megatron") is None or \
            importlib.util.find_spec("megatron.core") is None:
        fail("needs megatron-core: pip install 'distributed-muon[megatron]'")
    if args.optimizer.startswith("muon_") and importlib.util.find_spec(
            "emerging_optimizers") is None:
        fail(f"--optimizer {args.optimizer} (Megatron's Muon) needs the emerging-optimizers "
             "package: pip install emerging-optimizers")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.tp or world % args.ep:
        fail(f"{world} processes do not divide into --tp {args.tp} and --ep {args.ep}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local > torch.cuda.device_count():
        fail(f"{local} processes on this node but {torch.cuda.device_count()} GPUs")


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(DDP-wrapped model, Megatron optimizer, TransformerConfig) for ``args.optimizer``."""
    import torch
    from distributed_muon.integrations.megatron_spec import local_gpt_block_spec
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads, num_query_groups=args.groups,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn,
        moe_grouped_gemm=False, moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
        tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=1, sequence_parallel=args.tp > 1)
    spec = local_gpt_block_spec(args.layers, args.experts, moe_grouped_gemm=False)
    gpt = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                   max_sequence_length=args.seq, position_embedding_type="rope").cuda()
    model = Float16Module(config, gpt)  # as Megatron's get_model does for --bf16
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=True)
    common = dict(lr=args.lr, weight_decay=0.1, bf16=True, clip_grad=1.0)
    layout = None
    if args.optimizer.startswith("muon_"):
        # What Megatron's training code does for --optimizer muon --use-distributed-optimizer:
        # the layer-wise distributed optimizer over DDP buffers laid out for it.
        from megatron.core.optimizer import layer_wise_optimizer as lw

        if not hasattr(lw.LayerWiseDistributedOptimizer, "compute_full_param_layout"):
            fail("--optimizer muon_* needs megatron-core >= 0.19 (the layer-wise parameter "
                 "layout)")
        lw.tag_params_for_buffer_routing([model])
        layout = lw.LayerWiseDistributedOptimizer.compute_full_param_layout(
            [p for p in model.parameters() if p.requires_grad], None,
            ps.get_data_parallel_world_size(with_context_parallel=True), ddp_config,
            expert_data_parallel_world_size=ps.get_expert_data_parallel_world_size())
        opt_config = OptimizerConfig(
            optimizer="muon", muon_tp_mode=args.optimizer.removeprefix("muon_"),
            use_distributed_optimizer=False, use_layer_wise_distributed_optimizer=True,
            **common)
    elif args.optimizer == "dmuon":
        from distributed_muon.integrations import megatron_optimizer  # registers dmuon

        opt_config = OptimizerConfig(optimizer="dmuon", use_distributed_optimizer=True,
                                     **common)
        for key, value in args.dmuon.items():  # what the --dmuon-* flags set
            if key not in megatron_optimizer.FLAGS:
                fail(f"--dmuon {key}: not a --dmuon-* option (valid: "
                     f"{', '.join(sorted(megatron_optimizer.FLAGS))})")
            setattr(opt_config, f"dmuon_{key}", value)
    else:
        opt_config = OptimizerConfig(optimizer="adam", use_distributed_optimizer=True, **common)
    extra = {} if layout is None else {"full_param_layout": layout}
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, **extra)
    # Looked up at call time: importing the adapter above patches the module's function.
    return ddp, mcore_optimizer.get_megatron_optimizer(opt_config, [ddp]), config


def batches(args: argparse.Namespace) -> list[tuple[Any, Any, Any]]:
    """``accum`` micro-batches of random tokens (the same on TP ranks, different over DP)."""
    import torch
    from megatron.core import parallel_state as ps

    gen = torch.Generator().manual_seed(1000 + ps.get_data_parallel_rank())
    out = []
    for _ in range(args.accum):
        tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1), generator=gen)
        tokens = tokens.cuda()
        pos = torch.arange(args.seq, device="cuda").unsqueeze(0).expand(args.micro_batch, -1)
        out.append((tokens[:, :-1].contiguous(), pos, tokens[:, 1:].contiguous()))
    return out


def train_step(ddp: Any, opt: Any, data: list, mask: Any) -> tuple[float, float, float]:
    """One step: (loss, whole-step seconds, optimizer.step() seconds) on this rank."""
    import torch
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    torch.cuda.synchronize()
    start = time.perf_counter()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    total = 0.0
    for tokens, pos, labels in data:
        loss = ddp(tokens, pos, mask, labels=labels).float().mean() / len(data)
        loss.backward()
        total += float(loss.detach())
    finalize_model_grads([ddp])  # DP reduction, sequence-parallel norm/router grads over TP
    torch.cuda.synchronize()
    opt_start = time.perf_counter()
    ok, _, _ = opt.step()
    torch.cuda.synchronize()
    end = time.perf_counter()
    if not ok:
        raise RuntimeError("the optimizer skipped its step (non-finite gradients?)")
    return total, end - start, end - opt_start


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def exactly_once(opt: Any, steps: int) -> dict[str, Any]:
    """dmuon's count: matrices orthogonalized over all ranks vs logical matrices x steps."""
    import torch
    import torch.distributed as dist

    inner = [w.optimizer for w in opt.chained_optimizers]
    counts = torch.tensor([sum(o.ns_matrices for o in inner)], device="cuda")
    dist.all_reduce(counts)
    matrices = sum(len(o.inner.layout.matrices) for o in inner)
    return {"ns_matrices": int(counts.item()), "logical_matrices": matrices,
            "exactly_once": int(counts.item()) == matrices * steps}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    rank, world = dist.get_rank(), dist.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                 expert_model_parallel_size=args.ep,
                                 expert_tensor_parallel_size=1)
    log = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    try:
        setup = time.perf_counter()
        log(f"building the model and --optimizer {args.optimizer} on {world} GPUs ...")
        ddp, opt, _ = build(args)
        data = batches(args)
        mask = torch.triu(torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool,
                                     device="cuda"), diagonal=1)
        setup = time.perf_counter() - setup
        losses, times = [], []
        for step in range(args.warmup + args.steps):
            loss, whole, optimizer = train_step(ddp, opt, data, mask)
            losses.append(loss)
            if step >= args.warmup:
                times.append((whole, optimizer))
            log(f"step {step + 1}/{args.warmup + args.steps}: loss {loss:.4f}, "
                f"{whole * 1e3:.1f} ms (optimizer {optimizer * 1e3:.1f} ms)")
        slowest = torch.tensor(times, dtype=torch.float64, device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # per step, the slowest rank
        peak = torch.tensor([torch.cuda.max_memory_allocated()], dtype=torch.float64,
                            device="cuda")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result: dict[str, Any] = {
            "optimizer": args.optimizer, "world": world, "tp": args.tp, "ep": args.ep,
            "dp": world // args.tp, "expert_dp": world // args.ep,
            **{name: getattr(args, name) for name in SIZES}, "lr": args.lr,
            "dmuon": args.dmuon if args.optimizer == "dmuon" else None,
            "tokens_per_step": args.seq * args.micro_batch * args.accum * world // args.tp,
            "step_ms": summary([1e3 * t for t in slowest[:, 0].tolist()]),
            "optimizer_ms": summary([1e3 * t for t in slowest[:, 1].tolist()]),
            "peak_memory_gib": float(peak.item()) / 2**30,
            "setup_s": setup, "loss_first": losses[0], "loss_last": losses[-1],
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "megatron_core": importlib.metadata.version("megatron-core"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if args.optimizer == "dmuon":
            result.update(exactly_once(opt, args.warmup + args.steps))
        return result
    finally:
        ps.destroy_model_parallel()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_environment(args)
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    try:
        result = run(args)
        if dist.get_rank() == 0:
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
            step, opt = result["step_ms"], result["optimizer_ms"]
            once = ""
            if "exactly_once" in result:
                steps, matrices = args.warmup + args.steps, result["logical_matrices"]
                once = (f", exactly once: {'yes' if result['exactly_once'] else 'NO'} "
                        f"({result['ns_matrices']} orthogonalized, {matrices} matrices x "
                        f"{steps} steps = {matrices * steps})")
            name = " ".join([args.optimizer, *(f"{k}={v}" for k, v in args.dmuon.items())])
            print(f"{name} tp={args.tp} ep={args.ep} dp={result['dp']}: step "
                  f"{step['median']:.1f} ms (min {step['min']:.1f}, max {step['max']:.1f}), "
                  f"optimizer {opt['median']:.1f} ms (min {opt['min']:.1f}, max "
                  f"{opt['max']:.1f}), peak {result['peak_memory_gib']:.2f} GiB, setup "
                  f"{result['setup_s']:.0f} s{once}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
