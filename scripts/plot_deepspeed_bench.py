"""Bar chart of `scripts/bench_deepspeed.py` results: median step time and peak memory.

    python scripts/plot_deepspeed_bench.py docs/results/deepspeed_h200x4.jsonl \
        docs/results/deepspeed_h200x4.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"adamw": "DeepSpeed AdamW (torch_adam)", "ds_muon": "DeepSpeed \"Muon\"",
          "distributed_muon": "DistributedMuon"}


def main(src: str, dst: str) -> None:
    rows = [json.loads(line) for line in open(src)]
    stages = sorted({r["stage"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.27
    for k, (opt, label) in enumerate(LABELS.items()):
        mine = {r["stage"]: r for r in rows if r["optimizer"] == opt}
        xs = [s + (k - 1) * width for s in stages]
        axes[0].bar(xs, [mine[s]["step_s_median"] * 1e3 for s in stages], width, label=label)
        axes[1].bar(xs, [mine[s]["peak_mem_gib"] for s in stages], width, label=label)
    for ax, title in zip(axes, ["median step time (ms)", "peak memory per GPU (GiB)"],
                         strict=True):
        ax.set_xticks(stages, [f"ZeRO-{s}" for s in stages])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"0.94B dense GPT, bf16, 4 x {rows[0]['gpu']}, micro-batch 4 x 1024")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
