"""Newton-Schulz by method: time (and, with --accuracy, error) of `orthogonalize` standard vs gram.

Usage:

    # timing on a GPU (default shapes: square, 1:4, 4:1 and the MoE expert shapes)
    python scripts/bench_ns.py --json ns.json
    # quick end-to-end check on a CPU
    python scripts/bench_ns.py --device cpu --shapes 128x512 --iters 2
    # accuracy table of docs/muon.md (CPU, ~4 min on 2 cores)
    python scripts/bench_ns.py --device cpu --accuracy

Timing: per shape (``MxN``, or ``BxMxN`` for a batch of B matrices), compute dtype, schedule and
method, the median of ``--iters`` calls after ``--warmup`` calls, the device synchronized around
each call (CUDA events on a GPU). ``GFLOP`` is what the method computes (`newton_schulz_flops`),
``TFLOP/s`` that count over the time, ``std-eq TFLOP/s`` the standard iteration's count over the
time (comparable across methods), ``speedup`` the standard time over this one. ``path`` says
whether Gram ran or fell back to the standard iteration (``max(m, n) <= 1.5 min(m, n)``).

Accuracy (``--accuracy``): per shape, input and schedule, the relative Frobenius error of the
result against the float64 SVD polar factor ``U V^T`` (``err UV``) and against the float64
standard iteration of the same schedule (``err NS``: the map both methods compute, so this is
rounding alone), and the range of the output singular values (``band``). Inputs: ``gauss``
(i.i.d. normal) and ``cond1e3`` (singular values log-spaced from 1 to 1e-3).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from distributed_muon.options import parse_dtype
from distributed_muon.orthogonalize import (
    GRAM_RESTART,
    gram_is_cheaper,
    newton_schulz_flops,
    orthogonalize,
)

DEFAULT_SHAPES = "1024x1024,1024x4096,4096x1024,2048x8192,1408x2048,2048x7168"
ACCURACY_SHAPES = "256x256,256x512,256x1024,128x1024"


def parse_shape(text: str) -> tuple[int, int, int]:
    dims = [int(d) for d in text.lower().split("x")]
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: use MxN or BxMxN")
    return dims[0], dims[1], dims[2]


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()``, with the device synchronized around every call."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = device.type == "cuda"
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def path_of(method: str, m: int, n: int, steps: int, restart: int) -> str:
    if method == "gram":
        return "gram" if gram_is_cheaper(m, n, steps, restart) else "standard (fallback)"
    return "standard"


def run_timing(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for b, m, n in args.shapes:
        X = torch.randn(b, m, n, device=device, generator=gen)
        for dtype in args.dtypes:
            for schedule in args.schedules:
                base = None
                for method in args.methods:
                    call = functools.partial(orthogonalize, X, schedule, args.steps, dtype,
                                             method=method, restart=args.restart)
                    seconds = time_call(call, device, args.warmup, args.iters)
                    flops = b * newton_schulz_flops(m, n, args.steps, method, args.restart)
                    std_flops = b * newton_schulz_flops(m, n, args.steps)
                    if method == "standard":
                        base = seconds
                    rows.append({
                        "shape": [b, m, n], "dtype": str(dtype).removeprefix("torch."),
                        "schedule": schedule, "method": method,
                        "path": path_of(method, m, n, args.steps, args.restart),
                        "ms": seconds * 1e3, "gflop": flops / 1e9,
                        "tflops": flops / seconds / 1e12,
                        "std_eq_tflops": std_flops / seconds / 1e12,
                        "speedup": base / seconds if base else None,
                    })
                    print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'shape':>16} {'dtype':>8} {'schedule':>13} {'method':>8} {'path':>19} "
              f"{'ms':>9} {'GFLOP':>8} {'TFLOP/s':>8} {'std-eq TFLOP/s':>14} {'speedup':>7}")
    shape = "x".join(str(d) for d in r["shape"])
    speedup = f"{r['speedup']:.2f}" if r["speedup"] else "-"
    print(f"{shape:>16} {r['dtype']:>8} {r['schedule']:>13} {r['method']:>8} {r['path']:>19} "
          f"{r['ms']:9.3f} {r['gflop']:8.2f} {r['tflops']:8.2f} {r['std_eq_tflops']:14.2f} "
          f"{speedup:>7}", flush=True)


def test_matrix(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    """A float64 ``m x n`` input: ``gauss`` or ``cond1e3`` (singular values 1 ... 1e-3)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(m, n, dtype=torch.float64, generator=gen)
    if kind != "cond1e3":
        raise ValueError(f"unknown input {kind!r}: use gauss or cond1e3")
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    return (U * torch.logspace(0, -3, k, dtype=torch.float64)) @ V.T


def run_accuracy(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    print(f"{'shape':>10} {'input':>8} {'schedule':>13} {'method':>8} {'dtype':>8} "
          f"{'err UV':>8} {'err NS':>9} {'band':>15}")
    for _, m, n in args.shapes:
        for kind in args.inputs:
            X64 = test_matrix(kind, m, n, seed=0)
            U, _, Vh = torch.linalg.svd(X64, full_matrices=False)
            polar = U @ Vh
            X = X64.float().to(device)
            for schedule in args.schedules:
                exact = orthogonalize(X64, schedule, args.steps, torch.float64)
                for method in args.methods:
                    for dtype in args.dtypes:
                        O = orthogonalize(X, schedule, args.steps, dtype, method=method,
                                          restart=args.restart).double().cpu()
                        sv = torch.linalg.svdvals(O)
                        row = {
                            "shape": [m, n], "input": kind, "schedule": schedule,
                            "method": method, "path": path_of(method, m, n, args.steps,
                                                              args.restart),
                            "dtype": str(dtype).removeprefix("torch."),
                            "err_uv": float((O - polar).norm() / polar.norm()),
                            "err_ns": float((O - exact).norm() / exact.norm()),
                            "band": [float(sv.min()), float(sv.max())],
                        }
                        rows.append(row)
                        print(f"{m:>4}x{n:<5} {kind:>8} {schedule:>13} {method:>8} "
                              f"{row['dtype']:>8} {row['err_uv']:8.4f} {row['err_ns']:9.2e} "
                              f"[{row['band'][0]:.3f}, {row['band'][1]:.3f}]", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated MxN or BxMxN (default {DEFAULT_SHAPES}; "
                        f"with --accuracy {ACCURACY_SHAPES})")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--schedules", default=None,
                   help="default jordan (timing), jordan,polar_express (--accuracy)")
    p.add_argument("--methods", default="standard,gram")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--restart", type=int, default=GRAM_RESTART,
                   help="Gram: restart from X every this many steps (0: never)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--accuracy", action="store_true",
                   help="measure errors against the SVD polar factor instead of time")
    p.add_argument("--inputs", default="gauss,cond1e3", help="--accuracy inputs")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.shapes = [parse_shape(s) for s in
                   (args.shapes or (ACCURACY_SHAPES if args.accuracy else DEFAULT_SHAPES))
                   .split(",")]
    args.dtypes = [parse_dtype(d, "--dtypes") for d in args.dtypes.split(",")]
    args.schedules = (args.schedules or ("jordan,polar_express" if args.accuracy else "jordan")
                      ).split(",")
    args.methods = args.methods.split(",")
    args.inputs = args.inputs.split(",")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows mean fp32
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"# cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    rows = run_accuracy(args, device) if args.accuracy else run_timing(args, device)
    if args.json:
        report = {
            "command": " ".join(["python", *sys.argv]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "steps": args.steps, "restart": args.restart,
            "kind": "accuracy" if args.accuracy else "timing", "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
