"""Documented examples run as written, and the pages that state the project's status agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_muon.launch.local import free_port

ROOT = Path(__file__).resolve().parent.parent


def _block(page: str, lang: str, after: str = "") -> str:
    """The first ```lang block of ``page`` after the line ``after``."""
    lines = (ROOT / page).read_text().splitlines()
    start = lines.index(after) if after else 0
    first = lines.index(f"```{lang}", start) + 1
    return "\n".join(lines[first:lines.index("```", first)]) + "\n"


def test_one_status_line_for_readme_index_and_megatron():
    status = [next(line for line in (ROOT / page).read_text().splitlines()
                   if line.startswith("**Status")) for page in
              ("README.md", "docs/index.md", "docs/megatron.md")]
    assert status[0] == status[1] == status[2]


def test_index_quick_start_runs_as_written(tmp_path):
    script = tmp_path / "quick_start.py"
    script.write_text(_block("docs/index.md", "python", "## Quick start"))
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("deepspeed_comm_op")
def test_deepspeed_example_runs_as_written(tmp_path):
    pytest.importorskip("deepspeed")
    (tmp_path / "train.py").write_text(_block("docs/deepspeed.md", "python"))
    config = _block("docs/deepspeed.md", "json")
    assert json.loads(config)["optimizer"]["type"] == "DistributedMuon"
    (tmp_path / "ds_config.json").write_text(config)
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                           "train.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "20 optimizer steps on 2 ranks" in proc.stdout
