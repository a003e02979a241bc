"""A run folder holds one run: a new run moves an earlier one aside whole, never over it."""

from __future__ import annotations

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
