"""`dmuon train` end to end on CPU ranks: outputs, errors, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "distributed_muon.launch.cli", "train"]


def train(out: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, "--out", str(out), "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    proc = train(out, "--steps", "12", "--eval-every", "6", "--backend", "ddp")
    assert "train loss" in proc.stdout and "val loss" in proc.stdout  # the final table
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 16 * 64 and summary["world"] == 2
    assert (out / "loss.png").stat().st_size > 10_000
    assert json.loads((out / "ranks.json").read_text())["world"] == 2


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_qk_clip_logs_clipped_heads_and_bounds_the_max_logit(tmp_path, backend, request):
    if backend == "deepspeed":
        request.getfixturevalue("deepspeed_comm_op")
    out = tmp_path / "run"
    train(out, "--steps", "4", "--eval-every", "4", "--qk-clip", "1.0", "--backend", backend)
    records = metrics(out)
    # 4 layers x 4 heads; the initial logits are above 1.0 in some heads, so some are clipped.
    assert all(0 <= r["qk_clipped"] <= 16 and r["max_logit"] > 0 for r in records)
    assert records[0]["qk_clipped"] > 0
    # The max logit is reported before the clip: once clipped it stays near tau.
    assert records[-1]["max_logit"] < records[0]["max_logit"]


def test_save_every_also_saves_the_last_step(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "5", "--save-every", "3", "--eval-every", "5", "--backend", "ddp")
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000003", "step_0000005"]
    assert (ckpt / "latest").read_text() == "step_0000005"
    assert json.loads((ckpt / "step_0000005" / "manifest.json").read_text())["step"] == 5


def _rank_pids(parent: int) -> list[int]:
    """Child processes of ``parent`` that are training ranks (not multiprocessing helpers)."""
    pids = []
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmd:
            pids.append(int(child))
    return pids


@pytest.mark.timeout(900)
def test_kill_one_rank_and_resume_continues_the_same_curve(tmp_path):
    steps = ["--steps", "32", "--save-every", "8", "--eval-every", "8"]
    reference = tmp_path / "straight"
    train(reference, *steps)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, "--out", str(out), "--device", "cpu", *steps],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "ckpt" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_0000016":
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(_rank_pids(proc.pid)[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == "dmuon train: rank 1: the process was killed by SIGKILL"
    # A checkpoint interrupted while writing would be a leftover *.tmp; `latest` never names one.
    assert not latest.read_text().strip().endswith(".tmp")

    resumed = train(out, *steps, "--resume")
    assert "resumed at step" in resumed.stdout
    # The summary's "mean of the last 20 steps" spans the restart like the straight run's.
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, reference)]
    assert summaries[0]["train_loss"] == pytest.approx(summaries[1]["train_loss"], abs=1e-6)
    got, want = metrics(out), metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 33))  # nothing skipped or repeated
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-6)


def test_compare_plots_both(tmp_path):
    out = tmp_path / "cmp"
    proc = train(out, "--steps", "6", "--eval-every", "3", "--compare")
    assert "muon" in proc.stdout and "adamw" in proc.stdout
    assert (out / "compare.png").stat().st_size > 10_000
    for name in ("muon", "adamw"):
        assert json.loads((out / name / "summary.json").read_text())["steps"] == 6


@pytest.mark.usefixtures("deepspeed_comm_op")
def test_deepspeed_backend_matches_fsdp2_and_resumes(tmp_path):
    """`--backend deepspeed` (ZeRO-3, "type": "DistributedMuon") trains like FSDP2 on the same
    data, and a resume from its own DeepSpeed checkpoint repeats the steps exactly."""
    ds, fsdp = tmp_path / "ds", tmp_path / "fsdp"
    flags = ("--steps", "8", "--eval-every", "4")
    train(ds, *flags, "--backend", "deepspeed", "--zero-stage", "3", "--save-every", "4")
    uninterrupted = metrics(ds)
    assert (ds / "ckpt" / "latest").read_text().strip() == "step_0000008"
    # As if the run had stopped after step 4: its final checkpoint is cut short.
    (next((ds / "ckpt" / "step_0000008").rglob("*optim_states.pt"))).write_bytes(b"")
    proc = train(ds, *flags, "--backend", "deepspeed", "--zero-stage", "3", "--resume")
    assert "skipping a bad checkpoint" in proc.stdout
    assert "resumed at step 4" in proc.stdout
    assert metrics(ds) == [{**r, "time": m["time"]} for r, m in zip(uninterrupted, metrics(ds))]
    train(fsdp, *flags, "--backend", "fsdp2")
    for a, b in zip(uninterrupted, metrics(fsdp), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(b["loss"]), (a, b)


def test_ctrl_c_is_one_line_with_the_step_to_resume_from(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it."""
    from distributed_muon.launch import run_checkpoint
    from distributed_muon.launch.metrics_log import read_metrics

    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "--out", str(out), "--device", "cpu", "--backend", "ddp",
                             "--steps", "400", "--save-every", "3", "--eval-batches", "1",
                             "--diagnostics-every", "0"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "ckpt" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    ranks = _rank_pids(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    step = read_metrics(out / "metrics.jsonl")[-1]["step"]  # a kill may cut the last line
    saved = run_checkpoint.verify(out / "ckpt" / latest.read_text().strip())["step"]
    assert err.strip() == (f"dmuon train: interrupted at step {step}; last checkpoint step "
                           f"{saved}; continue with `dmuon train --out {out} --resume`")
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks)  # no rank left behind


@pytest.mark.usefixtures("deepspeed_comm_op")
def test_per_head_trains_alike_on_fsdp2_and_deepspeed(tmp_path):
    """`--per-head` reaches the optimizer through both routes (FSDP2: muon_param_groups;
    DeepSpeed ZeRO-2: "per_head_muon" in the JSON): the same curve on both, another curve
    than without it."""
    flags = ("--steps", "4", "--eval-every", "4")
    train(tmp_path / "fsdp", *flags, "--per-head")
    train(tmp_path / "ds", *flags, "--per-head", "--backend", "deepspeed")
    train(tmp_path / "whole", *flags)
    per_head = [r["loss"] for r in metrics(tmp_path / "fsdp")]
    assert [r["loss"] for r in metrics(tmp_path / "ds")] == pytest.approx(per_head, rel=1e-5)
    whole = [r["loss"] for r in metrics(tmp_path / "whole")]
    assert whole[0] == pytest.approx(per_head[0])  # same start; the updates differ
    assert all(abs(a - b) > 1e-4 for a, b in zip(whole[1:], per_head[1:], strict=True))
