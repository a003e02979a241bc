"""What `dmuon train` shows and writes: progress, ``metrics.jsonl``, the final table, plots.

Only rank 0 reports; the other ranks build these objects disabled.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from distributed_muon.launch.metrics_log import MetricsLog


class Progress:
    """A progress bar on a terminal; elsewhere (logs, pipes, CI) a line every 10%.

    ``first`` is the step the run starts from (a resume): the ETA counts only the steps this
    process has timed.
    """

    def __init__(self, total: int, enabled: bool, first: int = 0) -> None:
        self.total, self.enabled, self.first = total, enabled, first
        self.tty = sys.stdout.isatty()
        self.start = time.perf_counter()
        self.next_line = 0

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def update(self, step: int, loss: float, val: tuple[int, float] | None, tok_s: float) -> None:
        """``val``: the latest (step, validation loss), shown with its step."""
        if not self.enabled:
            return
        frac = step / self.total
        done = step - self.first
        spent = time.perf_counter() - self.start
        eta = spent / done * (self.total - step) if done > 0 else 0.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        val_text = f" val {val[1]:.3f} (step {val[0]})" if val is not None else ""
        line = (f"[{bar}] {step}/{self.total} loss {loss:.3f}{val_text} "
                f"{tok_s / 1e3:.1f}k tok/s ETA {eta:4.0f}s")
        if self.tty:
            print("\r" + line, end="", flush=True)
        elif frac >= self.next_line / 10 or step == self.total:
            print(line, flush=True)
            self.next_line = int(frac * 10) + 1

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


def summary_table(rows: list[dict]) -> str:
    head = (f"{'optimizer':<10}{'steps':>7}{'tokens':>10}{'wall s':>9}{'tok/s':>9}"
            f"{'train loss':>12}{'val loss':>10}")
    lines = [head]
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-"
        lines.append(f"{r['optimizer']:<10}{r['steps']:>7}{r['tokens']:>10}{r['wall_s']:>9.1f}"
                     f"{r['tokens_per_s']:>9.0f}{r['train_loss']:>12.4f}{val:>10}")
    return "\n".join(lines)


def plot_losses(runs: dict[str, list[dict]], path: Path) -> None:
    """Train loss (thin) and validation loss (markers) per step, one color per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], color=color, alpha=0.35, lw=0.8)
        val_steps = [r["step"] for r in records if "val_loss" in r]
        if val_steps:
            ax.plot(val_steps, [r["val_loss"] for r in records if "val_loss" in r], "o-",
                    color=color, label=f"{name} validation")
        ax.plot([], [], color=color, alpha=0.35, label=f"{name} train")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("dmuon train: tiny MoE on the Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_report(out: Path, results: dict[str, dict]) -> None:
    """``compare.png`` and one table for runs written to ``out/<name>/``."""
    runs = {name: MetricsLog(out / name / "metrics.jsonl", False).read() for name in results}
    plot_losses(runs, out / "compare.png")
    print("\n" + summary_table(list(results.values())))
    print(f"plot: {out / 'compare.png'}")


# The four panels of diagnostics.png: (title in words, y label, what fills it).
PANELS = (
    ("How noisy the gradient is (whole model)", "gradient noise scale B_simple (sequences)",
     "noise"),
    ("How many directions Muon's update spreads over, per layer type",
     "nuclear/Frobenius ratio (1: one direction)", "nuclear_ratio"),
    ("Size of the update Muon applied, per layer type", "update RMS (lr x scale x RMS of O)",
     "update_rms"),
    ("Optimizer time per rank on logging steps", "seconds (solid: Newton-Schulz; dashed: "
     "whole step)", "time"),
)
NOT_LOGGED = ("not logged by this run:\nits backend or optimizer does not report this\n"
              "(see docs/diagnostics.md)")


def diagnostics_figure(records: list[dict]):
    """The figure of `plot_diagnostics`, or None when the run logged no diagnostics."""
    logged = [r for r in records if any(k.startswith(("muon/", "noise/")) for k in r)]
    if not logged:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))

    def series(ax, key, **style):
        pts = [(r["step"], r[key]) for r in logged if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), **style)

    ax = axes[0][0]
    series(ax, "noise/model/b_simple", color="C0", marker="o", label="smoothed")
    series(ax, "noise/model/b_simple_step", color="C0", alpha=0.35, label="this step")
    kinds = sorted({k.split("/")[1] for r in logged for k in r
                    if k.startswith("muon/") and "*" in k})
    for ax, field in ((axes[0][1], "nuclear_ratio"), (axes[1][0], "update_rms")):
        for i, kind in enumerate(kinds):
            series(ax, f"muon/{kind}/{field}", color=f"C{i}", marker=".", label=kind)
    ax = axes[1][1]
    ranks = sorted({k.split("/")[1] for r in logged for k in r if k.startswith("muon/rank")})
    for i, rank in enumerate(ranks):
        series(ax, f"muon/{rank}/time_ns", color=f"C{i}", marker=".", label=f"{rank} NS")
        total = [(r["step"], sum(v for k, v in r.items()
                                 if k.startswith(f"muon/{rank}/time_"))) for r in logged
                 if f"muon/{rank}/time_ns" in r]
        if total:
            ax.plot(*zip(*total, strict=True), color=f"C{i}", ls="--", label=f"{rank} step")
    for ax, (title, ylabel, _) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # an empty panel says why, so the figure reads alone
            ax.text(0.5, 0.5, NOT_LOGGED, ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
    fig.tight_layout()
    return fig


def plot_diagnostics(records: list[dict], path: Path) -> bool:
    """Four panels from ``metrics.jsonl``'s logging steps: gradient noise scale, Muon's
    nuclear/Frobenius ratio and update RMS per layer type, and per-rank optimizer phase times.
    Returns False (and draws nothing) when the run logged no diagnostics."""
    fig = diagnostics_figure(records)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_run(folder: Path) -> list[Path]:
    """``dmuon plot``: redraw ``loss.png`` and (if it logged diagnostics) ``diagnostics.png``
    from ``folder/metrics.jsonl``; returns the files written. ValueError names what is
    missing."""
    log = MetricsLog(folder / "metrics.jsonl", False)
    if not log.path.is_file():
        raise ValueError(f"{folder}: no metrics.jsonl; pass the --out folder of a dmuon train "
                         "run (of --compare: its muon/ or adamw/ folder)")
    records = log.read()
    if not records:
        raise ValueError(f"{log.path} is empty: the run has not finished a step yet")
    summary = folder / "summary.json"
    name = json.loads(summary.read_text()).get("optimizer", "run") if summary.is_file() \
        else "run"
    plot_losses({name: records}, folder / "loss.png")
    written = [folder / "loss.png"]
    if plot_diagnostics(records, folder / "diagnostics.png"):
        written.append(folder / "diagnostics.png")
    return written


def plot_command(args) -> int:
    for path in plot_run(Path(args.run)):
        print(f"wrote {path}")
    return 0
