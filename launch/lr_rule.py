"""`dmuon lr RUN_DIR --batch B ...`: the learning rate the batch-size rule predicts.

The rule (Su, "Rethinking learning rate and batch size", part 3: Muon, a mean-field
analysis; the same form as SignSGD's): the best learning rate at batch size ``B`` is

    eta*(B) = eta_max / sqrt(1 + B_simple / B)

with ``B_simple = tr(Sigma) / |G|^2`` the gradient noise scale. Taking the run's own peak
learning rate ``eta_0`` as the best one at its batch ``B_0`` gives
``eta_max = eta_0 sqrt(1 + B_simple / B_0)`` and

    eta*(B) = eta_0 sqrt((1 + B_simple / B_0) / (1 + B_simple / B)).

``B_simple`` is read from the run's ``metrics.jsonl`` (written by ``dmuon train
--diagnostics-every N`` on 2 or more ranks): over the last quarter of the run's logging
steps, the mean of the per-step ``tr(Sigma)`` estimates over the mean of the per-step
``|G|^2`` estimates (a ratio of averages, as McCandlish et al. smooth; each step's own ratio
is too noisy), because the noise scale grows as training goes on and the late value is the
one a longer run at the new batch size lives with.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from distributed_muon.launch.metrics_log import read_metrics

ASSUMPTIONS = """\
Assumptions: (1) the run's peak lr was the best one at its batch size; (2) B_simple
measured late in this run holds at the new batch size (it grows during training, so the
prediction is for a run of similar length in tokens); (3) the rule's mean-field form:
per-sample gradient noise of similar size in every direction (B_simple uses only its
trace); (4) everything else (schedule, warmup, weight decay, steps scaled to the same
tokens) unchanged. The plain sqrt(B) and linear rules are shown for comparison.
On a small MoE the rule's shape held but the late-run B_simple over-predicted how
much the best lr grows with batch size (docs/science.md): read the rule's column as
an upper bound on the change."""


def predicted_lr(lr0: float, batch0: float, b_simple: float, batch: float) -> float:
    """``eta*(batch)`` from the run's ``(lr0, batch0)`` and ``b_simple`` (same unit as the
    batches)."""
    return lr0 * math.sqrt((1 + b_simple / batch0) / (1 + b_simple / batch))


def load_run(run: Path, key: str = "model") -> dict:
    """The run's ``lr``, ``batch`` (sequences), ``seq`` and ``b_simple`` of ``key`` (with the
    steps it comes from). Raises ValueError naming what is missing."""
    summary_file, metrics_file = run / "summary.json", run / "metrics.jsonl"
    for f in (summary_file, metrics_file):
        if not f.is_file():
            raise ValueError(f"{run}: no {f.name}; pass the --out folder of a finished "
                             "`dmuon train` run")
    summary = json.loads(summary_file.read_text())
    if "batch" not in summary:
        raise ValueError(f"{summary_file} has no batch size (written by an older dmuon "
                         "train): rerun the training")
    g2_field, trace_field = f"noise/{key}/grad_sq_step", f"noise/{key}/trace_cov_step"
    steps, g2, trace = [], [], []
    records = read_metrics(metrics_file)
    logged = sorted({k.split("/")[1] for r in records for k in r
                     if k.startswith("noise/") and k.endswith("/grad_sq_step")})
    if logged and key not in logged:
        shown = ", ".join(logged[:12]) + (f" and {len(logged) - 12} more" if len(logged) > 12
                                          else "")
        raise ValueError(f"--key {key}: {metrics_file} logs no noise scale of it; keys logged: "
                         f"{shown}")
    for record in records:
        if g2_field in record and trace_field in record:
            steps.append(record["step"])
            g2.append(record[g2_field])
            trace.append(record[trace_field])
    if not steps:
        raise ValueError(f"{metrics_file} has no {g2_field}: train with --diagnostics-every N "
                         "on 2 or more ranks (the noise scale compares the ranks' gradients)")
    n = max(1, len(steps) // 4)
    g2_mean, trace_mean = statistics.fmean(g2[-n:]), statistics.fmean(trace[-n:])
    if not g2_mean > 0:
        raise ValueError(f"{metrics_file}: the estimated |G|^2 of {key} over steps "
                         f"{steps[-n]}-{steps[-1]} is not positive (gradient noise dominates): "
                         "train longer or log more often")
    return {"lr": summary["lr"], "batch": summary["batch"], "seq": summary.get("seq"),
            "b_simple": trace_mean / g2_mean, "from_steps": (steps[-n], steps[-1]),
            "logged": len(steps)}


def report(run: Path, batches: list[int], key: str = "model") -> str:
    """The table ``dmuon lr`` prints."""
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"--batch {batches}: give one or more batch sizes >= 1 (sequences)")
    info = load_run(run, key)
    lr0, b0, bs = info["lr"], info["batch"], info["b_simple"]
    tokens = f" = {bs * info['seq']:.0f} tokens" if info.get("seq") else ""
    lines = [
        f"run {run}: peak lr {lr0:g} at batch {b0} sequences",
        f"B_simple ({key}) = {bs:.3g} sequences{tokens} (mean tr(Sigma) / mean |G|^2 at "
        f"the logging steps {info['from_steps'][0]}-{info['from_steps'][1]}, of "
        f"{info['logged']})",
        f"eta_max = {lr0 * math.sqrt(1 + bs / b0):.4g}   rule: eta*(B) = eta_max / "
        "sqrt(1 + B_simple / B)",
        "",
        f"{'batch':>8} {'rule lr':>10} {'x run lr':>9} {'sqrt(B) lr':>11} {'linear lr':>10}",
    ]
    for b in batches:
        lr = predicted_lr(lr0, b0, bs, b)
        lines.append(f"{b:>8} {lr:>10.4g} {lr / lr0:>9.3f} {lr0 * math.sqrt(b / b0):>11.4g} "
                     f"{lr0 * b / b0:>10.4g}")
    return "\n".join(lines + ["", ASSUMPTIONS])


def add_arguments(parser) -> None:
    parser.add_argument("run", help="the --out folder of a `dmuon train` run with "
                        "--diagnostics-every on 2 or more ranks")
    parser.add_argument("--batch", type=int, nargs="+", required=True, metavar="B",
                        help="target batch sizes, in sequences like --batch of dmuon train")
    parser.add_argument("--key", default="model",
                        help="whose B_simple: model (default), or a matrix / FSDP module name "
                        "as in metrics.jsonl's noise/<key>/b_simple")


def main(args) -> int:
    print(report(Path(args.run), args.batch, args.key))
    return 0
