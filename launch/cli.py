"""The ``dmuon`` command.

Every subcommand reports a bad input in one line on stderr and exits 2; a rank that fails
while running is reported in one line (its traceback goes to a file) and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from distributed_muon.launch.flags import add_flags, from_args

import distributed_muon


def _demo(args: argparse.Namespace) -> int:
    from distributed_muon.launch.regression import OPTIMIZERS, compare

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be at least 1")
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
    from distributed_muon.launch.bench import BenchConfig, run

    run(from_args(BenchConfig, args))
    return 0


def _train(args: argparse.Namespace) -> int:
    from distributed_muon.launch.train import main
    from distributed_muon.launch.train_config import TrainConfig

    main(from_args(TrainConfig, args))
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from distributed_muon.launch.slurm import TRAIN_FLAGS, SlurmConfig
    from distributed_muon.launch.train_config import TrainConfig

    style = args.launcher if args.backend in ("fsdp2", "ddp") else args.backend
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if args.script is not None:  # the arguments after -- are the script's, not dmuon train's
        cfg = SlurmConfig(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          tasks_per_node=args.tasks_per_node, style=style,
                          job_name=args.job_name, partition=args.partition, time=args.time,
                          port=args.port, python=args.python, train_args=train_args,
                          script=args.script)
        _emit(cfg, args.output)
        return 0
    if any(a == "--backend" or a.startswith("--backend=") for a in train_args):
        raise ValueError("--backend after --: give it to dmuon slurm (before --), which picks "
                         "the launcher for it")
    if args.backend in ("fsdp2", "ddp"):
        train_args = ["--backend", args.backend, *train_args]
    cfg = SlurmConfig(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      tasks_per_node=args.tasks_per_node, style=style, job_name=args.job_name,
                      partition=args.partition, time=args.time, port=args.port,
                      python=args.python, train_args=train_args)
    cfg.validate()
    # The train flags are checked here exactly as `dmuon train` checks them, against the job's
    # ranks: a typo should cost one line now, not a queued job that fails.
    train = _TrainFlags(prog="dmuon train")
    add_flags(train, TrainConfig)
    try:
        from_args(TrainConfig, train.parse_args(TRAIN_FLAGS.get(style, []) + train_args)) \
            .validate(world=cfg.world)
    except ValueError as err:
        raise ValueError(f"after --: {err}") from None
    _emit(cfg, args.output)
    return 0


def _emit(cfg: typing.Any, output: str | None) -> None:
    from distributed_muon.launch.slurm import render

    text = render(cfg)
    if output:
        _write_script(Path(output), text)
        print(f"wrote {output}: submit with  sbatch {output}")
    else:
        print(text, end="")


def _write_script(path: Path, text: str) -> None:
    if path.is_dir():
        raise ValueError(f"--output {path}: is a folder; name the script, e.g. "
                         f"{path / 'job.sbatch'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise ValueError(f"--output {path}: cannot write there ({err.strerror})") from None


def _ckpt(args: argparse.Namespace) -> int:
    if Path(args.dst).exists():
        raise ValueError(f"{args.dst} exists; choose a new folder")
    try:
        from distributed_muon.integrations.deepspeed_checkpoint import convert_checkpoint
    except ImportError as err:
        raise ValueError("dmuon ckpt needs DeepSpeed: pip install "
                         f"'distributed-muon[deepspeed]' ({err})") from None
    try:
        summary = convert_checkpoint(args.src, args.dst, progress=lambda s: print(s, flush=True))
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    print(f"wrote {summary['parameters']} parameters from {summary['ranks']} ZeRO-"
          f"{summary['zero_stage']} ranks to {args.dst}")
    return 0


def _megatron(args: argparse.Namespace) -> int:
    from distributed_muon.launch.megatron_run import run

    run(args.script, args.script_args)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from distributed_muon.launch.plan import main

    return main(args)


def _version_text() -> str:
    import torch

    return f"distributed_muon {distributed_muon.__version__} (torch {torch.__version__})"


def _version(args: argparse.Namespace) -> int:
    print(_version_text())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (its default prints the whole usage first), no prefix
    matching (``--step`` must not pass for ``--steps``) and defaults in every help."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _TrainFlags(_Parser):
    """`dmuon train`'s flags after `dmuon slurm ... --`: an error is a ValueError."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(f"{message} (see dmuon train --help)")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default X)`` to a flag's help where the help does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default
                not in (None, False, argparse.SUPPRESS) and action.nargs != 0):
            default = action.default
            if isinstance(default, list | tuple):
                default = " ".join(map(str, default))
            text += f" (default {default})".replace("%", "%%")
        return text


def build_parser() -> argparse.ArgumentParser:
    from distributed_muon.launch.bench import BenchConfig
    from distributed_muon.launch.train_config import TrainConfig

    parser = _Parser(
        prog="dmuon", description="Distributed Muon: tools, demos and benchmarks."
    )
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="Muon vs AdamW vs SGD on an ill-conditioned regression")
    demo.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="problem seeds (default 0 1 2)")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser(
        "bench", help="time the optimizer step by phase on N ranks",
        description="Time DistributedMuon's step phase by phase on N local ranks, or on the "
        "job's ranks under torchrun/srun.")
    add_flags(bench, BenchConfig)
    bench.set_defaults(func=_bench)
    train = sub.add_parser(
        "train", help="pretrain a small MoE language model (the main job)",
        description="Pretrain a small GPT-style MoE on the Python standard library's sources "
        "(no download), on N local ranks or the ranks of a torchrun/srun job.")
    add_flags(train, TrainConfig)
    train.set_defaults(func=_train)
    slurm = sub.add_parser(
        "slurm", help="render an sbatch script for a multi-node `dmuon train` job",
        description="Render an sbatch script. Arguments after `--` go to `dmuon train` (or, "
        "with --script, to that script).")
    slurm.add_argument("--nodes", type=int, default=2, help="nodes in the job")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    slurm.add_argument("--tasks-per-node", type=int,
                       help="ranks per node (default: one per GPU, 1 without GPUs)")
    slurm.add_argument("--backend", choices=["fsdp2", "ddp", "deepspeed", "megatron"],
                       default="fsdp2", help="dmuon train --backend (picks the launcher)")
    slurm.add_argument("--launcher", choices=["torchrun", "srun"], default="torchrun",
                       help="for fsdp2/ddp: torchrun per node, or one srun task per rank")
    slurm.add_argument("--job-name", default="dmuon-train", help="sbatch --job-name")
    slurm.add_argument("--partition", help="sbatch --partition (default: the cluster's)")
    slurm.add_argument("--time", default="01:00:00",
                       help="sbatch --time limit: minutes or [D-]HH:MM:SS")
    slurm.add_argument("--port", type=int, default=29500, help="rendezvous port")
    slurm.add_argument("--python", default="python3", help="interpreter on the nodes")
    slurm.add_argument("--output", "-o", help="write the script here (its folder is created) "
                       "instead of stdout")
    slurm.add_argument("--script", help="with --backend megatron: run this Megatron-LM training "
                       "script (e.g. pretrain_gpt.py, its arguments after --) through `dmuon "
                       "megatron` instead of dmuon train")
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
    megatron = sub.add_parser(
        "megatron", help="run a Megatron-LM training script with --optimizer dmuon registered",
        description="Run a Megatron-LM training script (e.g. pretrain_gpt.py) unchanged, as "
        "`python SCRIPT ARGS...` would, with --optimizer dmuon and the --dmuon-* flags "
        "registered. Under torchrun: torchrun ... -m distributed_muon.launch.megatron_run "
        "SCRIPT ARGS...")
    megatron.add_argument("script", help="the training script, e.g. pretrain_gpt.py")
    megatron.add_argument("script_args", nargs=argparse.REMAINDER,
                          help="the script's own arguments, e.g. --optimizer dmuon ...")
    megatron.set_defaults(func=_megatron)
    from distributed_muon.launch.plan import add_arguments as add_plan_arguments

    plan = sub.add_parser(
        "plan", help="predict Muon's optimizer step on a cluster layout (no GPUs needed)",
        description="Build the layout and ownership plan the engine would build for a model "
        "on N GPUs, from metadata alone, and price the step on a hardware model.")
    add_plan_arguments(plan)
    plan.set_defaults(func=_plan)
    from distributed_muon.launch import lr_rule

    lr = sub.add_parser(
        "lr", help="the learning rate for another batch size, from a run's noise scale",
        description="Predict the best learning rate at other batch sizes from a dmuon train "
        "run's measured gradient noise scale: eta*(B) = eta_max / sqrt(1 + B_simple / B).")
    lr_rule.add_arguments(lr)
    lr.set_defaults(func=lr_rule.main)
    from distributed_muon.launch.reporting import plot_command

    redraw = sub.add_parser("plot", help="redraw a dmuon train run's plots from metrics.jsonl",
                            description="Redraw loss.png and diagnostics.png in a dmuon train "
                            "--out folder from its metrics.jsonl (also while it trains).")
    redraw.add_argument("run", help="the --out folder of a dmuon train run")
    redraw.set_defaults(func=plot_command)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def _report_rank_failure(command: str, args: argparse.Namespace, err: Exception) -> None:
    """One line for the user; the rank's traceback, if any, to a file named in a second."""
    print(f"dmuon {command}: {err}", file=sys.stderr)
    text = getattr(err, "traceback", "")
    if not text:
        return
    folder = Path(getattr(args, "out", None) or tempfile.gettempdir())
    if folder.is_dir():
        path = folder / "error.txt"
        path.write_text(text)
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        path = Path(f.name)
    print(f"dmuon {command}: traceback in {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from distributed_muon.launch.local import RankFailed

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except ValueError as err:  # our checks: the message names the fix
        print(f"dmuon {args.command}: {err}", file=sys.stderr)
        return 2
    except RankFailed as err:
        _report_rank_failure(args.command, args, err)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT
        print(f"dmuon {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace) -> str:
    if args.command != "train":
        return "interrupted"
    from distributed_muon.launch.run_folder import interrupted_note

    if args.compare:
        return "interrupted (continue each of --out/muon and --out/adamw with --resume)"
    return interrupted_note(Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
