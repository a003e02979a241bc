"""`dmuon megatron SCRIPT ARGS...`: a script runs unchanged, with dmuon registered.

The scripts here stand in for Megatron-LM's pretrain_gpt.py (which needs GPUs and megatron-core
>= 0.19: tests/test_gpu_pretrain_gpt.py runs the real one). One of them brings its own
``megatron/training/arguments.py`` next to it, as a Megatron-LM checkout does, so the test sees
that the script's folder comes first on ``sys.path`` and that the parser it finds is patched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

SCRIPT = """
import json, sys
import megatron.core.optimizer as core_optimizer
import sibling  # a module next to the script, as gpt_builders.py is next to pretrain_gpt.py
from megatron.core.datasets import utils

json.dump({"name": __name__, "argv": sys.argv, "sibling": sibling.VALUE,
           "patched": getattr(core_optimizer.get_megatron_optimizer, "dmuon", False),
           "helpers_build_skipped": utils.compile_helpers.__module__ != utils.__name__},
          open(sys.argv[1], "w"))
"""

# A stand-in for Megatron-LM's megatron/training/arguments.py: the same three functions the
# adapter patches, and a parse that validates (as parse_and_validate_args does).
ARGUMENTS = """
import argparse

def add_megatron_arguments(parser):
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "muon"])
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    return parser

def validate_args(args, defaults={}):
    # Megatron turns any optimizer but adam/sgd into its layer-wise one.
    args.layer_wise = args.use_distributed_optimizer and args.optimizer not in ("adam", "sgd")

def parse_and_validate_args(argv=None):
    parser = add_megatron_arguments(argparse.ArgumentParser())
    args = parser.parse_args(argv)
    validate_args(args)
    return args
"""

PARSING = """
import json, sys
from megatron.training.arguments import parse_and_validate_args

args = parse_and_validate_args(sys.argv[2:])
json.dump({"optimizer": args.optimizer, "ns_method": args.dmuon_ns_method,
           "layer_wise": args.layer_wise}, open(sys.argv[1], "w"))
"""


def _dmuon(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "megatron", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_script_runs_as_main_with_its_arguments_and_dmuon_registered(tmp_path):
    folder = tmp_path / "megatron_lm"
    folder.mkdir()
    (folder / "train.py").write_text(textwrap.dedent(SCRIPT))
    (folder / "sibling.py").write_text("VALUE = 42\n")
    out = tmp_path / "seen.json"
    # Run from elsewhere: the script's folder must be found from its path, as python does.
    done = _dmuon(str(folder / "train.py"), str(out), "--optimizer", "dmuon", "--x", "a b",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["name"] == "__main__"
    assert seen["argv"] == [str(folder / "train.py"), str(out), "--optimizer", "dmuon",
                            "--x", "a b"]
    assert seen["sibling"] == 42 and seen["patched"] is True
    # megatron-core wheels ship the dataset helpers built but no Makefile to "build" them.
    assert seen["helpers_build_skipped"] is True


def test_the_scripts_own_megatron_training_gets_the_dmuon_flags(tmp_path):
    training = tmp_path / "megatron" / "training"
    training.mkdir(parents=True)
    (training / "__init__.py").write_text("")
    (training / "arguments.py").write_text(textwrap.dedent(ARGUMENTS))
    (tmp_path / "pretrain.py").write_text(textwrap.dedent(PARSING))
    out = tmp_path / "args.json"
    done = _dmuon("pretrain.py", str(out), "--optimizer", "dmuon", "--use-distributed-optimizer",
                  "--dmuon-ns-method", "gram", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # dmuon is a choice, its flags parse, and validation keeps the flat distributed optimizer.
    assert json.loads(out.read_text()) == {"optimizer": "dmuon", "ns_method": "gram",
                                           "layer_wise": False}


def test_a_missing_script_is_one_clear_line(tmp_path):
    done = _dmuon("no_such_pretrain_gpt.py", "--optimizer", "dmuon", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("dmuon megatron: no_such_pretrain_gpt.py does not exist: name "
                                   "the Megatron-LM training script to run, e.g. pretrain_gpt.py "
                                   "in a Megatron-LM checkout")
    done = _dmuon(str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "is a folder" in done.stderr


def test_the_scripts_own_error_keeps_its_traceback(tmp_path):
    (tmp_path / "bad.py").write_text("def build():\n    raise ValueError('bad model config')\n"
                                     "build()\n")
    done = _dmuon("bad.py", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "in build" in done.stderr
    assert "ValueError: bad model config" in done.stderr


def test_module_entry_for_torchrun(tmp_path):
    (tmp_path / "t.py").write_text("import sys\nprint('ARGS', sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-m", "distributed_muon.launch.megatron_run", "t.py",
                           "--lr", "1e-3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ARGS ['--lr', '1e-3']" in done.stdout


def test_slurm_renders_the_script_through_the_runner(tmp_path):
    job = tmp_path / "job.sbatch"
    done = subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "slurm",
                           "--backend", "megatron", "--nodes", "2", "--script",
                           "/ckpt/Megatron-LM/pretrain_gpt.py", "-o", str(job), "--",
                           "--optimizer", "dmuon", "--num-layers", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = job.read_text()
    assert ("-m distributed_muon.launch.megatron_run /ckpt/Megatron-LM/pretrain_gpt.py "
            "--optimizer dmuon --num-layers 4") in text
    assert "launch.cli train" not in text
