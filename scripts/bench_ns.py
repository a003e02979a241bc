"""Newton-Schulz by method: time (and, with --accuracy, error) of `orthogonalize` standard vs gram.

Usage:

    # timing on a GPU (default shapes: square, 1:4, 4:1 and the MoE expert shapes), with and
    # without the symmetric-product kernel, DeepSpeed's Gram NS and the bf16 matmul peak
    python scripts/bench_ns.py --dtypes bf16 --methods standard,gram,deepspeed --peak --json ns.json
    # the symmetric-product kernel against torch's matmul, per product and size
    python scripts/bench_ns.py --products --json products.json
    # the NS cost table the ownership plan can use (dmuon bench --ns-cost ns_cost.json)
    python scripts/bench_ns.py --cost-table ns_cost.json --dtypes bf16
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
``kernel`` is how the symmetric products ran (``--kernels``: ``torch``, ``triton``: the kernel of
`distributed_muon.symmetric`, ``auto``: what the optimizer does). Method ``deepspeed`` is
DeepSpeed's own Gram NS (``zeropower_via_gram_newtonschulz``: fp16, restart after step 2,
``torch.compile``d, Jordan's coefficients only) where DeepSpeed is installed. ``--peak`` adds
the device's bf16 matmul rate (8192^3 on a GPU) measured in the same run.

Products (``--products``): per ``MxK`` shape, ``X X^T`` (``X[M, K]``) and ``b A + c A A``
(``A[M, M]``, the other product of a NS step) by torch (``bmm``/``baddbmm``) and by the kernel:
ms, TFLOP/s counted as the full product (``2 M^2 K``, ``2 M^3``: comparable between the two),
speedup, and the smallest ``M`` from which the kernel wins both products for every larger ``M``
measured: the value for ``SYMMETRIC_MIN_SIZE`` in `distributed_muon.orthogonalize`.

Cost table (``--cost-table PATH``): seconds per matrix of `orthogonalize` for each shape (default
those of ``dmuon bench`` and the MoE experts), dtype and method, timed on batches of
``--batch`` matrices, written as a `distributed_muon.cost.CostTable`.

Accuracy (``--accuracy``): per shape, input and schedule (``deepspeed``: DeepSpeed's Gram NS,
eager, in fp16 as on a GPU, Jordan's coefficients only), the relative Frobenius error of the
result against the float64 SVD polar factor ``U V^T`` (``err UV``) and against the float64
standard iteration of the same schedule (``err NS``: the map both methods compute, so this is
rounding alone), and the range of the output singular values (``band``). Inputs: ``gauss``
(i.i.d. normal) and ``cond1e3`` (singular values log-spaced from 1 to 1e-3).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

import torch

from distributed_muon.cost import CostTable, measure, time_call
from distributed_muon.dtypes import NS_DTYPES, parse_dtype
from distributed_muon.orthogonalize import (
    GRAM_RESTART,
    GRAM_RESTART_FP16,
    NSOptions,
    gram_is_cheaper,
    gram_restart,
    newton_schulz_flops,
    orthogonalize,
    symmetric_kernel_available,
)

DEFAULT_SHAPES = "1024x1024,1024x4096,4096x1024,2048x8192,1408x2048,2048x7168"
ACCURACY_SHAPES = "256x256,256x512,256x1024,128x1024"
# --cost-table: the matrices of dmuon bench's model and the MoE expert shapes.
COST_SHAPES = "6144x2048,2048x2048,8192x2048,2048x8192,1408x2048,2048x7168"
# --products: output sizes M from small to large at the aspect ratios NS meets (K = M, 4M).
PRODUCT_SHAPES = ("256x1024,512x512,512x2048,1024x1024,1024x4096,1408x1408,1408x2048,"
                  "2048x2048,2048x7168,2048x8192,4096x4096,4096x16384,8192x8192")


def parse_shape(text: str) -> tuple[int, int, int]:
    dims = [int(d) for d in text.lower().split("x")]
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: use MxN or BxMxN")
    return dims[0], dims[1], dims[2]


def restart_of(args: argparse.Namespace, dtype: torch.dtype) -> int:
    return gram_restart(dtype) if args.restart is None else args.restart


def path_of(method: str, m: int, n: int, steps: int, restart: int) -> str:
    if method == "gram":
        return "gram" if gram_is_cheaper(m, n, steps, restart) else "standard (fallback)"
    return "standard"


def deepspeed_gram() -> tuple[Callable[[torch.Tensor, int], torch.Tensor], torch.dtype]:
    """DeepSpeed's Gram Newton-Schulz as DeepSpeed runs it (``torch.compile``d) and its compute
    dtype (fp16 where the accelerator has it)."""
    try:
        from deepspeed.runtime.zero.muon import original_muon
    except ImportError as e:
        raise SystemExit(f"--methods deepspeed: DeepSpeed is not importable ({e})") from None
    return original_muon.zeropower_via_gram_newtonschulz, original_muon.ns_compute_dtype("gram")


def deepspeed_eager(X: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """DeepSpeed's Gram NS without its torch.compile, computing in ``dtype`` whatever its
    accelerator would pick (its CPU accelerator picks fp32; GPUs fp16)."""
    from deepspeed.runtime.zero.muon import original_muon

    fn = original_muon.zeropower_via_gram_newtonschulz
    choose = original_muon.ns_compute_dtype
    original_muon.ns_compute_dtype = lambda method="gram": dtype
    try:
        return getattr(fn, "_torchdynamo_orig_callable", fn)(X, steps)
    finally:
        original_muon.ns_compute_dtype = choose


def deepspeed_flops(m: int, n: int, steps: int) -> float:
    """DeepSpeed's Gram NS: Gram with one restart (after step 2) unless the matrix is square."""
    if m == n or steps <= 2:
        return newton_schulz_flops(m, n, steps)
    a, b = min(m, n), max(m, n)
    return float(2 * 4 * a * a * b + (4 * steps - 3 * 2) * 2 * a**3)


def run_timing(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for b, m, n in args.shapes:
        X = torch.randn(b, m, n, device=device, generator=gen)
        for dtype in args.dtypes:
            for schedule in args.schedules:
                base = None
                for method in args.methods:
                    std_flops = b * newton_schulz_flops(m, n, args.steps)
                    if method == "deepspeed":
                        if schedule != "jordan" or dtype != args.dtypes[0]:
                            continue  # Jordan's coefficients in its own dtype only: once
                        fn, ds_dtype = deepspeed_gram()
                        runs = [("-", functools.partial(fn, X, args.steps),
                                 b * deepspeed_flops(m, n, args.steps),
                                 "standard" if m == n else "gram",
                                 str(ds_dtype).removeprefix("torch."))]
                    else:
                        restart = restart_of(args, dtype)
                        flops = b * newton_schulz_flops(m, n, args.steps, method, restart)
                        runs = [(kernel, functools.partial(
                                    orthogonalize, X, schedule, args.steps, dtype, method=method,
                                    restart=restart, kernel=kernel), flops,
                                 path_of(method, m, n, args.steps, restart),
                                 str(dtype).removeprefix("torch."))
                                for kernel in args.kernels]
                    for kernel, call, flops, path, dtype_name in runs:
                        if kernel == "triton" and dtype == torch.float32:
                            continue  # the kernel is bf16/fp16 only
                        seconds = time_call(call, device, args.warmup, args.iters)
                        if base is None and method == "standard":
                            base = seconds  # the first standard row: torch unless --kernels
                        rows.append({
                            "shape": [b, m, n], "dtype": dtype_name, "schedule": schedule,
                            "method": method, "kernel": kernel, "path": path,
                            "restart": (restart_of(args, dtype) if path == "gram"
                                        and method != "deepspeed" else None),
                            "ms": seconds * 1e3, "gflop": flops / 1e9,
                            "tflops": flops / seconds / 1e12,
                            "std_eq_tflops": std_flops / seconds / 1e12,
                            "speedup": base / seconds if base else None,
                        })
                        print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'shape':>16} {'dtype':>8} {'schedule':>13} {'method':>9} {'kernel':>6} "
              f"{'path':>19} {'ms':>9} {'GFLOP':>8} {'TFLOP/s':>8} {'std-eq TFLOP/s':>14} "
              f"{'speedup':>7}")
    shape = "x".join(str(d) for d in r["shape"])
    speedup = f"{r['speedup']:.2f}" if r["speedup"] else "-"
    print(f"{shape:>16} {r['dtype']:>8} {r['schedule']:>13} {r['method']:>9} {r['kernel']:>6} "
          f"{r['path']:>19} {r['ms']:9.3f} {r['gflop']:8.2f} {r['tflops']:8.2f} "
          f"{r['std_eq_tflops']:14.2f} {speedup:>7}", flush=True)


def run_products(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], int | None]:
    """Time each symmetric product of a NS step by torch and by the kernel; return the rows and
    the smallest M from which the kernel wins both products at every larger M measured."""
    if not symmetric_kernel_available(device):
        raise SystemExit("--products needs CUDA and Triton (the kernel runs nowhere else)")
    from distributed_muon.symmetric import symmetric_matmul

    rows = []
    dtype = args.dtypes[0]
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{'product':>10} {'shape':>14} {'torch ms':>9} {'kernel ms':>9} {'torch TF/s':>10} "
          f"{'kernel TF/s':>11} {'speedup':>7}")
    for b, m, k in args.shapes:
        X = (torch.randn(b, m, k, device=device, generator=gen) / k**0.5).to(dtype)
        A = torch.bmm(X, X.mT)
        cases = {
            "X X^T": (2.0 * b * m * m * k, lambda X=X: torch.bmm(X, X.mT),
                      lambda X=X: symmetric_matmul(X, X.mT)),
            "bA + cAA": (2.0 * b * m**3, lambda A=A: torch.baddbmm(A, A, A, beta=-4.775,
                                                                   alpha=2.0315),
                         lambda A=A: symmetric_matmul(A, A, alpha=2.0315, beta=-4.775, D=A)),
        }
        for name, (flops, torch_call, kernel_call) in cases.items():
            t_torch = time_call(torch_call, device, args.warmup, args.iters)
            t_kernel = time_call(kernel_call, device, args.warmup, args.iters)
            rows.append({"product": name, "shape": [b, m, k], "torch_ms": t_torch * 1e3,
                         "kernel_ms": t_kernel * 1e3, "torch_tflops": flops / t_torch / 1e12,
                         "kernel_tflops": flops / t_kernel / 1e12,
                         "speedup": t_torch / t_kernel})
            r = rows[-1]
            print(f"{name:>10} {'x'.join(map(str, r['shape'])):>14} {r['torch_ms']:9.3f} "
                  f"{r['kernel_ms']:9.3f} {r['torch_tflops']:10.1f} {r['kernel_tflops']:11.1f} "
                  f"{r['speedup']:7.2f}", flush=True)
    wins: dict[int, bool] = {}
    for r in rows:
        m = r["shape"][1]
        wins[m] = wins.get(m, True) and r["speedup"] > 1.0
    threshold = None
    for m in sorted(wins, reverse=True):
        if not wins[m]:
            break
        threshold = m
    print(f"# the kernel wins every product from M = {threshold} up (SYMMETRIC_MIN_SIZE)"
          if threshold else "# the kernel does not win at the largest M measured")
    return rows, threshold


def write_cost_table(args: argparse.Namespace, device: torch.device) -> CostTable:
    if any(b != 1 for b, _, _ in args.shapes) or "deepspeed" in args.methods:
        raise SystemExit("--cost-table: shapes are MxN and methods standard/gram")
    options = [NSOptions(schedule=args.schedules[0], steps=args.steps, dtype=dtype, eps=1e-7,
                         scale="none", method=method, restart=args.restart)
               for dtype in args.dtypes for method in args.methods]
    table = measure([(m, n) for _, m, n in args.shapes], options, device, batch=args.batch,
                    warmup=args.warmup, iters=args.iters, progress=print)
    table.save(args.cost_table)
    print(f"# wrote {args.cost_table} ({len(table.seconds)} entries, {table.device})")
    return table


def matmul_peak(device: torch.device) -> float:
    """TFLOP/s of one bf16 ``n x n x n`` matmul (8192 on a GPU, 1024 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_call(lambda: a @ b, device, 3, 10)
    tflops = 2.0 * n**3 / seconds / 1e12
    print(f"# bf16 matmul {n}^3: {tflops:.1f} TFLOP/s", flush=True)
    return tflops


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
    print(f"{'shape':>10} {'input':>8} {'schedule':>13} {'method':>9} {'dtype':>8} "
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
                    if method == "deepspeed" and schedule != "jordan":
                        continue
                    for dtype in ([torch.float16] if method == "deepspeed" else args.dtypes):
                        if method == "deepspeed":
                            O = deepspeed_eager(X, args.steps, dtype).double().cpu()
                            path = "gram" if m != n else "standard"
                        else:
                            O = orthogonalize(X, schedule, args.steps, dtype, method=method,
                                              restart=args.restart).double().cpu()
                            path = path_of(method, m, n, args.steps, restart_of(args, dtype))
                        sv = torch.linalg.svdvals(O)
                        row = {
                            "shape": [m, n], "input": kind, "schedule": schedule,
                            "method": method, "path": path,
                            "restart": (restart_of(args, dtype) if path == "gram"
                                        and method != "deepspeed" else None),
                            "dtype": str(dtype).removeprefix("torch."),
                            "err_uv": float((O - polar).norm() / polar.norm()),
                            "err_ns": float((O - exact).norm() / exact.norm()),
                            "band": [float(sv.min()), float(sv.max())],
                        }
                        rows.append(row)
                        print(f"{m:>4}x{n:<5} {kind:>8} {schedule:>13} {method:>9} "
                              f"{row['dtype']:>8} {row['err_uv']:8.4f} {row['err_ns']:9.2e} "
                              f"[{row['band'][0]:.3f}, {row['band'][1]:.3f}]", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated MxN or BxMxN (default {DEFAULT_SHAPES}; "
                        f"with --accuracy {ACCURACY_SHAPES})")
    p.add_argument("--dtypes", default=None, help="default bf16,fp32 (--products: bf16)")
    p.add_argument("--schedules", default=None,
                   help="default jordan (timing), jordan,polar_express (--accuracy)")
    p.add_argument("--methods", default="standard,gram",
                   help="standard, gram, deepspeed (DeepSpeed's Gram NS, where installed)")
    p.add_argument("--kernels", default=None,
                   help="symmetric products by torch, triton or auto (default torch,triton where "
                        "the kernel runs, else torch)")
    p.add_argument("--products", action="store_true",
                   help="time the symmetric-product kernel against torch per product and size "
                        f"(default shapes {PRODUCT_SHAPES})")
    p.add_argument("--peak", action="store_true", help="also measure the bf16 matmul peak")
    p.add_argument("--cost-table", default=None, metavar="PATH",
                   help="measure the per-shape NS cost table for the plan and write it here "
                        f"(default shapes {COST_SHAPES})")
    p.add_argument("--batch", type=int, default=4,
                   help="--cost-table: matrices per timed call (the seconds are per matrix)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--restart", type=int, default=None,
                   help="Gram: restart from X every this many steps (0: never; default "
                   f"{GRAM_RESTART}, {GRAM_RESTART_FP16} in fp16)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--accuracy", action="store_true",
                   help="measure errors against the SVD polar factor instead of time")
    p.add_argument("--inputs", default="gauss,cond1e3", help="--accuracy inputs")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.accuracy + args.products + (args.cost_table is not None) > 1:
        p.error("--accuracy, --products and --cost-table measure different things: choose one")
    default_shapes = (ACCURACY_SHAPES if args.accuracy else PRODUCT_SHAPES if args.products
                      else COST_SHAPES if args.cost_table else DEFAULT_SHAPES)
    args.shapes = [parse_shape(s) for s in (args.shapes or default_shapes).split(",")]
    args.dtypes = [parse_dtype(d, "--dtypes", NS_DTYPES) for d in
                   (args.dtypes or ("bf16" if args.products else "bf16,fp32")).split(",")]
    args.kernels = (args.kernels or ("torch,triton" if symmetric_kernel_available(device)
                                     else "torch")).split(",")
    bad = [k for k in args.kernels if k not in ("torch", "triton", "auto")]
    bad += [m for m in args.methods.split(",") if m not in ("standard", "gram", "deepspeed")]
    if bad:
        p.error(f"unknown --kernels/--methods value(s) {bad}")
    args.schedules = (args.schedules or ("jordan,polar_express" if args.accuracy else "jordan")
                      ).split(",")
    args.methods = args.methods.split(",")
    args.inputs = args.inputs.split(",")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows mean fp32
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"# cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    extra: dict = {}
    if args.peak:
        extra["bf16_matmul_peak_tflops"] = matmul_peak(device)
    if args.cost_table:
        write_cost_table(args, device)
        return
    if args.accuracy:
        rows = run_accuracy(args, device)
    elif args.products:
        rows, extra["symmetric_min_size"] = run_products(args, device)
    else:
        rows = run_timing(args, device)
    if args.json:
        report = {
            "command": " ".join(["python", *sys.argv]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "steps": args.steps,
            "restart": "per dtype" if args.restart is None else args.restart,
            "kind": "accuracy" if args.accuracy else "products" if args.products else "timing",
            **extra, "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
