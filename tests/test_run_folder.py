"""A run folder holds one run: a new run moves an earlier one aside whole, never over it;
its metrics.jsonl is read by one reader that tolerates a cut-off last line."""

from __future__ import annotations

import json

import pytest
from distributed_muon.launch import run_checkpoint
from distributed_muon.launch.cli import main
from distributed_muon.launch.train_config import TrainConfig, prepare


def _earlier_run(out, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "diagnostics.png", "loss.png"):
        (out / name).write_text(f"{tag} {name}")


def test_a_new_run_moves_each_earlier_run_aside_under_its_own_number(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    _earlier_run(out, "first")
    (out / "metrics.previous.jsonl").write_text("zeroth")  # what an older dmuon kept
    _, notes = prepare(TrainConfig(out=str(out), steps=5))
    assert notes == [f"an earlier run's files in {out} moved to {out / 'previous-run-1'}"]
    # Nothing stale is left for the new run to be confused with (a short run that logs no
    # diagnostics must not show the earlier run's diagnostics.png).
    assert not any((out / n).exists() for n in ("metrics.jsonl", "diagnostics.png",
                                                "metrics.previous.jsonl"))
    _earlier_run(out, "second")
    prepare(TrainConfig(out=str(out), steps=5))
    first, second = out / "previous-run-1", out / "previous-run-2"
    assert (first / "metrics.jsonl").read_text() == "first metrics.jsonl"
    assert (first / "metrics.previous.jsonl").read_text() == "zeroth"  # not clobbered
    assert (second / "metrics.jsonl").read_text() == "second metrics.jsonl"
    assert (second / "diagnostics.png").read_text() == "second diagnostics.png"


# ------------------------------------------------ metrics.jsonl: one tolerant reader


def _run_with_metrics(folder, tail: str = "") -> None:
    """A finished run's folder whose metrics.jsonl ends with ``tail`` (a damaged line)."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"lr": 0.02, "batch": 16, "seq": 64}))
    records = [{"step": s, "loss": 3.0 - 0.01 * s} for s in range(1, 41)]
    for r in records[9::10]:
        r.update({"noise/model/grad_sq_step": 1.0, "noise/model/trace_cov_step": 32.0,
                  "noise/model/b_simple": 32.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


CUT_OFF = '{"step": 41, "loss": 2.5, "noise/model/grad_sq_st'  # a kill during the write


def test_a_cut_off_last_line_is_dropped_with_a_warning_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_metrics(run, CUT_OFF)
    assert main(["lr", str(run), "--batch", "32"]) == 0
    out, err = capsys.readouterr()
    assert "B_simple (model) = 32 sequences" in out
    assert err.strip() == (f"warning: {run / 'metrics.jsonl'} line 41 is cut off (a write "
                           "interrupted by a kill); ignoring it")
    assert main(["plot", str(run)]) == 0
    assert "line 41 is cut off" in capsys.readouterr().err
    assert (run / "loss.png").stat().st_size > 10_000


def test_a_damaged_middle_line_is_an_error_naming_file_and_line(tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_metrics(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[4] = lines[4][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for argv in (["lr", str(run), "--batch", "32"], ["plot", str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"{run / 'metrics.jsonl'} line 5 is not a JSON record" in err, err
        assert "\n" not in err and "Traceback" not in err


def test_resume_reads_metrics_before_any_rank_starts(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "run"
    _run_with_metrics(out, CUT_OFF)
    tmp = run_checkpoint.begin(out / "ckpt", 40)
    (tmp / "__0_0.distcp").write_bytes(b"x")
    run_checkpoint.commit(tmp, {"step": 40, "optimizer": "muon", "seed": 0, "backend": "fsdp2",
                                "format": "dcp", "world": 2})
    _, notes = prepare(TrainConfig(out=str(out), steps=50, resume=True))
    assert notes == [f"warning: {out / 'metrics.jsonl'} line 41 is cut off (a write "
                     "interrupted by a kill); ignoring it"]
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text.replace('"step": 3,', '"step": 3,,'))
    with pytest.raises(ValueError, match=r"metrics.jsonl line 3 is not a JSON record"):
        prepare(TrainConfig(out=str(out), steps=50, resume=True))


def test_compare_refuses_before_training_either_optimizer(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "cmp"
    tmp = run_checkpoint.begin(out / "adamw" / "ckpt", 2)
    (tmp / "__0_0.distcp").write_bytes(b"x")
    run_checkpoint.commit(tmp, {"step": 2, "optimizer": "adamw", "seed": 0, "backend": "fsdp2",
                                "format": "dcp", "world": 2})
    assert main(["train", "--compare", "--steps", "2", "--out", str(out)]) == 2
    assert "adamw holds a checkpoint" in capsys.readouterr().err
    assert not (out / "muon").exists()  # muon did not train first, only to be refused later
