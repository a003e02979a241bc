"""The ``dmuon`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import distributed_muon


def _demo(args: argparse.Namespace) -> int:
    from distributed_muon.regression import OPTIMIZERS, compare

    print(
        f"Ill-conditioned multi-output linear regression (64 inputs, 32 outputs, input "
        f"condition number 1e3), {args.steps} full-batch steps, linear lr decay; each "
        "optimizer's lr is the best of its own 5-point grid.",
        flush=True,
    )
    rows = compare(args.seeds, args.steps, progress=lambda s: print("  " + s, flush=True))
    print()
    print(f"{'optimizer':<10} {'best lr':>8} " + " ".join(f"{'seed ' + str(s):>11}"
                                                         for s in args.seeds))
    for name in OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == name]
        lrs = sorted({r["lr"] for r in mine})
        print(f"{name:<10} {'/'.join(f'{lr:g}' for lr in lrs):>8} "
              + " ".join(f"{r['loss']:>11.3e}" for r in mine))
    print(f"{'(initial)':<10} {'':>8} "
          + " ".join(f"{r['initial']:>11.3e}" for r in rows if r["optimizer"] == "muon"))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from distributed_muon.bench import BenchConfig, run

    run(BenchConfig(**{k: v for k, v in vars(args).items() if k not in ("func", "command")}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from distributed_muon.launch.train import TrainConfig, main

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    try:
        cfg = TrainConfig(**options)
        cfg.validate()
    except ValueError as err:
        print(f"dmuon train: {err}", file=sys.stderr)
        return 2
    main(cfg)
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from distributed_muon.launch.slurm import SlurmConfig, render

    style = args.launcher if args.backend in ("fsdp2", "ddp") else args.backend
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if args.backend in ("fsdp2", "ddp"):
        train_args = ["--backend", args.backend, *train_args]
    cfg = SlurmConfig(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      tasks_per_node=args.tasks_per_node, style=style, job_name=args.job_name,
                      partition=args.partition, time=args.time, port=args.port,
                      python=args.python, train_args=train_args)
    try:
        text = render(cfg)
    except ValueError as err:
        print(f"dmuon slurm: {err}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}: submit with  sbatch {args.output}")
    else:
        print(text, end="")
    return 0


def _version(args: argparse.Namespace) -> int:
    import torch

    print(f"distributed_muon {distributed_muon.__version__} (torch {torch.__version__})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmuon", description="Distributed Muon: tools, demos and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="Muon vs AdamW vs SGD on an ill-conditioned regression")
    demo.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="problem seeds (default 0 1 2)")
    demo.set_defaults(func=_demo)
    from distributed_muon.bench import DEFAULT_SHAPES

    bench = sub.add_parser(
        "bench", help="time the optimizer step by phase on N ranks",
        description="Time DistributedMuon's step (momentum / exchange in / NS / exchange out / "
        "update) on N local ranks, or on the job's ranks under torchrun/srun.")
    bench.add_argument("--shapes", default=DEFAULT_SHAPES,
                       help="matrices of one layer, [out]x[in] or ExMxN, comma-separated "
                       f"(default {DEFAULT_SHAPES}: a d=2048 transformer layer)")
    bench.add_argument("--layers", type=int, default=16, help="repeat the shapes (default 16)")
    bench.add_argument("--nproc", type=int, default=1, help="local ranks to start (default 1)")
    bench.add_argument("--layout", choices=["fsdp2", "replicated"], default="fsdp2")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench.add_argument("--ns-dtype", default="bf16")
    bench.add_argument("--comm-dtype", default="bf16")
    bench.add_argument("--plan", choices=["lpt", "round_robin"], default="lpt")
    bench.add_argument("--json", help="also write the results as JSON to this file")
    bench.set_defaults(func=_bench)
    train = sub.add_parser(
        "train", help="pretrain a small MoE language model (the main job)",
        description="Pretrain a small GPT-style MoE on the Python standard library's sources "
        "(no download), on N local ranks or the ranks of a torchrun/srun job.")
    train.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    train.add_argument("--nproc", type=int, default=2, help="local ranks to start (default 2)")
    train.add_argument("--out", default="runs/train", help="output directory")
    train.add_argument("--backend", default="fsdp2", help="fsdp2 | ddp | deepspeed")
    train.add_argument("--optimizer", default="muon", help="muon | adamw")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--compare", action="store_true",
                       help="train Muon and AdamW on the same data order and plot both")
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("--lr", type=float, help="peak learning rate (default: per optimizer)")
    train.add_argument("--batch", type=int, default=16, help="global sequences per step")
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--zero-stage", type=int,
                       help="ZeRO stage for --backend deepspeed (0-3, default 2)")
    train.set_defaults(func=_train)
    slurm = sub.add_parser(
        "slurm", help="render an sbatch script for a multi-node `dmuon train` job",
        description="Render an sbatch script. Arguments after `--` go to `dmuon train`.")
    slurm.add_argument("--nodes", type=int, default=2)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    slurm.add_argument("--tasks-per-node", type=int,
                       help="ranks per node (default: one per GPU, 1 without GPUs)")
    slurm.add_argument("--backend", choices=["fsdp2", "ddp", "deepspeed", "megatron"],
                       default="fsdp2")
    slurm.add_argument("--launcher", choices=["torchrun", "srun"], default="torchrun",
                       help="for fsdp2/ddp: torchrun per node, or one srun task per rank")
    slurm.add_argument("--job-name", default="dmuon-train")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="01:00:00")
    slurm.add_argument("--port", type=int, default=29500, help="rendezvous port")
    slurm.add_argument("--python", default="python3", help="interpreter on the nodes")
    slurm.add_argument("--output", "-o", help="write the script here instead of stdout")
    slurm.add_argument("train_args", nargs=argparse.REMAINDER, help="-- dmuon train flags")
    slurm.set_defaults(func=_slurm)
    ckpt = sub.add_parser(
        "ckpt", help="convert a DeepSpeed checkpoint's DistributedMuon state",
        description="Rebuild whole tensors from a DeepSpeed ZeRO-1/2/3 checkpoint saved with "
        "\"type\": \"DistributedMuon\" and write the topology-free form (DCP), which "
        "distributed_muon.integrations.deepspeed_checkpoint.load_topology_free loads at any "
        "data-parallel size and ZeRO stage.")
    ckpt.add_argument("src", help="the DeepSpeed checkpoint tag folder (e.g. ckpt/global_step100)")
    ckpt.add_argument("dst", help="output folder (must not exist)")
    ckpt.set_defaults(func=_ckpt)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def _ckpt(args: argparse.Namespace) -> int:
    from pathlib import Path

    if Path(args.dst).exists():
        print(f"dmuon ckpt: {args.dst} exists; choose a new folder", file=sys.stderr)
        return 2
    try:
        from distributed_muon.integrations.deepspeed_checkpoint import convert_checkpoint
    except ImportError as err:
        print(f"dmuon ckpt needs DeepSpeed: pip install 'distributed-muon[deepspeed]' ({err})",
              file=sys.stderr)
        return 2
    try:
        summary = convert_checkpoint(args.src, args.dst, progress=lambda s: print(s, flush=True))
    except (FileNotFoundError, ValueError) as err:
        print(f"dmuon ckpt: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['parameters']} parameters from {summary['ranks']} ZeRO-"
          f"{summary['zero_stage']} ranks to {args.dst}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
