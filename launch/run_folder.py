"""One run per ``--out`` folder: a new run never mixes with, overwrites or deletes another.

A new run (no ``--resume``) into a folder that holds a checkpoint is refused: the user most
likely meant ``--resume``, and a later ``--resume`` would otherwise continue the old run's
checkpoint with the new run's metrics. Without a checkpoint, the earlier run's files move
into ``<out>/previous-run-N/`` (the next free N), whole, so every plot and log in ``<out>``
belongs to the run that wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Everything `dmuon train` writes into --out (``metrics.previous.jsonl``: the name an older
# dmuon kept the last run's log under).
RUN_FILES = ("metrics.jsonl", "metrics.superseded.jsonl", "metrics.previous.jsonl",
             "summary.json", "ranks.json", "loss.png", "diagnostics.png", "error.txt", "ckpt")
PREVIOUS = "previous-run-"


def has_checkpoint(out: Path) -> bool:
    """True when ``out/ckpt`` holds a sealed checkpoint (``*.tmp`` folders are unfinished)."""
    ckpt = out / "ckpt"
    return (ckpt / "latest").exists() or any(
        p.is_dir() and not p.name.endswith(".tmp") for p in ckpt.glob("step_*"))


def check_new_run(out: Path) -> None:
    """Refuse a new run into a folder with a checkpoint (ValueError, one line)."""
    if has_checkpoint(out):
        raise ValueError(f"--out {out} holds a checkpoint of an earlier run ({out / 'ckpt'}): "
                         "use --resume or a new --out")


def move_previous_run(out: Path) -> Path | None:
    """Move the files of an earlier run in ``out`` into ``out/previous-run-N``; returns that
    folder, or None when there was nothing to move."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return None
    n = 1
    while (out / f"{PREVIOUS}{n}").exists():
        n += 1
    target = out / f"{PREVIOUS}{n}"
    target.mkdir()
    for path in found:
        os.replace(path, target / path.name)
    return target


def interrupted_note(out: Path) -> str:
    """What a Ctrl-C of a run into ``out`` leaves, and how to continue it, in one line."""
    from distributed_muon.launch.metrics_log import read_metrics

    try:
        records = read_metrics(out / "metrics.jsonl", warn=lambda _: None)
    except ValueError:
        records = []
    where = f"interrupted at step {records[-1]['step']}" if records else \
        "interrupted before the first step"
    latest = out / "ckpt" / "latest"
    if not latest.exists():
        return f"{where}; no checkpoint to resume from (save with --save-every N)"
    step = int(latest.read_text().strip().removeprefix("step_"))
    return (f"{where}; last checkpoint step {step}; continue with "
            f"`dmuon train --out {out} --resume`")
