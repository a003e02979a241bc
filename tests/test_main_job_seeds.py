"""scripts/main_job_seeds.py: its argument parsing and summaries (no training)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "main_job_seeds.py"


@pytest.fixture(scope="module")
def seeds():
    if not SCRIPT.is_file():
        pytest.skip("tests copied without scripts/")
    spec = importlib.util.spec_from_file_location("main_job_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_is_a_name_and_shell_split_flags(seeds):
    assert seeds.parse_variant("whole=") == ("whole", [])
    assert seeds.parse_variant("per_head=--ns-dtype fp16 --per-head") == (
        "per_head", ["--ns-dtype", "fp16", "--per-head"])
    for bad in ("whole", "=--per-head", "a/b=--per-head"):
        with pytest.raises(argparse.ArgumentTypeError):
            seeds.parse_variant(bad)


def test_summaries_and_paired_differences(seeds, tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"val_loss": 1.5, "tokens_per_s": 100.0}))
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in ({"time": 1.0}, {"time": 2.0, "muon/all/ns_error": 0.4},
                                          {"time": 9.0}, {"time": 10.5, "muon/all/ns_error": 0.6})))
    assert seeds.summarize_run(tmp_path) == pytest.approx(
        {"val_loss": 1.5, "tokens_per_s": 100.0, "step_s_median": 1.5, "ns_error_mean": 0.5})

    def runs(*losses):
        return [{"seed": s, "val_loss": x, "tokens_per_s": 10.0 * (s + 1),
                 "step_s_median": 0.1 * (s + 1), "ns_error_mean": None}
                for s, x in enumerate(losses)]

    results = {"a": seeds.summarize_variant([], runs(1.0, 2.0, 3.0)),
               "b": seeds.summarize_variant(["--per-head"], runs(1.5, 2.0, 2.0))}
    assert results["a"]["val_loss_mean"] == 2.0 and results["a"]["val_loss_sd"] == 1.0
    assert results["a"]["ns_error_mean"] is None and results["a"]["tokens_per_s_mean"] == 20.0
    assert results["a"]["step_s_median"] == pytest.approx(0.2)
    diffs = seeds.paired_differences(results)
    assert list(diffs) == ["b"] and diffs["b"]["minus"] == "a"
    assert diffs["b"]["per_seed"] == pytest.approx([0.5, 0.0, -1.0])
    assert diffs["b"]["mean"] == pytest.approx(-1 / 6)
