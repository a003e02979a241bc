"""``metrics.jsonl``: one JSON object per step, appended as `dmuon train` goes, and the one
reader that resume, `dmuon lr` and `dmuon plot` share.

A kill during a write leaves the last line cut off: the reader drops it with a warning that
names the file and line. A bad line anywhere else is damage the user must see: an error that
names it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def read_metrics(path: Path, warn: Callable[[str], None] = _stderr) -> list[dict]:
    """The records of ``path`` ([] when it does not exist). A cut-off last line is dropped
    with ``warn``; a bad line before it raises ValueError naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if k == len(numbered) - 1:
                warn(f"warning: {path} line {i} is cut off (a write interrupted by a kill); "
                     "ignoring it")
                break
            raise ValueError(f"{path} line {i} is not a JSON record ({err}): repair or "
                             "delete that line") from None
        records.append(record)
    return records


class MetricsLog:
    """``metrics.jsonl`` of one run; only the ``writer`` (rank 0) changes the file."""

    def __init__(self, path: Path, writer: bool) -> None:
        self.path, self.writer = path, writer

    def read(self, warn: Callable[[str], None] = _stderr) -> list[dict]:
        return read_metrics(self.path, warn)

    def start_fresh(self) -> None:
        """A new run: an empty log (`run_folder` moved an earlier run's log aside first)."""
        if self.writer:
            self.path.write_text("")

    def resume_at(self, step: int) -> list[dict]:
        """Keep the records up to ``step`` (the checkpoint's); those past it are redone by the
        resumed run and move to ``metrics.superseded.jsonl``. Returns the kept records.
        (`prepare` read the file before the ranks started and warned about a cut-off line.)"""
        records = self.read(warn=lambda _: None)
        keep = [r for r in records if r["step"] <= step]
        if self.writer:
            dropped = [r for r in records if r["step"] > step]
            if dropped:
                with self.path.with_suffix(".superseded.jsonl").open("a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in dropped))
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        return keep

    def write(self, record: dict) -> None:
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
