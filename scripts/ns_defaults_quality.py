"""Quality of the Newton-Schulz defaults on the main job (`dmuon train`), over seeds.

Runs (unless the run folder already holds a finished run) and summarizes

    dmuon train --device cpu --nproc 1 --seed S --ns-method M --ns-dtype D --out OUT/M-D-sS

for every seed and (method, dtype), then prints the final validation loss per seed, its mean
and standard deviation, and the mean of the diagnostics' Newton-Schulz error
(``muon/all/ns_error``, logged every 10 steps), and writes them as JSON:

    python scripts/ns_defaults_quality.py --out runs/ns-quality --json ns-quality.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = (("standard", "bf16"), ("gram", "fp16"))


def run(out: Path, method: str, dtype: str, seed: int, device: str) -> Path:
    folder = out / f"{method}-{dtype}-s{seed}"
    if not (folder / "summary.json").exists():
        dmuon = shutil.which("dmuon") or "dmuon"
        cmd = [dmuon, "train", "--device", device, "--nproc", "1", "--seed", str(seed),
               "--ns-method", method, "--ns-dtype", dtype, "--out", str(folder)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def summarize(folder: Path) -> dict[str, float]:
    summary = json.loads((folder / "summary.json").read_text())
    errors = [row["muon/all/ns_error"] for row in map(json.loads, (folder / "metrics.jsonl")
                                                        .read_text().splitlines())
              if "muon/all/ns_error" in row]
    return {"val_loss": summary["val_loss"], "tokens_per_s": summary["tokens_per_s"],
            "ns_error_mean": statistics.fmean(errors)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ns-quality", help="folder of the runs")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = {}
    for method, dtype in CONFIGS:
        runs = [summarize(run(Path(args.out), method, dtype, s, args.device))
                for s in range(args.seeds)]
        losses = [r["val_loss"] for r in runs]
        results[f"{method}-{dtype}"] = {
            "runs": runs, "val_loss_mean": statistics.fmean(losses),
            "val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "ns_error_mean": statistics.fmean(r["ns_error_mean"] for r in runs)}
    print(f"{'config':<16}{'val loss per seed':<28}{'mean':>8}{'sd':>8}{'NS error':>10}")
    for name, r in results.items():
        per_seed = " ".join(f"{x['val_loss']:.4f}" for x in r["runs"])
        print(f"{name:<16}{per_seed:<28}{r['val_loss_mean']:>8.4f}{r['val_loss_sd']:>8.4f}"
              f"{r['ns_error_mean']:>10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
