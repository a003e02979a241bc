"""Reproduce the learning-rate vs batch-size rule of Muon on a small MoE, on CPU.

For each batch size B and seed, train a small `TinyMoE` with `DistributedMuon` (one process)
for a fixed number of steps at each learning rate of a grid, and record the mean train loss
of the last 10 steps. The best lr per B is refined by a parabola in log(lr) through the best
grid point and its neighbours (seeds averaged first). Then fit

    rule:    eta*(B) = eta_max / sqrt(1 + B_simple / B)      (2 parameters)
    sqrt:    eta*(B) = c sqrt(B)                              (1 parameter)
    linear:  eta*(B) = c B                                    (1 parameter)

in log space, and compare the fitted B_simple with the one measured during the reference
run (two half-batches vs the whole batch, the micro-batch form of the two-batch estimator,
every 5 steps, smoothed as `distributed_muon.noise_scale.NoiseScale`).

    python scripts/lr_batch_sweep.py --out docs/results/lr-batch-sweep
writes ``sweep.json`` (every run) and ``fit.json``, and ``lr-batch.png`` next to them;
``--replot`` redraws the plot from ``fit.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from distributed_muon.launch.corpus import batch as get_batch
from distributed_muon.launch.corpus import load_corpus
from distributed_muon.launch.tiny_moe import ModelConfig, TinyMoE

from distributed_muon import DistributedMuon, muon_param_groups
from distributed_muon.noise_scale import NoiseScale

MODEL = ModelConfig(seq=32, d=64, layers=2, heads=2, experts=4, top_k=2, hidden=128)


def make(seed: int, lr: float) -> tuple[TinyMoE, DistributedMuon]:
    torch.manual_seed(seed)
    model = TinyMoE(MODEL)
    opt = DistributedMuon(muon_param_groups(model, **model.param_groups_spec()), lr=lr,
                          weight_decay=0.0, ns_dtype="fp32", comm_dtype="fp32")
    return model, opt


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine to 10% (as dmuon train)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(data: torch.Tensor, seed: int, lr: float, batch: int, steps: int,
          measure: bool = False) -> dict:
    """Final loss (mean of the last 10 steps); with ``measure``, B_simple every 5 steps."""
    model, opt = make(seed, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, steps // 10))
    noise = NoiseScale(["model"], beta=0.8)
    losses, b_simple = [], []
    for step in range(steps):
        x, y = get_batch(data, 1000 + seed, step, batch, MODEL.seq)
        if measure and step % 5 == 4:
            # Two half-batches: g_small = each half's gradient, g_big = their mean.
            halves = []
            for part in (slice(0, batch // 2), slice(batch // 2, batch)):
                model.zero_grad(set_to_none=True)
                ce, loss = model(x[part], y[part])
                loss.backward()
                halves.append([p.grad.clone() for p in model.parameters()])
            small = sum(sum(float(g.pow(2).sum()) for g in h) for h in halves) / 2
            big = sum(float(((a + b) / 2).pow(2).sum()) for a, b in zip(*halves, strict=True))
            out = noise.update(torch.tensor([small]), torch.tensor([big]), batch // 2, batch)
            b_simple.append((step + 1, out["model/b_simple"]))
            for p, a, b in zip(model.parameters(), *halves, strict=True):
                p.grad = (a + b) / 2
            ce = ce.detach()
        else:
            model.zero_grad(set_to_none=True)
            ce, loss = model(x, y)
            loss.backward()
        opt.step()
        sched.step()
        losses.append(float(ce.detach()))
        if not math.isfinite(losses[-1]):
            break
    final = sum(losses[-10:]) / len(losses[-10:]) if len(losses) == steps else math.inf
    return {"loss": final, "b_simple": b_simple}


def refine(lrs: list[float], losses: list[float]) -> float:
    """The minimum of a parabola in log(lr) through the best grid point and its neighbours
    (the grid point itself at an edge of the grid)."""
    i = min(range(len(lrs)), key=lambda k: losses[k])
    if i == 0 or i == len(lrs) - 1 or not all(map(math.isfinite, losses[i - 1:i + 2])):
        return lrs[i]
    x = [math.log(lr) for lr in lrs[i - 1:i + 2]]
    y = losses[i - 1:i + 2]
    denom = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / denom
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / denom
    if a <= 0:
        return lrs[i]
    return math.exp(min(max(-b / (2 * a), x[0]), x[2]))


def fit(batches: list[int], best: list[float]) -> dict:
    """Least squares in log(lr) for the rule (grid over B_simple, eta_max closed form),
    sqrt(B) and linear; residual RMS in log(lr) for each."""
    logs = [math.log(v) for v in best]

    def one_param(shape):
        c = sum(lg - math.log(shape(b)) for lg, b in zip(logs, batches, strict=True)) / len(logs)
        res = [lg - c - math.log(shape(b)) for lg, b in zip(logs, batches, strict=True)]
        return math.exp(c), math.sqrt(sum(r * r for r in res) / len(res))

    best_fit = None
    for k in range(-300, 401):
        bs = 10 ** (k / 100)  # B_simple from 0.001 to 10^4 sequences
        c, rms = one_param(lambda b, bs=bs: 1 / math.sqrt(1 + bs / b))
        if best_fit is None or rms < best_fit[2]:
            best_fit = (bs, c, rms)
    sqrt_c, sqrt_rms = one_param(math.sqrt)
    lin_c, lin_rms = one_param(float)
    return {"rule": {"b_simple": best_fit[0], "eta_max": best_fit[1], "rms_log": best_fit[2]},
            "sqrt": {"c": sqrt_c, "rms_log": sqrt_rms}, "linear": {"c": lin_c, "rms_log": lin_rms}}


def plot(batches, lrs, table, best, fitted, measured, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, b in enumerate(batches):
        ax1.plot(lrs, table[i], "o-", color=f"C{i}", label=f"B={b}")
        ax1.axvline(best[i], color=f"C{i}", ls=":", lw=1)
    ax1.set_xscale("log")
    ax1.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax1.minorticks_off()
    ax1.set_xlabel("peak learning rate")
    ax1.set_ylabel("final train loss (mean of seeds)")
    ax1.set_title("loss vs lr per batch size (dotted: refined optimum)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    grid = [batches[0] * 2 ** (k / 8) for k in range(0, 8 * int(math.log2(batches[-1]
                                                                       / batches[0])) + 1)]
    rule = fitted["rule"]
    ax2.plot(batches, best, "ko", label="measured optimum")
    ax2.plot(grid, [rule["eta_max"] / math.sqrt(1 + rule["b_simple"] / b) for b in grid], "C0-",
             label=f"rule, fitted B_simple={rule['b_simple']:.3g} "
             f"(rms {rule['rms_log']:.3f})")
    if measured:
        eta = rule["eta_max"]  # the measured B_simple with the rule's best eta_max for it
        c = sum(math.log(v) + 0.5 * math.log(1 + measured / b)
                for v, b in zip(best, batches, strict=True)) / len(best)
        eta = math.exp(c)
        ax2.plot(grid, [eta / math.sqrt(1 + measured / b) for b in grid], "C3--",
                 label=f"rule, measured B_simple={measured:.3g}")
    ax2.plot(grid, [fitted["sqrt"]["c"] * math.sqrt(b) for b in grid], "C1:",
             label=f"sqrt(B) (rms {fitted['sqrt']['rms_log']:.3f})")
    ax2.plot(grid, [fitted["linear"]["c"] * b for b in grid], "C2-.",
             label=f"linear (rms {fitted['linear']['rms_log']:.3f})")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("batch size (sequences)")
    ax2.set_ylabel("best peak learning rate")
    ax2.set_title("best lr vs batch size (rms: of the log-lr residuals)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--lrs", type=float, nargs="+",
                    default=[0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reference", type=int, default=16, help="batch of the measured run")
    ap.add_argument("--out", default="docs/results/lr-batch-sweep")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from fit.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.replot:
        r = json.loads((out / "fit.json").read_text())
        plot(r["batches"], r["lrs"], r["mean_loss"], r["best_lr"], r["fit"],
             r["measured_b_simple"], out / "lr-batch.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    data = load_corpus().train
    runs, start = [], time.perf_counter()
    total = len(args.batches) * len(args.lrs) * len(args.seeds)
    for b in args.batches:
        for lr in args.lrs:
            for seed in args.seeds:
                r = train(data, seed, lr, b, args.steps)
                runs.append({"batch": b, "lr": lr, "seed": seed, "loss": r["loss"]})
                print(f"[{len(runs)}/{total}] B={b} lr={lr:g} seed={seed} loss={r['loss']:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                (out / "sweep.json").write_text(json.dumps(runs, indent=1))
    table = [[sum(r["loss"] for r in runs if r["batch"] == b and r["lr"] == lr)
              / len(args.seeds) for lr in args.lrs] for b in args.batches]
    best = [refine(args.lrs, row) for row in table]
    fitted = fit(args.batches, best)
    # B_simple measured during training at the reference batch, at the best grid lr.
    ref_row = table[args.batches.index(args.reference)]
    ref_lr = args.lrs[min(range(len(args.lrs)), key=lambda k: ref_row[k])]
    series = [train(data, seed, ref_lr, args.reference, args.steps, measure=True)["b_simple"]
              for seed in args.seeds]
    late = [v for s in series for step, v in s if step > args.steps // 2]
    measured = sorted(late)[len(late) // 2] if late else None
    result = {"model": MODEL.__dict__, "steps": args.steps, "seeds": args.seeds,
              "batches": args.batches, "lrs": args.lrs, "mean_loss": table, "best_lr": best,
              "fit": fitted, "measured_b_simple": measured, "measured_at": {
                  "batch": args.reference, "lr": ref_lr, "series": series},
              "seconds": time.perf_counter() - start}
    (out / "fit.json").write_text(json.dumps(result, indent=1))
    plot(args.batches, args.lrs, table, best, fitted, measured, out / "lr-batch.png")
    print(json.dumps({k: result[k] for k in ("best_lr", "fit", "measured_b_simple")}, indent=1))


if __name__ == "__main__":
    main()
