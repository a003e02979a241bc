"""`dmuon train`: pretrain the tiny MoE language model on the stdlib corpus.

Runs on N local ranks it starts itself (gloo on CPU, NCCL on GPUs), or on the ranks of a
torchrun / srun job. Every check that can run before the ranks start does (`prepare`); a
rank that fails anyway is reported in one line. Rank 0 shows progress, writes
``metrics.jsonl``, ``summary.json``, a loss plot and a final table, all before the process
group ends. Checkpoints (`run_checkpoint`) are sealed by a manifest written last; the data
order is a function of (seed, step), so a resume neither skips nor repeats a batch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from distributed_muon.launch import run_checkpoint
from distributed_muon.launch.backends import BACKENDS
from distributed_muon.launch.corpus import batch, load_corpus
from distributed_muon.launch.extensions import use_environment_extensions_dir
from distributed_muon.launch.local import (
    end_process_group,
    init_process_group_from_env,
    launched_externally,
    leads_job,
    spawn,
)
from distributed_muon.launch.metrics_log import MetricsLog
from distributed_muon.launch.reporting import (
    Progress,
    compare_report,
    plot_diagnostics,
    plot_losses,
    summary_table,
)
from distributed_muon.launch.run_folder import check_new_run
from distributed_muon.launch.tiny_moe import TinyMoE
from distributed_muon.launch.train_config import OPTIMIZERS, TrainConfig, prepare

LAST_LOSSES = 20  # the summary's train loss: mean over this many last steps


def main(cfg: TrainConfig) -> dict:
    """Train (both optimizers with ``--compare``); returns rank 0's summary.

    Raises ValueError for a bad config before any rank starts, and
    `distributed_muon.launch.local.RankFailed` when a rank fails.
    """
    cfg.validate()
    use_environment_extensions_dir()  # before any rank imports DeepSpeed; ranks inherit it
    if not cfg.compare:
        return _launch(cfg)
    subs = {name: replace(cfg, optimizer=name, compare=False, out=str(Path(cfg.out) / name))
            for name in OPTIMIZERS}
    for sub in subs.values():  # refused before the first run trains, not after it
        check_new_run(Path(sub.out))
    results = {}
    for name, sub in subs.items():
        print(f"\n== {name} ==", flush=True)
        results[name] = _launch(sub)
    compare_report(Path(cfg.out), results)
    return results


def _launch(cfg: TrainConfig) -> dict:
    cfg, notes = prepare(cfg)
    if leads_job():
        for note in notes:
            print(note, flush=True)
    if launched_externally():
        _rank_main(cfg)
    else:
        spawn(_rank_main, cfg.nproc, cfg)
    summary_file = Path(cfg.out) / "summary.json"
    return json.loads(summary_file.read_text()) if summary_file.exists() else {}


def _rank_main(cfg: TrainConfig) -> None:
    device = init_process_group_from_env(cfg.device)
    try:
        trainer = Trainer(cfg, device)
        trainer.run()
        trainer.backend.close()  # not after a failure: its collectives could wait on a dead rank
        # Free the model and the framework's engine while the group is alive, the order of
        # before `close` existed: with them alive, a srun-launched DeepSpeed rank once aborted
        # at exit (the teardown abort of `launch.local`; the cause is not proven).
        del trainer
    finally:
        end_process_group()


class Trainer:
    """One rank's training loop; the backend owns sharding, optimizer and checkpoints."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.out)
        self.corpus = load_corpus()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.backend = BACKENDS[cfg.backend](cfg, device, self._lr_factor)
        self.model = self.backend.build(TinyMoE(cfg.model).to(device))
        self.step = 0
        self.elapsed = 0.0
        self.tokens_per_step = cfg.batch * cfg.model.seq

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
        history: list[dict] = []
        if cfg.resume_from:
            train = self.backend.load(Path(cfg.resume_from))
            self.step, self.elapsed = int(train["step"]), float(train["elapsed"])
            history = metrics.resume_at(self.step)
        else:
            metrics.start_fresh()
        self._record_ranks()
        bar = Progress(cfg.steps, self.rank == 0, first=self.step)
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        bar.note(f"{cfg.optimizer} on {self.world} ranks ({cfg.backend}, {self.device.type}), "
                 f"{numel / 1e6:.2f}M parameters, "
                 f"corpus {self.corpus.train.numel() / 1e6:.1f} MB train / "
                 f"{self.corpus.val.numel() / 1e6:.1f} MB validation"
                 + (f", resumed at step {self.step} from {cfg.resume_from}" if self.step else ""))
        last_losses = [r["loss"] for r in history][-LAST_LOSSES:]
        val = next(((r["step"], r["val_loss"]) for r in reversed(history) if "val_loss" in r),
                   None)
        while self.step < cfg.steps:
            start = time.perf_counter()
            x, y = self._local(self.corpus.train, cfg.seed, self.step, cfg.batch)
            self.backend.begin_step(self.step + 1)
            ce, loss = self.model(x, y)
            self.backend.step(loss)
            stats = torch.stack([ce.detach(), loss.detach()])
            dist.all_reduce(stats)
            stats /= self.world
            self.step += 1
            self.elapsed += time.perf_counter() - start
            ce_value = float(stats[0])
            last_losses = (last_losses + [ce_value])[-LAST_LOSSES:]
            record = {"step": self.step, "loss": ce_value, "lr": self.backend.last_lr(),
                      "tokens": self.step * self.tokens_per_step, "time": self.elapsed,
                      **self.backend.qk_stats(), **self.backend.diagnostics()}
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val = (self.step, self.evaluate())
                record["val_loss"] = val[1]
            metrics.write(record)
            bar.update(self.step, ce_value, val, self.step * self.tokens_per_step / self.elapsed)
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                self._save()
        bar.close()
        if self.rank == 0:
            self._report(metrics, last_losses, val)

    def _report(self, metrics: MetricsLog, last_losses: list[float],
                val: tuple[int, float] | None) -> None:
        cfg = self.cfg
        summary = {
            "optimizer": cfg.optimizer, "backend": cfg.backend, "world": self.world,
            "steps": self.step, "tokens": self.step * self.tokens_per_step,
            "wall_s": self.elapsed,
            "tokens_per_s": self.step * self.tokens_per_step / max(self.elapsed, 1e-9),
            "train_loss": sum(last_losses) / len(last_losses),
            "val_loss": val[1] if val else None, "lr": cfg.peak_lr, "seed": cfg.seed,
            "batch": cfg.batch, "seq": cfg.model.seq,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(summary_table([summary]), flush=True)
        records = metrics.read()
        plot_losses({cfg.optimizer: records}, self.out / "loss.png")
        plots = "loss.png" + (", diagnostics.png" if plot_diagnostics(
            records, self.out / "diagnostics.png") else "")
        print(f"metrics: {self.out / 'metrics.jsonl'}   plots: {plots} in {self.out}",
              flush=True)

    def _record_ranks(self) -> None:
        me = {"rank": self.rank, "host": socket.gethostname(),
              "node": os.environ.get("SLURMD_NODENAME", socket.gethostname())}
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, me)
        if self.rank == 0:
            (self.out / "ranks.json").write_text(json.dumps(
                {"world": self.world, "ranks": everyone}, indent=2))

    def _save(self) -> None:
        ckpt = self.out / "ckpt"
        if self.rank == 0:
            run_checkpoint.begin(ckpt, self.step)
        dist.barrier()
        tmp = ckpt / (run_checkpoint.folder_name(self.step) + ".tmp")
        self.backend.save(tmp, {"step": self.step, "elapsed": self.elapsed})
        dist.barrier()  # every rank has written its part
        if self.rank == 0:
            run_checkpoint.commit(tmp, {
                "step": self.step, "optimizer": self.cfg.optimizer,
                "backend": self.cfg.backend, "format": self.backend.checkpoint_format,
                "seed": self.cfg.seed, "world": self.world, "config": _plain(self.cfg)})
        dist.barrier()


def _plain(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))
