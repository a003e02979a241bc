"""Every bad input a user has hit gets one short line naming the fix and a non-zero exit.

Add the next one as one row of `BAD_INPUTS`. These run in-process (the checks run before any
rank starts); `test_train.py` covers failures inside ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from distributed_muon.launch import run_checkpoint
from distributed_muon.launch.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for CPU machines")


def _checkpoint(out: Path, step: int = 8, optimizer: str = "muon", seed: int = 0) -> Path:
    """A sealed checkpoint folder as `dmuon train` writes it (one small file)."""
    tmp = run_checkpoint.begin(out / "ckpt", step)
    (tmp / "__0_0.distcp").write_bytes(os.urandom(256))
    return run_checkpoint.commit(tmp, {"step": step, "optimizer": optimizer, "seed": seed,
                                       "backend": "fsdp2", "format": "dcp", "world": 2,
                                       "config": {"batch": 16}})


def _corrupt(out: Path) -> None:
    folder = _checkpoint(out)
    (folder / "__0_0.distcp").write_bytes(os.urandom(256))  # same size, other bytes


# (argv with {tmp} for a fresh folder, setup(tmp) or None, exit code, text the error must hold)
BAD_INPUTS = [
    (["train", "--batch", "15"], None, 2, "--batch 15 must be a multiple of the 2 ranks"),
    (["train", "--lr", "-1"], None, 2, "--lr -1.0: must be a positive number"),
    pytest.param(["train", "--device", "cuda"], None, 2, "--device cuda", marks=NO_CUDA),
    (["train", "--steps", "0"], None, 2, "--steps 0"),
    (["train", "--steps", "-3"], None, 2, "--steps -3"),
    (["train", "--batch", "0"], None, 2, "--batch 0"),
    (["train", "--nproc", "0"], None, 2, "--nproc 0"),
    (["train", "--eval-every", "0"], None, 2, "--eval-every 0"),
    (["train", "--zero-stage", "2"], None, 2, "--backend deepspeed only"),
    (["train", "--backend", "megatron", "--device", "cpu"], None, 2, "runs on GPUs only"),
    (["train", "--optimizer", "sgd"], None, 2, "--optimizer"),
    (["train", "--compare", "--lr", "0.1"], None, 2, "drop --lr"),
    (["train", "--qk-clip", "0"], None, 2, "--qk-clip 0.0: must be a positive number"),
    (["train", "--qk-clip", "30", "--optimizer", "adamw"], None, 2,
     "drop --qk-clip or use --optimizer muon"),
    (["train", "--qk-clip", "30", "--compare"], None, 2, "drop --compare or --qk-clip"),
    (["train", "--per-head", "--optimizer", "adamw"], None, 2,
     "--per-head is an option of --optimizer muon"),
    (["train", "--per-head", "--compare"], None, 2, "drop --per-head, or train muon alone"),
    (["train", "--step", "3"], None, 2, "unrecognized arguments: --step 3"),  # no prefixes
    (["train", "--resume"], None, 2, "no checkpoint"),
    (["train", "--out", "{tmp}/run"], lambda run: run.write_text("x"), 2, "is a file"),
    (["train", "--out", "/proc/dmuon-cannot-write"], None, 2, "cannot write there"),
    (["train", "--resume", "--steps", "4"], _checkpoint, 2, "pass --steps above 8"),
    (["train", "--resume", "--steps", "8"], _checkpoint, 2, "pass --steps above 8"),
    (["train", "--resume", "--steps", "20", "--optimizer", "adamw"], _checkpoint, 2,
     "written by --optimizer muon"),
    (["train", "--resume", "--steps", "20", "--seed", "3"], _checkpoint, 2, "--seed 0"),
    (["train", "--resume", "--steps", "20"], _corrupt, 2, "does not match its checksum"),
    # Another batch size is another data order: the resumed run would not continue this one.
    (["train", "--resume", "--steps", "20", "--batch", "32"], _checkpoint, 2,
     "was trained with --batch 16, not 32"),
    # A new run into a folder with a checkpoint would let a later --resume mix two runs.
    (["train", "--steps", "5"], _checkpoint, 2, "use --resume or a new --out"),
    (["bench", "--nproc", "0"], None, 2, "--nproc 0"),
    (["bench", "--steps", "0"], None, 2, "--steps >= 1"),
    (["bench", "--shapes", "12x"], None, 2, "--shapes"),
    (["bench", "--exchange-chunks", "0"], None, 2, "--exchange-chunks 0"),
    (["demo", "--steps", "-5"], None, 2, "--steps -5"),
    (["slurm", "--nodes", "0"], None, 2, "--nodes"),
    # `dmuon slurm` checks the train flags after -- as `dmuon train` does, on the job's ranks.
    (["slurm", "--", "--stpes", "5"], None, 2, "after --: unrecognized arguments: --stpes 5"),
    (["slurm", "--nodes", "2", "--gpus-per-node", "8", "--", "--batch", "15"], None, 2,
     "after --: --batch 15 must be a multiple of the 16 ranks"),
    (["slurm", "--", "--lr", "-1"], None, 2, "after --: --lr -1.0: must be a positive number"),
    (["slurm", "--", "--backend", "ddp"], None, 2, "--backend after --"),
    (["slurm", "--time", "banana"], None, 2, "--time banana: use Slurm's format"),
    (["slurm", "--port", "99999"], None, 2, "--port 99999: use a TCP port"),
    (["slurm", "-o", "{tmp}"], None, 2, "is a folder; name the script"),
    (["ckpt", "{tmp}", "{tmp}"], None, 2, "exists; choose a new folder"),
    (["plan", "--model", "bench-16x2048", "--gpus", "0"], None, 2, "--gpus 0: must be at least"),
]


@pytest.mark.parametrize("argv,setup,code,text", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys, argv, setup, code,
                                              text):
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    if setup is not None:
        setup(tmp_path / "run")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's own errors (unknown choice): usage + one line
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code, err
    assert text in err, err
    assert len(err.strip().splitlines()) <= 3, err
    assert "Traceback" not in err


def test_resume_skips_a_corrupt_latest_checkpoint_for_the_previous_good_one(tmp_path):
    from distributed_muon.launch.train_config import TrainConfig, prepare

    out = tmp_path / "run"
    good = _checkpoint(out, step=4)
    bad = _checkpoint(out, step=8)
    (bad / "__0_0.distcp").write_bytes(b"")
    assert (out / "ckpt" / "latest").read_text() == bad.name
    cfg, notes = prepare(TrainConfig(out=str(out), resume=True, steps=20))
    assert cfg.resume_from == str(good)
    assert "step_0000008" in notes[0] and "bytes" in notes[0]
    assert "previous good checkpoint step_0000004" in notes[-1]


def test_a_checkpoint_without_manifest_is_incomplete(tmp_path):
    folder = tmp_path / "ckpt" / "step_0000004"
    folder.mkdir(parents=True)
    with pytest.raises(run_checkpoint.BadCheckpoint, match="not completely written"):
        run_checkpoint.verify(folder)
    sealed = _checkpoint(tmp_path, step=6)
    assert run_checkpoint.verify(sealed)["step"] == 6
    assert json.loads((sealed / "manifest.json").read_text())["files"]["__0_0.distcp"][
        "bytes"] == 256


def test_a_failed_rank_is_one_line_and_its_traceback_a_file(tmp_path, monkeypatch, capsys):
    from distributed_muon.launch import train
    from distributed_muon.launch.local import RankFailed

    def fail(cfg):
        raise RankFailed(1, "RuntimeError: NCCL timeout", "Traceback (most recent call last):\n")

    monkeypatch.setattr(train, "main", fail)
    assert main(["train", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dmuon train: rank 1: RuntimeError: NCCL timeout",
                   f"dmuon train: traceback in {tmp_path / 'error.txt'}"]
    assert (tmp_path / "error.txt").read_text().startswith("Traceback")
