"""Max attention logit and loss per step of `dmuon train` runs, for docs/muonclip.md.

Usage (the plot in docs/results/ comes from exactly this, after the runs in docs/muonclip.md):

    .venv/bin/python scripts/plot_muonclip.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each RUN_DIR holds the ``metrics.jsonl`` of a run with ``--qk-clip`` (``inf``: logged, never
clipped), whose records carry ``max_logit`` (before that step's clip) and ``qk_clipped``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str, runs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for i, arg in enumerate(runs):
        label, folder = arg.split("=", 1)
        records = [json.loads(line) for line in
                   (Path(folder) / "metrics.jsonl").read_text().splitlines() if line]
        steps = [r["step"] for r in records]
        top.plot(steps, [r["max_logit"] for r in records], color=f"C{i}", label=label)
        bottom.plot(steps, [r["loss"] for r in records], color=f"C{i}", alpha=0.5, lw=0.8,
                    label=f"{label} train")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        bottom.plot([s for s, _ in val], [v for _, v in val], "o-", color=f"C{i}",
                    label=f"{label} validation")
    top.set_yscale("log")
    top.set_ylabel("max attention logit (all layers, heads)")
    bottom.set_ylabel("cross-entropy (nats/byte)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend()
    top.set_title("dmuon train (tiny MoE, Muon, 2 CPU ranks, FSDP2): QK-clip off and on")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
