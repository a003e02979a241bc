"""Muon vs AdamW on `dmuon train`'s default job: one lr sweep for both, then 3 seeds.

Usage (the numbers in docs/train.md come from exactly this):

    .venv/bin/python scripts/compare_optimizers.py --out runs/compare

1. Sweep: seed 0, default budget, lr in {3e-4, 1e-3, 3e-3, 1e-2, 3e-2} for each optimizer.
2. Seeds 0, 1, 2 at each optimizer's best lr from the sweep (seed 0 reuses the sweep run).
Writes ``<out>/results.json`` and ``<out>/seeds.png`` (validation curves of the seed runs)
and prints both tables. Runs are resumable: a finished run
(its summary.json exists) is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (0, 1, 2)


def run(out: Path, optimizer: str, lr: float, seed: int, extra: list[str]) -> dict:
    d = out / f"{optimizer}_lr{lr:g}_seed{seed}"
    summary = d / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "-m", "distributed_muon.launch.cli", "train",
               "--optimizer", optimizer, "--lr", str(lr), "--seed", str(seed),
               "--out", str(d), *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(summary.read_text())
    print(f"  {optimizer} lr {lr:g} seed {seed}: val {result['val_loss']:.4f}", flush=True)
    return result


def plot_seeds(out: Path, best: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (opt, lr) in enumerate(best.items()):
        for s in SEEDS:
            lines = (out / f"{opt}_lr{lr:g}_seed{s}" / "metrics.jsonl").read_text().splitlines()
            vals = [r for r in map(json.loads, lines) if "val_loss" in r]
            ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-",
                    color=f"C{i}", alpha=0.8, label=f"{opt} (lr {lr:g})" if s == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy (nats/byte)")
    ax.set_title(f"dmuon train default job, seeds {SEEDS}, best lr of the same sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "seeds.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("extra", nargs="*", help="extra `dmuon train` flags, after --")
    args = parser.parse_args()
    out = Path(args.out)
    sweep = {opt: {lr: run(out, opt, lr, 0, args.extra) for lr in GRID}
             for opt in ("muon", "adamw")}
    best = {opt: min(GRID, key=lambda lr: sweep[opt][lr]["val_loss"]) for opt in sweep}
    seeds = {opt: {s: (sweep[opt][best[opt]] if s == 0 else run(out, opt, best[opt], s,
                                                                 args.extra))
                   for s in SEEDS} for opt in sweep}
    print("\nlr sweep, seed 0, validation loss (nats/byte):")
    print(f"{'lr':>8}" + "".join(f"{opt:>10}" for opt in sweep))
    for lr in GRID:
        print(f"{lr:>8g}" + "".join(f"{sweep[o][lr]['val_loss']:>10.4f}" for o in sweep))
    print("\nbest lr per optimizer, 3 seeds, validation loss:")
    print(f"{'seed':>6}" + "".join(f"{o + ' @' + format(best[o], 'g'):>16}" for o in sweep))
    for s in SEEDS:
        print(f"{s:>6}" + "".join(f"{seeds[o][s]['val_loss']:>16.4f}" for o in sweep))
    plot_seeds(out, best)
    (out / "results.json").write_text(json.dumps(
        {"grid": GRID, "best": best,
         "sweep": {o: {str(lr): r for lr, r in v.items()} for o, v in sweep.items()},
         "seeds": {o: {str(s): r for s, r in v.items()} for o, v in seeds.items()}}, indent=2))


if __name__ == "__main__":
    main()
