"""Compare named variants of the main job (`dmuon train`) over seeds.

Each ``--variant NAME=FLAGS`` is a set of extra `dmuon train` flags. For every seed
S = 0 .. N-1 and variant it runs, one at a time (unless the run folder already holds a
finished run),

    dmuon train --device cpu --nproc 1 --seed S FLAGS --out OUT/NAME-sS

then prints the final validation loss per seed, its mean and standard deviation, the mean of
the diagnostics' Newton-Schulz error (``muon/all/ns_error``, logged every 10 steps), the
tokens/s and median seconds per step, and each variant's paired differences (per seed) from
the first variant, and writes them as JSON. Per-head Newton-Schulz against whole matrices:

    python scripts/main_job_seeds.py --out runs/per-head --seeds 3 \\
        --variant whole= --variant per_head=--per-head --json per-head.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME=FLAGS"`` -> ``(NAME, FLAGS split as a shell would)``; FLAGS may be empty."""
    name, sep, flags = text.partition("=")
    if not sep or not NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"expected NAME=FLAGS with NAME of letters, digits, '_', '.', '-': {text!r}")
    return name, shlex.split(flags)


def run(folder: Path, seed: int, flags: list[str], device: str) -> Path:
    if not (folder / "summary.json").exists():
        dmuon = shutil.which("dmuon") or "dmuon"
        cmd = [dmuon, "train", "--device", device, "--nproc", "1", "--seed", str(seed),
               *flags, "--out", str(folder)]
        print(shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def summarize_run(folder: Path) -> dict[str, float | None]:
    """Final validation loss, tokens/s, median seconds per step (robust to the stalls of a
    shared machine) and mean NS error (None if never logged) of a run."""
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    errors = [row["muon/all/ns_error"] for row in rows if "muon/all/ns_error" in row]
    times = [row["time"] for row in rows if "time" in row]
    return {"val_loss": summary["val_loss"], "tokens_per_s": summary["tokens_per_s"],
            "step_s_median": statistics.median(b - a for a, b in pairwise(times))
            if len(times) > 1 else None,
            "ns_error_mean": statistics.fmean(errors) if errors else None}


def summarize_variant(flags: list[str], runs: list[dict]) -> dict:
    """Mean and sample sd of the final validation loss over the runs (one per seed)."""
    losses = [r["val_loss"] for r in runs]
    errors = [r["ns_error_mean"] for r in runs if r["ns_error_mean"] is not None]
    return {"flags": flags, "runs": runs, "val_loss_mean": statistics.fmean(losses),
            "val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "ns_error_mean": statistics.fmean(errors) if errors else None,
            "tokens_per_s_mean": statistics.fmean(r["tokens_per_s"] for r in runs),
            "step_s_median": statistics.median(r["step_s_median"] for r in runs)}


def paired_differences(results: dict[str, dict]) -> dict[str, dict]:
    """Per-seed validation-loss difference of each variant from the first one, and its mean."""
    (base_name, base), *others = results.items()
    out = {}
    for name, r in others:
        diffs = [a["val_loss"] - b["val_loss"] for a, b in zip(r["runs"], base["runs"],
                                                               strict=True)]
        out[name] = {"minus": base_name, "per_seed": diffs, "mean": statistics.fmean(diffs)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", type=parse_variant, action="append", required=True,
                   metavar="NAME=FLAGS", help="extra dmuon train flags, named (repeatable)")
    p.add_argument("--out", default="runs/main-job-seeds", help="folder of the runs")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if len({name for name, _ in args.variant}) != len(args.variant):
        p.error("variant names must differ")
    runs: dict[str, list[dict]] = {name: [] for name, _ in args.variant}
    for s in range(args.seeds):  # seeds outermost: the variants share any drift in machine load
        for name, flags in args.variant:
            folder = run(Path(args.out) / f"{name}-s{s}", s, flags, args.device)
            runs[name].append({"seed": s, **summarize_run(folder)})
    results = {name: summarize_variant(flags, runs[name]) for name, flags in args.variant}
    diffs = paired_differences(results)
    print(f"{'variant':<16}{'val loss per seed':<28}{'mean':>8}{'sd':>8}{'NS error':>10}"
          f"{'tok/s':>8}{'s/step':>8}")
    for name, r in results.items():
        per_seed = " ".join(f"{x['val_loss']:.4f}" for x in r["runs"])
        ns = "" if r["ns_error_mean"] is None else f"{r['ns_error_mean']:.4f}"
        print(f"{name:<16}{per_seed:<28}{r['val_loss_mean']:>8.4f}{r['val_loss_sd']:>8.4f}"
              f"{ns:>10}{r['tokens_per_s_mean']:>8.0f}{r['step_s_median']:>8.3f}")
    for name, d in diffs.items():
        print(f"{name} - {d['minus']}: " + " ".join(f"{x:+.4f}" for x in d["per_seed"])
              + f"; mean {d['mean']:+.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"variants": results, "paired_differences": diffs},
                                              indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
