"""The pretrain_gpt.py harness of the GPU test and the curve script, checked without a GPU:
finding the Megatron-LM folder, the flags, the command, reading Megatron's log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_muon.launch import megatron_pretrain as mp

LOG = """\
 [2026-12-05 10:00:01] iteration        1/      40 | consumed samples:            8 | \
elapsed time per iteration (ms): 2150.1 | learning rate: 5.000000E-04 | global batch size:     8 \
| lm loss: 9.123456E+00 | loss scale: 1.0 | grad norm: 3.210 | number of skipped iterations:   0 |
 [2026-12-05 10:00:02] iteration        2/      40 | consumed samples:           16 | \
elapsed time per iteration (ms): 95.3 | learning rate: 1.000000E-03 | global batch size:     8 \
| lm loss: 8.957163E+00 | loss scale: 1.0 | grad norm: 2.990 |
 validation loss at iteration 2 | lm loss value: 8.9 |
"""


def _folder(root: Path, skip: str | None = None) -> Path:
    for name in mp.NEEDED:
        if name != skip:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("")
    return root


def test_find_megatron_lm(tmp_path):
    assert mp.find_megatron_lm({}) is None
    folder = _folder(tmp_path / "mlm")
    assert mp.find_megatron_lm({mp.ENV: str(folder)}) == folder
    broken = _folder(tmp_path / "broken", skip="gpt_builders.py")
    with pytest.raises(ValueError, match="lacks gpt_builders.py: point it to a folder"):
        mp.find_megatron_lm({mp.ENV: str(broken)})


def test_losses_from_megatron_log():
    assert mp.losses(LOG) == {1: 9.123456, 2: 8.957163}


def test_flags_and_command(tmp_path):
    args = mp.pretrain_args("dmuon", 10, save=tmp_path / "c", save_interval=5,
                            exit_interval=5, load=tmp_path / "c")
    flags = dict(zip(args, [*args[1:], None], strict=True))
    assert flags["--optimizer"] == "dmuon" and flags["--train-iters"] == "10"
    assert flags["--save"] == flags["--load"] == str(tmp_path / "c")
    assert flags["--save-interval"] == flags["--exit-interval"] == "5"
    assert flags["--transformer-impl"] == "local"
    for flag in ("--mock-data", "--bf16", "--use-distributed-optimizer", "--no-persist-layer-norm",
                 "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
                 "--no-bias-gelu-fusion", "--no-gradient-accumulation-fusion"):
        assert flag in args
    cmd = mp.command(tmp_path, args, python="python3")
    assert cmd[:8] == ["python3", "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", "1", "-m", "distributed_muon.launch.megatron_run"]
    assert cmd[8] == str(tmp_path / "pretrain_gpt.py") and cmd[9:] == args


def test_run_reads_the_losses_and_reports_a_failure(tmp_path, monkeypatch):
    """`run` with a stand-in pretrain_gpt.py under torchrun (gloo-free: the script prints a
    log), as the GPU test runs the real one."""
    folder = _folder(tmp_path / "mlm")
    (folder / "pretrain_gpt.py").write_text(
        "import sys\nprint(open(sys.argv[1]).read())\nsys.exit(int(sys.argv[2]))\n")
    (tmp_path / "log.txt").write_text(LOG)
    monkeypatch.setattr(mp, "command", lambda f, a, python=sys.executable: [
        python, "-m", "distributed_muon.launch.megatron_run", str(f / "pretrain_gpt.py"), *a])
    got = mp.run(folder, [str(tmp_path / "log.txt"), "0"], log=tmp_path / "out.log")
    assert got == {1: 9.123456, 2: 8.957163}
    with pytest.raises(RuntimeError, match="exited 3"):
        mp.run(folder, [str(tmp_path / "log.txt"), "3"], log=tmp_path / "bad.log")


def test_curve_script_needs_the_folder(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "megatron_curve.py"
    if not script.is_file():
        pytest.skip("tests copied without scripts/")
    env = {k: v for k, v in os.environ.items() if k != mp.ENV}
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "set $MEGATRON_LM" in done.stderr
