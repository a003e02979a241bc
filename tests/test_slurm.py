"""Slurm: sbatch rendering, and real jobs on a Slurm cluster when one is reachable.

CI brings up a two-node cluster on its machine (scripts/slurm_local_cluster.sh); elsewhere
the job tests skip with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_muon.launch.local import free_port
from distributed_muon.launch.slurm import SlurmConfig, render


def _cluster_nodes() -> list[str]:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return []
    return sorted({line.split()[0] for line in out.stdout.splitlines()
                   if line.split()[1:] and line.split()[1] in ("idle", "mix", "alloc")})


NODES = _cluster_nodes()
needs_cluster = pytest.mark.skipif(
    len(NODES) < 2, reason="no Slurm cluster with 2 nodes reachable (sinfo); CI starts one "
    "with scripts/slurm_local_cluster.sh")


@pytest.mark.parametrize("style", ["torchrun", "srun", "deepspeed", "megatron"])
def test_rendered_scripts_are_valid_bash(style, tmp_path):
    text = render(SlurmConfig(nodes=3, gpus_per_node=4, style=style,
                              train_args=["--steps", "10", "--out", "/shared/a b"]))
    assert "#SBATCH --nodes=3" in text and "#SBATCH --gpus-per-node=4" in text
    assert "MASTER_ADDR=$(scontrol show hostnames" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    if style == "torchrun":
        assert "--nnodes=3 --nproc-per-node=4" in text and "--rdzv-backend=c10d" in text
        assert "#SBATCH --ntasks-per-node=1" in text
        assert "'/shared/a b'" in text  # train arguments are shell-quoted
    if style == "srun":
        assert "#SBATCH --ntasks-per-node=4" in text
    if style == "megatron":
        assert "--nnodes=3 --nproc-per-node=4" in text and "#SBATCH --ntasks-per-node=1" in text
        assert "train --backend megatron --device cuda --steps 10" in text
        assert "exit 1" not in text


def test_cli_renders_and_refuses_bad_input(tmp_path):
    out = tmp_path / "job.sbatch"
    subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "slurm", "--nodes", "2",
                    "--gpus-per-node", "8", "-o", str(out), "--", "--steps", "5"], check=True)
    assert "train --backend fsdp2 --steps 5" in out.read_text()
    bad = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "slurm",
                          "--gpus-per-node", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "torchrun needs" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "slurm",
                          "--backend", "megatron", "--gpus-per-node", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "GPU nodes only" in bad.stderr


def test_cli_creates_the_script_folder_and_accepts_slurm_times(tmp_path, capsys):
    from distributed_muon.launch.cli import main

    script = tmp_path / "new" / "dir" / "job.sbatch"
    for time_ in ("90", "2-00:00:00", "1-12", "00:30:00"):
        assert main(["slurm", "--time", time_, "-o", str(script), "--", "--batch", "32",
                     "--steps", "5"]) == 0, capsys.readouterr().err
        assert f"#SBATCH --time={time_}" in script.read_text()
    # CPU nodes under srun: 3 nodes x 2 ranks, so --batch 12 divides and 16 does not.
    cpu = ["slurm", "--nodes", "3", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--launcher", "srun", "--"]
    assert main([*cpu, "--batch", "12", "--device", "cpu"]) == 0
    assert main([*cpu, "--batch", "16"]) == 2
    assert "multiple of the 6 ranks" in capsys.readouterr().err


def _submit(tmp_path: Path, name: str, train_args: list[str], style: str = "srun") -> str:
    backend = ["--backend", "ddp"] if style == "srun" else []  # the deepspeed style sets it
    script = tmp_path / f"{name}.sbatch"
    script.write_text(render(SlurmConfig(
        nodes=2, gpus_per_node=0, tasks_per_node=1, style=style, job_name=name,
        port=free_port(), python=sys.executable, time="00:15:00",
        train_args=[*backend, "--device", "cpu", *train_args])))
    out = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", str(script)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def _wait(job: str, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
          timeout: float = 400) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _state(job)
        if state in until:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise TimeoutError(f"job {job} still {_state(job)} after {timeout} s")


def _log(tmp_path: Path, name: str, job: str) -> str:
    path = tmp_path / f"{name}-{job}.out"
    return path.read_text() if path.exists() else ""


@needs_cluster
@pytest.mark.timeout(900)
def test_sbatch_train_across_two_nodes(tmp_path):
    out = tmp_path / "run"
    job = _submit(tmp_path, "two-nodes", ["--steps", "16", "--eval-every", "8",
                                          "--out", str(out)])
    state = _wait(job)
    assert state == "COMPLETED", _log(tmp_path, "two-nodes", job)
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world"] == 2  # one process group ...
    assert {r["node"] for r in ranks["ranks"]} == set(NODES[:2])  # ... across both nodes
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 16 and records[-1]["loss"] < records[0]["loss"]


@needs_cluster
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("deepspeed_comm_op")
def test_sbatch_deepspeed_job_across_two_nodes(tmp_path):
    """The deepspeed style: one srun task per rank, a ZeRO-3 engine with DistributedMuon."""
    out = tmp_path / "run"
    job = _submit(tmp_path, "ds", ["--steps", "8", "--eval-every", "4", "--zero-stage", "3",
                                   "--out", str(out)], style="deepspeed")
    state = _wait(job)
    assert state == "COMPLETED", _log(tmp_path, "ds", job)
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["world"] == 2 and {r["node"] for r in ranks["ranks"]} == set(NODES[:2])
    assert "(deepspeed, cpu)" in _log(tmp_path, "ds", job)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records[-1]["loss"] < records[0]["loss"]


@needs_cluster
@pytest.mark.timeout(900)
def test_sbatch_cancel_then_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "24", "--save-every", "8", "--eval-every", "8", "--out", str(out)]
    job = _submit(tmp_path, "first", args)
    latest = out / "ckpt" / "latest"
    deadline = time.time() + 400
    while time.time() < deadline and not latest.exists():
        assert _state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path, "first", job)
        time.sleep(0.5)
    subprocess.run(["scancel", job], check=True)
    assert _wait(job) == "CANCELLED"
    saved = int(latest.read_text().strip().removeprefix("step_"))
    assert 8 <= saved < 24

    job2 = _submit(tmp_path, "resume", [*args, "--resume"])
    assert _wait(job2) == "COMPLETED", _log(tmp_path, "resume", job2)
    assert f"resumed at step {saved}" in _log(tmp_path, "resume", job2)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))


def test_multi_node_job_without_master_addr_is_refused(monkeypatch):
    from distributed_muon.launch.local import init_process_group_from_env

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for key, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        init_process_group_from_env("cpu")
