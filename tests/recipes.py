"""The recipes of docs/trainers.md, taken from the page and run as written.

A recipe is a fenced block right after ``<!-- recipe: NAME -->``; `write_recipe` puts it in a
folder as NAME (optionally with literal replacements, each of which must match), and `launch`
runs a script there under torchrun (or plain python, for launchers that start their own ranks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from distributed_muon.launch.local import free_port

DOC = Path(__file__).resolve().parents[1] / "docs" / "trainers.md"
_BLOCK = re.compile(r"<!-- recipe: (\S+) -->\n```\w*\n(.*?)```", re.S)


def recipe(name: str) -> str:
    blocks = dict(_BLOCK.findall(DOC.read_text()))
    assert name in blocks, f"docs/trainers.md has no recipe {name!r} (has {sorted(blocks)})"
    return blocks[name]


# Appended to recipes whose trainer keeps a gloo group alive to the interpreter's teardown: there
# a gloo worker thread that frees a finished all_gather's tensors needs the GIL, and Python ends
# the thread, which aborts the rank (SIGABRT after a finished run; torch 2.13; the HF Trainer with
# its own AdamW: 2 of 18 runs). docs/trainers.md, Troubleshooting, says so.
HARD_EXIT = ("\nimport os as _os\nimport sys as _sys\n_sys.stdout.flush()\n_sys.stderr.flush()\n"
             "_os._exit(0)\n")


def write_recipe(folder: Path, name: str, replace: dict[str, str] | None = None,
                 append: str = "") -> Path:
    text = recipe(name)
    for old, new in (replace or {}).items():
        assert old in text, f"recipe {name} no longer contains {old!r}"
        text = text.replace(old, new)
    text += append
    path = folder / name
    path.write_text(text)
    return path


def launch(folder: Path, script: str, *args: str, nproc: int | None = 2,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC script args`` in ``folder`` (``nproc=None``: python),
    offline; fails the test with the output's tail unless it exits 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if nproc is None:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                  + proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc
