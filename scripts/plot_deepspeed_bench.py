"""Bar chart of `scripts/bench_deepspeed.py` results: median step time and peak memory.

    python scripts/plot_deepspeed_bench.py docs/results/deepspeed_h200x4.jsonl \
        docs/results/deepspeed_h200x4.png
    python scripts/plot_deepspeed_bench.py OUT.png --inputs A.jsonl B.jsonl   # several files

One bar per configuration (optimizer, plus DistributedMuon's non-default params) and ZeRO
stage; a configuration not run at a stage has no bar there.
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"adamw": "DeepSpeed AdamW (torch_adam)", "ds_muon": "DeepSpeed \"Muon\"",
          "distributed_muon": "DistributedMuon"}
DEFAULT_PARAMS = {"lr", "weight_decay", "ns_dtype", "comm_dtype"}


def label(row: dict) -> str:
    name = LABELS.get(row["optimizer"], row["optimizer"])
    extra = {k: v for k, v in row["optimizer_config"]["params"].items()
             if row["optimizer"] == "distributed_muon" and k not in DEFAULT_PARAMS}
    return name + "".join(f", {k}={v}" for k, v in extra.items())


def plot(rows: list[dict], dst: str) -> None:
    stages = sorted({r["stage"] for r in rows})
    configs = list(dict.fromkeys(label(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(configs)
    for k, name in enumerate(configs):
        mine = {r["stage"]: r for r in rows if label(r) == name}
        xs = [s + (k - (len(configs) - 1) / 2) * width for s in stages if s in mine]
        axes[0].bar(xs, [mine[s]["step_s_median"] * 1e3 for s in stages if s in mine], width,
                    label=name)
        axes[1].bar(xs, [mine[s]["peak_mem_gib"] for s in stages if s in mine], width,
                    label=name)
    for ax, title in zip(axes, ["median step time (ms)", "peak memory per GPU (GiB)"],
                         strict=True):
        ax.set_xticks(stages, [f"ZeRO-{s}" for s in stages])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=min(3, len(configs)))
    first = rows[0]
    tokens = first.get("tokens_per_step", first["args"]["micro_batch"] * first["args"]["seq"]
                       * first["world_size"])
    fig.suptitle(f"0.94B dense GPT, bf16, {first['world_size']} x {first['gpu']}, "
                 f"{tokens} tokens per step")
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(configs) - 1) // 3), 1, 1))
    fig.savefig(dst, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="SRC.jsonl DST.png, or DST.png with --inputs")
    p.add_argument("--inputs", nargs="+", help="several result files, plotted together")
    args = p.parse_args()
    if args.inputs:
        if len(args.paths) != 1:
            p.error("with --inputs give one output path")
        sources, dst = args.inputs, args.paths[0]
    elif len(args.paths) == 2:
        sources, dst = args.paths[:1], args.paths[1]
    else:
        p.error("give SRC.jsonl DST.png")
    rows = [json.loads(line) for src in sources for line in open(src) if line.strip()]
    if not rows:
        p.error("no result lines in the input")
    plot(rows, dst)


if __name__ == "__main__":
    main()
