"""`dmuon train`: pretrain the tiny MoE language model on the stdlib corpus.

Runs on N local ranks it starts itself (gloo on CPU, NCCL on GPUs), or on the ranks of a
torchrun / srun job. Rank 0 shows progress, writes ``metrics.jsonl``, a loss plot and a final
table. Checkpoints (``--save-every``) are written to ``<out>/ckpt/step_N.tmp`` and renamed
once complete, then ``<out>/ckpt/latest`` is replaced atomically: a crash while writing never
touches the last good checkpoint. ``--resume`` continues from it: the data order is a
function of (seed, step), so nothing is skipped or repeated.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_muon.launch.corpus import batch, load_corpus
from distributed_muon.launch.local import init_process_group_from_env, launched_externally, spawn
from distributed_muon.launch.tiny_moe import ModelConfig, TinyMoE
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distributed_muon import DistributedMuon, checkpoint, muon_param_groups

BACKENDS = ("fsdp2", "ddp", "deepspeed")
OPTIMIZERS = ("muon", "adamw")
# Chosen by the same sweep for both optimizers (scripts/compare_optimizers.py, docs/train.md):
# best validation loss over lr in {3e-4, 1e-3, 3e-3, 1e-2, 3e-2} at the default budget, seed 0.
DEFAULT_LR = {"muon": 1e-2, "adamw": 1e-3}


@dataclass
class TrainConfig:
    steps: int = 400
    nproc: int = 2
    out: str = "runs/train"
    backend: str = "fsdp2"
    optimizer: str = "muon"
    seed: int = 0
    compare: bool = False
    save_every: int = 0
    resume: bool = False
    lr: float | None = None
    weight_decay: float = 0.1
    batch: int = 16  # global rows per step
    eval_every: int = 50
    eval_batches: int = 8
    warmup: int = 20
    device: str = "auto"
    zero_stage: int | None = None  # --backend deepspeed only (default 2)
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend {self.backend!r}: use one of {BACKENDS}")
        if self.zero_stage is not None and self.backend != "deepspeed":
            raise ValueError("--zero-stage applies to --backend deepspeed only")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"--zero-stage {self.zero_stage}: use 0, 1, 2 or 3")
        if self.backend == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError as err:
                raise ValueError("--backend deepspeed needs DeepSpeed: pip install "
                                 f"'distributed-muon[deepspeed]' ({err})") from None
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        if self.steps < 1 or self.batch < 1 or self.nproc < 1:
            raise ValueError("--steps, --batch and --nproc must be positive")
        if self.save_every < 0 or self.eval_every < 1:
            raise ValueError("--save-every must be >= 0 and --eval-every >= 1")


# ------------------------------------------------------------------------ entry


def main(cfg: TrainConfig) -> dict:
    """Train (both optimizers with ``--compare``); returns rank 0's summary."""
    cfg.validate()
    if not cfg.compare:
        return _launch(cfg)
    results = {}
    for name in OPTIMIZERS:
        sub = TrainConfig(**{**asdict(cfg), "model": cfg.model, "optimizer": name,
                             "compare": False, "out": str(Path(cfg.out) / name), "lr": None})
        print(f"\n== {name} ==", flush=True)
        results[name] = _launch(sub)
    _compare_report(cfg, results)
    return results


def _launch(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if launched_externally():
        _rank_main(cfg)
    else:
        spawn(_rank_main, cfg.nproc, cfg)
    summary_file = out / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.exists() else {}


def _rank_main(cfg: TrainConfig) -> None:
    device = init_process_group_from_env(cfg.device)
    try:
        Trainer(cfg, device).run()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.batch % self.world:
            raise ValueError(f"--batch {cfg.batch} must be divisible by the {self.world} ranks")
        self.out = Path(cfg.out)
        self.lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
        self.corpus = load_corpus()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = TinyMoE(cfg.model).to(device)
        self.engine = None  # the DeepSpeed engine, which then steps optimizer and schedule
        if cfg.backend == "deepspeed":
            self.engine, self.opt, self.sched = self._deepspeed(model)
            self.model: nn.Module = self.engine
        else:
            self.model = self._wrap(model)
            self.opt = self._optimizer()
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.step = 0
        self.elapsed = 0.0
        self.tokens_per_step = cfg.batch * cfg.model.seq

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.backend == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        target = self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) \
            else self.model
        if self.cfg.optimizer == "muon":
            groups = muon_param_groups(target, **target.param_groups_spec())
            # bf16 matmuls are slow on CPUs: Newton-Schulz in fp32 there, bf16 on GPUs.
            ns_dtype = "bf16" if self.device.type == "cuda" else "fp32"
            return DistributedMuon(groups, lr=self.lr, weight_decay=self.cfg.weight_decay,
                                   ns_dtype=ns_dtype)
        return torch.optim.AdamW(target.parameters(), lr=self.lr, betas=(0.9, 0.95),
                                 weight_decay=self.cfg.weight_decay)

    def _deepspeed(self, model: nn.Module) -> tuple:
        """A DeepSpeed engine from a JSON-style config, as a DeepSpeed user writes it."""
        import deepspeed
        import distributed_muon.integrations.deepspeed  # noqa: F401  (registers the type)

        deepspeed.init_distributed(dist_backend=dist.get_backend())
        if self.cfg.optimizer == "muon":
            params = muon_param_groups(model, **model.param_groups_spec())
            ns_dtype = "bf16" if self.device.type == "cuda" else "fp32"
            block = {"type": "DistributedMuon", "params": {
                "lr": self.lr, "weight_decay": self.cfg.weight_decay, "ns_dtype": ns_dtype}}
        else:
            params = model.parameters()
            block = {"type": "AdamW", "params": {
                "lr": self.lr, "betas": [0.9, 0.95], "weight_decay": self.cfg.weight_decay,
                "torch_adam": True}}
        config = {
            "train_batch_size": self.cfg.batch,
            "train_micro_batch_size_per_gpu": self.cfg.batch // self.world,
            "gradient_accumulation_steps": 1,
            "optimizer": block,
            "zero_optimization": {"stage": 2 if self.cfg.zero_stage is None
                                  else self.cfg.zero_stage},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        engine, opt, _, sched = deepspeed.initialize(
            model=model, model_parameters=params, config=config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor))
        return engine, opt, sched

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to 10% of the peak."""
        warm = self.cfg.warmup
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.cfg.steps - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    # -------------------------------------------------------------- data

    def _local(self, data: torch.Tensor, seed: int, step: int, rows: int):
        x, y = batch(data, seed, step, rows, self.cfg.model.seq)
        per = rows // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return x[sl].to(self.device), y[sl].to(self.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        rows = max(self.world, self.cfg.batch)
        for i in range(self.cfg.eval_batches):
            x, y = self._local(self.corpus.val, 10_007, i, rows)
            ce, _ = self.model(x, y)
            total += torch.stack([ce * x.numel(), torch.tensor(float(x.numel()),
                                                               device=self.device)])
        dist.all_reduce(total)
        self.model.train()
        return float(total[0] / total[1])

    # -------------------------------------------------------------- loop

    def run(self) -> None:
        cfg = self.cfg
        metrics = MetricsLog(self.out / "metrics.jsonl", self.rank == 0)
        if cfg.resume:
            self._resume()
            metrics.truncate_after(self.step)
        elif self.rank == 0:
            metrics.reset()
        self._record_ranks()
        bar = Progress(cfg.steps, self.rank == 0)
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        bar.note(f"{cfg.optimizer} on {self.world} ranks ({cfg.backend}, {self.device.type}), "
                 f"{numel / 1e6:.2f}M parameters, "
                 f"corpus {self.corpus.train.numel() / 1e6:.1f} MB train / "
                 f"{self.corpus.val.numel() / 1e6:.1f} MB validation"
                 + (f", resumed at step {self.step}" if self.step else ""))
        val = None
        last_losses: list[float] = []
        while self.step < cfg.steps:
            start = time.perf_counter()
            x, y = self._local(self.corpus.train, cfg.seed, self.step, cfg.batch)
            ce, loss = self.model(x, y)
            if self.engine is not None:
                self.engine.backward(loss)
                self.engine.step()  # optimizer, zero_grad and LR schedule
            else:
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.sched.step()
            stats = torch.stack([ce.detach(), loss.detach()])
            dist.all_reduce(stats)
            stats /= self.world
            self.step += 1
            self.elapsed += time.perf_counter() - start
            ce_value = float(stats[0])
            last_losses = (last_losses + [ce_value])[-20:]
            record = {"step": self.step, "loss": ce_value, "lr": self.sched.get_last_lr()[0],
                      "tokens": self.step * self.tokens_per_step, "time": self.elapsed}
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val = self.evaluate()
                record["val_loss"] = val
            metrics.write(record)
            bar.update(self.step, ce_value, val, self.step * self.tokens_per_step / self.elapsed)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self._save()
        bar.close()
        if self.rank == 0:
            summary = {
                "optimizer": cfg.optimizer, "backend": cfg.backend, "world": self.world,
                "steps": self.step, "tokens": self.step * self.tokens_per_step,
                "wall_s": self.elapsed,
                "tokens_per_s": self.step * self.tokens_per_step / max(self.elapsed, 1e-9),
                "train_loss": sum(last_losses) / max(1, len(last_losses)),
                "val_loss": val, "lr": self.lr, "seed": cfg.seed,
            }
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            print(summary_table([summary]), flush=True)
            plot_losses({cfg.optimizer: metrics.read()}, self.out / "loss.png")
            print(f"metrics: {self.out / 'metrics.jsonl'}   plot: {self.out / 'loss.png'}",
                  flush=True)

    def _record_ranks(self) -> None:
        me = {"rank": self.rank, "host": socket.gethostname(),
              "node": os.environ.get("SLURMD_NODENAME", socket.gethostname())}
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, me)
        if self.rank == 0:
            (self.out / "ranks.json").write_text(json.dumps(
                {"world": self.world, "ranks": everyone}, indent=2))

    # -------------------------------------------------------------- checkpoints

    def _state(self) -> dict:
        return {"model": get_model_state_dict(self.model),
                "train": {"step": torch.tensor(self.step), "elapsed": torch.tensor(self.elapsed),
                          "seed": torch.tensor(self.cfg.seed)}}

    def _save(self) -> None:
        ckpt = self.out / "ckpt"
        if self.engine is not None:
            # DeepSpeed's own format (its `latest` file is written after the tag folder).
            self.engine.save_checkpoint(str(ckpt), tag=f"step_{self.step:07d}", client_state={
                "step": self.step, "elapsed": self.elapsed, "seed": self.cfg.seed})
            return
        final = ckpt / f"step_{self.step:07d}"
        tmp = ckpt / f"step_{self.step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        state = self._state()
        if isinstance(self.opt, DistributedMuon):
            checkpoint.save(self.opt, str(tmp), extra=state)
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.opt)
            dcp.save(state, checkpoint_id=str(tmp))
        dist.barrier()  # every rank has written its part
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = ckpt / "latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, ckpt / "latest")
        dist.barrier()

    def _resume(self) -> None:
        latest = self.out / "ckpt" / "latest"
        if not latest.exists():
            raise FileNotFoundError(
                f"--resume: no checkpoint in {latest.parent} (train with --save-every N first)")
        if self.engine is not None:
            _, client = self.engine.load_checkpoint(str(latest.parent))
            self._check_seed(client["seed"])
            self.step, self.elapsed = client["step"], client["elapsed"]
            return
        path = str(latest.parent / latest.read_text().strip())
        state = self._state()
        if isinstance(self.opt, DistributedMuon):
            checkpoint.load(self.opt, path, extra=state)
        else:
            state["optim"] = get_optimizer_state_dict(self.model, self.opt)
            dcp.load(state, checkpoint_id=path, planner=checkpoint.WeightsOnlyLoadPlanner())
            set_optimizer_state_dict(self.model, self.opt, state["optim"])
        set_model_state_dict(self.model, state["model"])
        self._check_seed(int(state["train"]["seed"]))
        self.step = int(state["train"]["step"])
        self.elapsed = float(state["train"]["elapsed"])
        self.sched.last_epoch = self.step - 1
        with warnings.catch_warnings():  # stepping a scheduler before the optimizer: intended
            warnings.simplefilter("ignore")
            self.sched.step()  # lr of the resumed step


    def _check_seed(self, seed: int) -> None:
        if seed != self.cfg.seed:
            raise ValueError(f"--resume: the checkpoint was trained with --seed {seed}, "
                             f"not {self.cfg.seed}")


# ------------------------------------------------------------------------ reporting


class MetricsLog:
    """``metrics.jsonl``: one JSON object per step (rank 0 writes)."""

    def __init__(self, path: Path, writer: bool) -> None:
        self.path, self.writer = path, writer

    def reset(self) -> None:
        self.path.write_text("")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resume starts from)."""
        if self.writer:
            keep = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Progress:
    """A progress bar on a terminal, a line every 10% elsewhere (logs, CI)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stdout.isatty()
        self.start = time.perf_counter()
        self.next_line = 0

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def update(self, step: int, loss: float, val: float | None, tok_s: float) -> None:
        if not self.enabled:
            return
        frac = step / self.total
        spent = time.perf_counter() - self.start
        eta = spent / max(frac, 1e-9) * (1 - frac) if step else 0.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        val_text = f" val {val:.3f}" if val is not None else ""
        line = (f"[{bar}] {step}/{self.total} loss {loss:.3f}{val_text} "
                f"{tok_s / 1e3:.1f}k tok/s ETA {eta:4.0f}s")
        if self.tty:
            print("\r" + line, end="", flush=True)
        elif frac >= self.next_line / 10 or step == self.total:
            print(line, flush=True)
            self.next_line = int(frac * 10) + 1

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


def summary_table(rows: list[dict]) -> str:
    head = (f"{'optimizer':<10}{'steps':>7}{'tokens':>10}{'wall s':>9}{'tok/s':>9}"
            f"{'train loss':>12}{'val loss':>10}")
    lines = [head]
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
        lines.append(f"{r['optimizer']:<10}{r['steps']:>7}{r['tokens']:>10}{r['wall_s']:>9.1f}"
                     f"{r['tokens_per_s']:>9.0f}{r['train_loss']:>12.4f}{val:>10}")
    return "\n".join(lines)


def plot_losses(runs: dict[str, list[dict]], path: Path) -> None:
    """Train loss (thin) and validation loss (markers) per step, one color per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], color=color, alpha=0.35, lw=0.8)
        val_steps = [r["step"] for r in records if "val_loss" in r]
        if val_steps:
            ax.plot(val_steps, [r["val_loss"] for r in records if "val_loss" in r], "o-",
                    color=color, label=f"{name} validation")
        ax.plot([], [], color=color, alpha=0.35, label=f"{name} train")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("dmuon train: tiny MoE on the Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _compare_report(cfg: TrainConfig, results: dict[str, dict]) -> None:
    out = Path(cfg.out)
    runs = {name: MetricsLog(out / name / "metrics.jsonl", True).read() for name in results}
    plot_losses(runs, out / "compare.png")
    print("\n" + summary_table(list(results.values())))
    print(f"plot: {out / 'compare.png'}")
