"""`dmuon train`'s configuration: one dataclass, its flags, and every check that can run
before a rank starts (so a bad input costs one line, not a rank's traceback)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from distributed_muon.launch.backends import BACKENDS
from distributed_muon.launch.flags import check_optimizer_options, optimizer_option, option
from distributed_muon.launch.local import env_world_size, launched_externally, leads_job
from distributed_muon.launch.metrics_log import read_metrics
from distributed_muon.launch.run_checkpoint import CheckpointInfo, find_resume_checkpoint
from distributed_muon.launch.run_folder import check_new_run, move_previous_run
from distributed_muon.launch.tiny_moe import ModelConfig

OPTIMIZERS = ("muon", "adamw")
# Chosen by the same sweep for both optimizers (scripts/compare_optimizers.py, docs/train.md):
# best validation loss over lr in {3e-4, 1e-3, 3e-3, 1e-2, 3e-2} at the default budget, seed 0.
DEFAULT_LR = {"muon": 1e-2, "adamw": 1e-3}
# Fields named like optimizer options that are the training recipe's, for either optimizer.
RECIPE_FIELDS = ("lr", "weight_decay")


@dataclass
class TrainConfig:
    steps: int = option(400, "optimizer steps")
    nproc: int = option(2, "local ranks to start (ignored under torchrun/srun)")
    out: str = option("runs/train", "output directory")
    backend: str = option("fsdp2", "how the model is sharded", choices=tuple(BACKENDS))
    optimizer: str = option("muon", "optimizer", choices=OPTIMIZERS)
    seed: int = option(0, "seed of the initial weights and the data order")
    compare: bool = option(False, "train Muon and AdamW on the same data order and plot both")
    save_every: int = option(0, "checkpoint every N steps and at the end (0: never)")
    resume: bool = option(False, "continue from the latest good checkpoint in --out")
    lr: float | None = option(None, "peak learning rate (default: muon 1e-2, adamw 1e-3)")
    weight_decay: float = option(0.1, "decoupled weight decay")
    batch: int = option(16, "global sequences per step (a multiple of the ranks)")
    eval_every: int = option(50, "validation every N steps and at the end")
    eval_batches: int = option(8, "validation batches per evaluation")
    warmup: int = option(20, "linear warmup steps before the cosine decay")
    device: str = option("auto", "auto: CUDA when available", choices=("auto", "cpu", "cuda"))
    zero_stage: int | None = option(None, "ZeRO stage for --backend deepspeed (default 2)",
                                    choices=(0, 1, 2, 3))
    qk_clip: float | None = optimizer_option(
        "qk_clip_tau", note="muon only; inf: log the max logit, never clip")
    per_head: bool = optimizer_option("per_head", note="muon only")
    diagnostics_every: int = optimizer_option(
        "diagnostics_every", default=10, why="a training run logs what it measures",
        note="with the gradient noise scale")
    ns_method: str | None = optimizer_option(
        "ns_method", default=None, why="unset means the optimizer's; set, it is refused with "
        "adamw", note="default the optimizer's")
    ns_dtype: str | None = optimizer_option(
        "ns_dtype", default=None, why="CPUs' half-precision matmuls are slow",
        note="default the optimizer's on GPUs, fp32 on CPUs")
    model: ModelConfig = field(default_factory=ModelConfig)
    # Set by `prepare`: the checkpoint folder a --resume starts from.
    resume_from: str | None = option(None, "", flag=False)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def validate(self, world: int | None = None) -> None:
        """Checks before any rank starts; each error names the flag to fix. ``world``: the
        ranks of a job for other machines (`dmuon slurm`): then only the values are checked,
        not what this machine has (CUDA, packages)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: use one of {tuple(BACKENDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        for name in ("steps", "batch", "nproc", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)}: must be at least 1")
        if self.save_every < 0 or self.warmup < 0 or self.diagnostics_every < 0:
            raise ValueError("--save-every, --warmup and --diagnostics-every must be >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr {self.lr}: must be a positive number")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay {self.weight_decay}: must be >= 0")
        if self.compare and self.lr is not None:
            raise ValueError("--compare uses each optimizer's own default lr: drop --lr")
        if self.compare and self.resume:
            raise ValueError("--compare cannot --resume: resume each run in --out/muon and "
                             "--out/adamw on its own")
        check_optimizer_options(self)
        if self.qk_clip is not None:
            if not self.qk_clip > 0:
                raise ValueError(f"--qk-clip {self.qk_clip}: must be a positive number")
            if self.optimizer != "muon":
                raise ValueError(f"--qk-clip is an option of --optimizer muon, not "
                                 f"{self.optimizer}: drop --qk-clip or use --optimizer muon")
            if self.compare:
                raise ValueError("--qk-clip is an option of --optimizer muon, and --compare "
                                 "also trains adamw: drop --compare or --qk-clip")
        ns = [f"--{k.replace('_', '-')}" for k in ("ns_method", "ns_dtype") if getattr(self, k)]
        if ns and (self.optimizer != "muon" or self.compare):
            raise ValueError(f"{' and '.join(ns)}: only for --optimizer muon without "
                             "--compare; drop it")
        if ns and self.backend == "megatron":
            raise ValueError(f"{' and '.join(ns)}: not for --backend megatron, whose "
                             "Newton-Schulz follows Megatron's --muon-* flags; drop it")
        if self.per_head:
            if self.optimizer != "muon" or self.compare:
                raise ValueError("--per-head is an option of --optimizer muon (and --compare "
                                 "also trains adamw): drop --per-head, or train muon alone")
            if not BACKENDS[self.backend].supports_per_head:
                able = ", ".join(n for n in BACKENDS if BACKENDS[n].supports_per_head)
                raise ValueError(f"--per-head is not supported with --backend {self.backend} "
                                 f"yet: use --backend {able}")
        BACKENDS[self.backend].check(self)
        here = world is None
        world = self.world_size if world is None else world
        if self.batch % world:
            raise ValueError(f"--batch {self.batch} must be a multiple of the {world} ranks "
                             f"(try --batch {max(world, self.batch // world * world)})")
        if not here:
            return
        BACKENDS[self.backend].check_here(self)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu or auto")

    @property
    def world_size(self) -> int:
        return (env_world_size() or 1) if launched_externally() else self.nproc


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Validate ``cfg`` and the file system before any rank starts; returns the config with
    the checkpoint to resume from, and notes for the user (a bad checkpoint skipped)."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {cfg.out}: is a file; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {cfg.out}: cannot write there ({err.strerror})") from None
    if not cfg.resume:
        check_new_run(out)
        moved = move_previous_run(out) if leads_job() else None
        return cfg, [f"an earlier run's files in {out} moved to {moved}"] if moved else []
    info, notes = find_resume_checkpoint(out / "ckpt")
    _check_resumable(cfg, info)
    # Read here, before any rank starts: a damaged line is one line to the user, not a rank's
    # failure; a cut-off last line is a note.
    read_metrics(out / "metrics.jsonl", warn=notes.append)
    return replace(cfg, resume_from=os.fspath(info.path)), notes


def _check_resumable(cfg: TrainConfig, info: CheckpointInfo) -> None:
    meta = info.meta
    where = info.path
    if meta["optimizer"] != cfg.optimizer:
        raise ValueError(f"--resume: {where} was written by --optimizer {meta['optimizer']}, "
                         f"not {cfg.optimizer}; resume with --optimizer {meta['optimizer']} "
                         "or train into a new --out")
    fmt = BACKENDS[cfg.backend].checkpoint_format
    if meta["format"] != fmt:
        raise ValueError(f"--resume: {where} is a {meta['format']} checkpoint (--backend "
                         f"{meta['backend']}); --backend {cfg.backend} reads {fmt} checkpoints")
    if meta["seed"] != cfg.seed:
        raise ValueError(f"--resume: {where} was trained with --seed {meta['seed']}, "
                         f"not {cfg.seed}")
    # Batches are a function of (seed, step, batch): another batch size is another data order.
    trained = meta.get("config", {})
    if "batch" in trained and trained["batch"] != cfg.batch:
        raise ValueError(f"--resume: {where} was trained with --batch {trained['batch']}, "
                         f"not {cfg.batch}; resume with --batch {trained['batch']} or train "
                         "into a new --out")
    if meta["step"] >= cfg.steps:
        raise ValueError(f"--resume: {where} is at step {meta['step']}, so --steps "
                         f"{cfg.steps} leaves nothing to train; pass --steps above "
                         f"{meta['step']} to extend the run")
