"""`dmuon bench` runs end to end on CPU ranks and reports consistent numbers (not timings)."""

import json
import subprocess
import sys

import pytest
from distributed_muon.launch.bench import parse_shapes


def test_bench_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "distributed_muon.launch.cli", "bench", "--shapes",
           "96x64,64x160,3x32x32", "--layers", "2", "--nproc", "2", "--steps", "2",
           "--warmup", "1", "--ns-dtype", "fp32", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "NS imbalance" in proc.stdout and "to_owners ms" in proc.stdout
    report = json.loads(out.read_text())
    assert report["world"] == 2 and len(report["ranks"]) == 2
    assert report["planned_imbalance"] >= 1.0 and report["measured_imbalance"] >= 1.0
    # FSDP2 shards every 2-D matrix across both ranks: bytes flow both ways on each rank.
    assert all(r["sent"] > 0 and r["recv"] > 0 for r in report["ranks"])
    assert sum(r["ns_flops"] for r in report["ranks"]) > 0


def test_shape_parsing():
    assert parse_shapes("6144x2048,4x512x256") == [(6144, 2048), (4, 512, 256)]
    for bad in ("", "12", "3x", "axb", "0x4"):
        with pytest.raises(ValueError, match="--shapes"):
            parse_shapes(bad)
