"""`dmuon bench` runs end to end on CPU ranks and reports consistent numbers (not timings)."""

import json
import subprocess
import sys

import pytest
from distributed_muon.launch.bench import parse_shapes

from distributed_muon.plan import ns_flops


def test_bench_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "distributed_muon.launch.cli", "bench", "--shapes",
           "96x64,64x160,3x32x32", "--layers", "2", "--nproc", "2", "--steps", "2",
           "--warmup", "1", "--ns-dtype", "fp32", "--ns-method", "standard", "--device", "cpu",
           "--exchange-chunks", "2",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "NS imbalance" in proc.stdout and "to_owners ms" in proc.stdout
    # The peak is measured in NS's dtype and printed in a unit that shows it (not 0.0003 TFLOP/s).
    peak = next(x for x in proc.stdout.splitlines() if "matmul peak" in x)
    value, unit = peak.split("(measured): ")[1].split(";")[0].split()
    assert peak.startswith("fp32 matmul peak") and unit in ("GFLOP/s", "TFLOP/s")
    assert float(value) >= 1, peak
    report = json.loads(out.read_text())
    assert report["world"] == 2 and len(report["ranks"]) == 2
    assert report["config"]["exchange_chunks"] == 2 and "pipelined" in proc.stdout
    flops = [r["ns_flops"] for r in report["ranks"]]
    per_layer = ns_flops(96, 64, 5) + ns_flops(64, 160, 5) + 3 * ns_flops(32, 32, 5)
    assert sum(flops) == 2 * per_layer  # every matrix orthogonalized once, on one rank
    assert report["planned_imbalance"] == pytest.approx(max(flops) / (sum(flops) / 2))
    # FSDP2 splits each 2-D matrix's rows in halves: the half its owner lacks goes in, and its
    # update comes back (48x64 + 32x160 values per layer, 2 layers, bf16; two chunks move the
    # same bytes as one). The 3 experts are whole on their ranks (2 + 1): they never move.
    moved = 2 * (48 * 64 + 32 * 160) * 2 * 2
    assert sum(r["sent"] for r in report["ranks"]) == moved
    assert sum(r["recv"] for r in report["ranks"]) == moved
    assert all(r["sent"] > 0 and r["recv"] > 0 for r in report["ranks"])
    # The memory breakdown (issue 24): printed for rank 0, every rank's in the JSON; the send
    # buffers hold exactly the bytes that travel; no CUDA peak on CPU.
    assert "optimizer memory on rank 0" in proc.stdout and "B/Muon param" in proc.stdout
    memory = [r["memory"] for r in report["ranks"]]
    assert report["memory_rank0"] == memory[0] and report["cuda_memory_rank0"] is None
    assert sum(m["muon_params"] for m in memory) == 2 * (96 * 64 + 64 * 160 + 3 * 32 * 32)
    assert all(m["muon_state_bytes"] == 4 * m["muon_params"] for m in memory)
    assert sum(m["exchange_to_owners_send_bytes"] + m["exchange_to_holders_send_bytes"]
               for m in memory) == moved


def test_shape_parsing():
    assert parse_shapes("6144x2048,4x512x256") == [(6144, 2048), (4, 512, 256)]
    for bad in ("", "12", "3x", "axb", "0x4"):
        with pytest.raises(ValueError, match="--shapes"):
            parse_shapes(bad)
