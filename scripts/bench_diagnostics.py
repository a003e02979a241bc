"""What diagnostics cost: DistributedMuon's step with diagnostics on every step vs off, and the
noise probe's work (squared norms of the local and the averaged gradient), one process.

    python scripts/bench_diagnostics.py [--device cuda] [--d 1024 --hidden 4096 --layers 4]
    python scripts/bench_diagnostics.py --nuclear   # <O, u> / ||u||_* per schedule and spectrum

Times are medians over ``--repeat`` steps after ``--warmup`` (CUDA synchronized). On a logging
step the optimizer adds, per owned batch, ``<O, u>`` and norms (O(m n) per matrix) and on one
sampled matrix an ``m x m`` Gram product and eigenvalues; the probe adds two passes over the
gradient. Steps that do not log add nothing (tests/test_diagnostics.py counts collectives).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from distributed_muon.launch.grad_noise import _sq
from distributed_muon.launch.tiny_moe import ModelConfig, TinyMoE

from distributed_muon import DistributedMuon, muon_param_groups, orthogonalize
from distributed_muon.diagnostics import matrix_stats, nuclear_ratio, orthogonality_error


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_steps(model: TinyMoE, device: torch.device, every: int, warmup: int,
               repeat: int) -> float:
    ns_dtype = "bf16" if device.type == "cuda" else "fp32"
    opt = DistributedMuon(muon_param_groups(model, **model.param_groups_spec()), lr=1e-3,
                          ns_dtype=ns_dtype, diagnostics_every=every)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-2
    times = []
    for i in range(warmup + repeat):
        start = _now(device)
        opt.step()
        if i >= warmup:
            times.append(_now(device) - start)
    return statistics.median(times)


def time_parts(model: TinyMoE, device: torch.device, warmup: int,
               repeat: int) -> tuple[float, float]:
    """Median seconds, summed over the owner's batches, of Newton-Schulz and of the
    diagnostics' own work on the same batches (what a logging step adds to the NS phase)."""
    ns_dtype = "bf16" if device.type == "cuda" else "fp32"
    opt = DistributedMuon(muon_param_groups(model, **model.param_groups_spec()), lr=1e-3,
                          ns_dtype=ns_dtype)
    ns, diag = [], []
    for i in range(warmup + repeat):
        t_ns = t_diag = 0.0
        for batch in opt.exchange.batches:
            u = torch.randn(batch.view.shape, device=device, dtype=batch.view.dtype)
            start = _now(device)
            o = orthogonalize(u, batch.options)
            mid = _now(device)
            matrix_stats(u, o)
            orthogonality_error(o[0])
            nuclear_ratio(u[0])
            end = _now(device)
            t_ns, t_diag = t_ns + mid - start, t_diag + end - mid
        if i >= warmup:
            ns.append(t_ns)
            diag.append(t_diag)
    return statistics.median(ns), statistics.median(diag)


def nuclear_table() -> None:
    """<O, u> / ||u||_* (SVD, float64) for NS schedules, dtypes, shapes and singular-value
    spectra of u: how far the cheap nuclear-norm estimate is from the exact one."""
    spectra = {"rank 1": lambda i: (i == 1).double(), "rank 4": lambda i: (i <= 4).double(),
               "1/i": lambda i: 1 / i, "1/i^2": lambda i: 1 / i**2,
               "flat": lambda i: torch.ones_like(i), "gaussian": None}
    print(f"{'schedule':<14}{'dtype':<6}{'shape':<11}" + "".join(f"{k:>10}" for k in spectra))
    for schedule in ("jordan", "polar_express"):
        for dtype in ("fp32", "bf16"):
            for m, n in ((64, 64), (160, 480), (320, 160), (1024, 1024)):
                gen = torch.Generator().manual_seed(0)
                g = torch.randn(m, n, generator=gen, dtype=torch.float64)
                u_, _, vh = torch.linalg.svd(g, full_matrices=False)
                i = torch.arange(1, min(m, n) + 1).double()
                row = []
                for make in spectra.values():
                    u = (g if make is None else u_ @ torch.diag(make(i)) @ vh).float()
                    o = orthogonalize(u[None], schedule, 5, dtype)
                    dot = float(matrix_stats(u[None], o)[0, 1])
                    row.append(dot / float(torch.linalg.matrix_norm(u.double(), "nuc")))
                print(f"{schedule:<14}{dtype:<6}{f'{m}x{n}':<11}"
                      + "".join(f"{v:>10.3f}" for v in row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, default=160)
    ap.add_argument("--hidden", type=int, default=320)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--nuclear", action="store_true", help="print the <O,u> / ||u||_* table")
    args = ap.parse_args()
    if args.nuclear:
        nuclear_table()
        return
    device = torch.device(args.device)
    cfg = ModelConfig(d=args.d, hidden=args.hidden, layers=args.layers, experts=args.experts)
    model = TinyMoE(cfg).to(device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine
    ns_s, diag_s = time_parts(model, device, args.warmup, args.repeat)
    off = time_steps(model, device, 0, args.warmup, args.repeat)
    on = time_steps(model, device, 1, args.warmup, args.repeat)
    grads = [p.grad for p in model.parameters()]
    norms = []
    for i in range(args.warmup + args.repeat):
        start = _now(device)
        total = sum(_sq(g) for g in grads) + sum(_sq(g) for g in grads)  # local + averaged
        float(total)
        if i >= args.warmup:
            norms.append(_now(device) - start)
    probe = statistics.median(norms)
    numel = sum(p.numel() for p in model.parameters())
    result = {"device": str(device), "model": cfg.__dict__, "parameters": numel,
              "step_s_off": off, "step_s_diagnostics": on,
              "optimizer_overhead_logging_step": on / off - 1,
              "ns_s": ns_s, "diagnostics_work_s": diag_s, "diagnostics_vs_ns": diag_s / ns_s,
              "probe_norms_s": probe, "probe_vs_step": probe / off}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
