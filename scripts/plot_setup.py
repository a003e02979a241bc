"""Plot one rank's setup time and memory against the world size, from bench_setup.py's JSON.

    python scripts/plot_setup.py docs/results/setup-deepseek-v3-fsdp2-ep64.json \\
        docs/results/setup-deepseek-v3-hsdp8-ep64.json --out docs/results/setup-scaling.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by bench_setup.py --json")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.results:
        with open(path) as f:
            data = json.load(f)
        a = data["args"]
        label = f"{a['model']} {a['layout']}" + (
            f" x{a['replicate']}" if a["layout"] == "hsdp" else "") + f", EP {a['ep']}"
        rows = sorted(data["rows"], key=lambda r: r["world"])
        n = [r["world"] for r in rows]
        ax_t.plot(n, [r["total"] for r in rows], "o-", label=f"{label}: wall")
        ax_t.plot(n, [r["total_cpu"] for r in rows], "s--", label=f"{label}: CPU")
        ax_m.plot(n, [r["rank_memory_bytes"] / 2**20 for r in rows], "o-", label=label)
    ax_t.axhline(10, color="gray", lw=0.8, ls=":")
    ax_m.axhline(1024, color="gray", lw=0.8, ls=":")
    for ax, title, unit in ((ax_t, "setup time of one rank", "seconds"),
                            (ax_m, "setup memory of one rank", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks N")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
