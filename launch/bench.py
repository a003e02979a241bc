"""`dmuon bench`: time the optimizer step, phase by phase, on N ranks.

Parameters of the given shapes are sharded as FSDP2 shards them (DTensor ``Shard(0)``) or
replicated as under DDP; gradients are random. Each rank times every phase with device
synchronization (`DistributedMuon.profile`); rank 0 reports medians over steps, bytes moved,
planned and measured NS imbalance, achieved NS TFLOP/s and, measured in the same run, the
device's bf16 matmul rate, and rank 0's optimizer memory by kind
(`DistributedMuon.memory_bytes`) with, on CUDA, the measured ``max_memory_allocated`` of the
timed steps. ``--exchange-chunks K`` pipelines the exchange with NS; the phases
then overlap and mean what `distributed_muon.diagnostics.PHASES` says.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from distributed_muon.launch.flags import check_optimizer_options, optimizer_option, option
from distributed_muon.launch.local import (
    end_process_group,
    env_world_size,
    init_process_group_from_env,
    launched_externally,
    leads_job,
    spawn,
)

from distributed_muon.cost import flop_cost
from distributed_muon.dtypes import NS_DTYPES, parse_dtype
from distributed_muon.optimizer import PHASES, DistributedMuon
from distributed_muon.options import OPTIONS

# A d=2048, 16-layer transformer's matrices as [out, in]: qkv, proj, fc1, fc2 (~0.8B values).
DEFAULT_SHAPES = "6144x2048,2048x2048,8192x2048,2048x8192"
DEFAULT_LAYERS = 16
# On a CPU the GPU-sized default takes many minutes a step: a d=512 layer, 4 times, instead.
CPU_SHAPES = "1536x512,512x512,2048x512,512x2048"
CPU_LAYERS = 4


@dataclass
class BenchConfig:
    shapes: str | None = option(
        None, "matrices of one layer, [out]x[in] or ExMxN, comma-separated (default "
        f"{DEFAULT_SHAPES}, a d=2048 transformer layer, on GPUs; {CPU_SHAPES} on CPUs)")
    layers: int | None = option(
        None, f"repeat the shapes (default {DEFAULT_LAYERS} on GPUs, {CPU_LAYERS} on CPUs)")
    nproc: int = option(1, "local ranks to start (ignored under torchrun/srun)")
    layout: str = option("fsdp2", "how parameters are held", choices=("fsdp2", "replicated"))
    steps: int = option(10, "timed steps")
    warmup: int = option(3, "untimed steps first")
    device: str = option("auto", "auto: CUDA when available", choices=("auto", "cpu", "cuda"))
    ns_dtype: str | None = optimizer_option(
        "ns_dtype", default=None, why="CPUs' half-precision matmuls are slow",
        note="default the optimizer's on GPUs, fp32 on CPUs")
    ns_method: str = optimizer_option("ns_method")
    comm_dtype: str = optimizer_option("comm_dtype")
    owner_strategy: str = optimizer_option("owner_strategy")
    ns_cost: str | None = optimizer_option(
        "ns_cost", note="written by scripts/bench_ns.py --cost-table")
    exchange_chunks: int = optimizer_option("exchange_chunks")
    json: str | None = option(None, "also write the results as JSON to this file")

    def resolved(self) -> BenchConfig:
        """Checked, with device-sized defaults filled in."""
        if self.nproc < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--nproc {self.nproc}, --steps {self.steps}, --warmup "
                             f"{self.warmup}: need --nproc >= 1, --steps >= 1, --warmup >= 0")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"--layers {self.layers}: must be at least 1")
        check_optimizer_options(self)  # a bad cost table is one line here, not a traceback
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here; use --device cpu")
        cuda = torch.cuda.is_available() and self.device != "cpu"
        shapes = self.shapes or (DEFAULT_SHAPES if cuda else CPU_SHAPES)
        parse_shapes(shapes)
        layers = self.layers or (DEFAULT_LAYERS if cuda else CPU_LAYERS)
        ns_dtype = self.ns_dtype or (OPTIONS["ns_dtype"].default if cuda else "fp32")
        return replace(self, shapes=shapes, layers=layers, ns_dtype=ns_dtype)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"6144x2048,4x512x256"`` -> ``[(6144, 2048), (4, 512, 256)]``."""
    try:
        shapes = [tuple(int(d) for d in part.split("x")) for part in text.split(",") if part]
    except ValueError:
        raise ValueError(f"--shapes {text!r}: use comma-separated MxN or ExMxN") from None
    if not shapes or any(len(s) not in (2, 3) or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes {text!r}: use comma-separated MxN or ExMxN")
    return shapes


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved TFLOP/s of a large square matmul on this device (8192 on GPU, 512 on CPU)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def flop_rate_unit(tflops: float) -> tuple[float, str]:
    """The scale and unit that print ``tflops`` readably: TFLOP/s on GPUs, GFLOP/s on CPUs."""
    return (1.0, "TFLOP/s") if tflops >= 1 else (1e3, "GFLOP/s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_main(cfg: BenchConfig) -> None:
    device = init_process_group_from_env(cfg.device)
    try:
        _bench(cfg, device)
    finally:
        end_process_group()


def _bench(cfg: BenchConfig, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = parse_shapes(cfg.shapes) * cfg.layers
    gen = torch.Generator(device=device).manual_seed(1234)
    if cfg.layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh(device.type, (world,))

        def make(t: torch.Tensor) -> torch.Tensor:
            return distribute_tensor(t, mesh, [Shard(0)])
    elif cfg.layout == "replicated":
        def make(t: torch.Tensor) -> torch.Tensor:
            return t
    else:
        raise ValueError(f"--layout {cfg.layout!r}: use fsdp2 or replicated")
    params = []
    for shape in shapes:
        params.append(torch.nn.Parameter(make(torch.randn(shape, device=device, generator=gen))))
    # Named, as a model's parameters would be: all of them are hidden matrices, on Muon.
    named = [(f"matrix{i}", p) for i, p in enumerate(params)]
    opt = DistributedMuon(named, lr=1e-3, ns_dtype=cfg.ns_dtype, ns_method=cfg.ns_method,
                          comm_dtype=cfg.comm_dtype, owner_strategy=cfg.owner_strategy,
                          ns_cost=cfg.ns_cost, exchange_chunks=cfg.exchange_chunks)
    for p in params:
        p.grad = make(torch.randn(p.shape, device=device, generator=gen) * 1e-3)
    # The peak of the dtype NS runs in (a CPU's bf16 matmuls are far below its fp32 ones).
    peak = matmul_tflops(device, parse_dtype(cfg.ns_dtype, "ns_dtype", NS_DTYPES))

    per_step: list[dict[str, float]] = []
    cuda_memory: dict[str, int] | None = None
    for step in range(cfg.warmup + cfg.steps):
        opt.profile = step >= cfg.warmup
        if step == cfg.warmup and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            cuda_memory = {"allocated_before_bytes": torch.cuda.memory_allocated(device)}
        opt.phase_seconds = dict.fromkeys(PHASES, 0.0)
        dist.barrier()
        opt.step()
        if opt.profile:
            per_step.append(dict(opt.phase_seconds))
        if rank == 0:
            _progress(step + 1, cfg.warmup + cfg.steps)
    if cuda_memory is not None:
        torch.cuda.synchronize(device)
        cuda_memory["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    median = {ph: statistics.median(s[ph] for s in per_step) for ph in PHASES}
    # NS FLOPs whatever the plan balanced (FLOPs or, with --ns-cost, measured seconds).
    owned = sum(flop_cost(m.m, m.n, m.key) for m, o in zip(opt.layout.matrices, opt.plan.owner,
                                                            strict=True) if o == rank)
    sent, recv = opt.exchange.bytes_per_step
    mine = {"rank": rank, "median_s": median, "ns_flops": owned, "sent": sent, "recv": recv,
            "memory": opt.memory_bytes(), "params_bytes": _local_bytes(params),
            "grads_bytes": _local_bytes([p.grad for p in params]), "cuda_memory": cuda_memory}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        report = _report(cfg, everyone, opt, peak, device)
        print(report["text"])
        if cfg.json:
            with open(cfg.json, "w") as f:
                json.dump({k: v for k, v in report.items() if k != "text"}, f, indent=2)


def _local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of this rank's local values of ``tensors`` (a DTensor's local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def _report(cfg, ranks, opt, peak, device) -> dict:
    world = len(ranks)
    ns = [r["median_s"]["ns"] for r in ranks]
    mean_ns = sum(ns) / world
    total = [sum(r["median_s"].values()) for r in ranks]
    phase_max = {ph: max(r["median_s"][ph] for r in ranks) for ph in PHASES}
    tflops = [r["ns_flops"] / t / 1e12 if t > 0 else 0.0 for r, t in zip(ranks, ns, strict=True)]
    flops = sum(r["ns_flops"] for r in ranks)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    scale, unit = flop_rate_unit(peak)
    lines = [
        f"distributed_muon bench: {len(opt.layout.matrices)} matrices ({cfg.shapes} x "
        f"{cfg.layers}), "
        f"{sum(m.m * m.n for m in opt.layout.matrices) / 1e6:.1f}M values, layout {cfg.layout}, "
        f"N={world} on {name}, ns {cfg.ns_method} {cfg.ns_dtype}, comm {cfg.comm_dtype}, "
        f"owner strategy {cfg.owner_strategy}, exchange chunks {cfg.exchange_chunks}",
        f"{cfg.ns_dtype} matmul peak (measured): {peak * scale:.3g} {unit}; NS work "
        f"{flops / 1e12 * scale:.3g} {unit.removesuffix('/s')}/step",
        "",
        f"{'phase':<14}" + "".join(f"{'rank ' + str(r['rank']):>11}" for r in ranks)
        + f"{'max':>11}",
    ]
    for ph in PHASES:
        lines.append(f"{ph + ' ms':<14}" + "".join(f"{r['median_s'][ph] * 1e3:>11.2f}"
                                                  for r in ranks)
                     + f"{phase_max[ph] * 1e3:>11.2f}")
    lines.append(f"{'step ms':<14}" + "".join(f"{t * 1e3:>11.2f}" for t in total)
                 + f"{max(total) * 1e3:>11.2f}")
    lines.append(f"{'NS ' + unit:<14}" + "".join(f"{t * scale:>11.3g}" for t in tflops))
    lines.append(f"{'sent MB':<14}" + "".join(f"{r['sent'] / 1e6:>11.4g}" for r in ranks))
    lines.append(f"{'recv MB':<14}" + "".join(f"{r['recv'] / 1e6:>11.4g}" for r in ranks))
    measured = max(ns) / mean_ns if mean_ns > 0 else 1.0
    # On the rank with the most NS work the exchanges hold no wait for slower ranks' NS: its
    # exchange time is the transfer on the step's critical path.
    slowest = ranks[ns.index(max(ns))]["median_s"]
    exchange = slowest["to_owners"] + slowest["to_holders"]
    ratio = exchange / max(ns) if max(ns) > 0 else float("nan")
    # The FLOP floor: the busiest rank's NS work at the measured matmul rate.
    floor = max(r["ns_flops"] for r in ranks) / (peak * 1e12) if peak > 0 else float("nan")
    lines += [
        "",
        f"NS imbalance (max/mean): planned {opt.plan.imbalance():.3f}, measured {measured:.3f}",
        f"exchange / NS time on the busiest rank: {ratio:.3f}",
        f"NS time on the busiest rank: {max(ns) * 1e3:.2f} ms; its FLOP floor at the measured "
        f"matmul rate: {floor * 1e3:.2f} ms ({max(ns) / floor:.2f}x)",
    ]
    if cfg.exchange_chunks > 1:
        lines.append("(pipelined: to_owners and to_holders are the exchange left exposed; ns "
                     "also holds the waits for chunks not hidden behind NS)")
    lines += ["", *memory_lines(ranks[0])]
    return {
        "config": asdict(cfg),
        "world": world,
        "device": name,
        "matmul_peak_tflops": peak,
        "matmul_peak_dtype": cfg.ns_dtype,
        "ranks": ranks,
        "planned_imbalance": opt.plan.imbalance(),
        "measured_imbalance": measured,
        "exchange_over_ns": ratio,
        "ns_ms_max": max(ns) * 1e3,
        "ns_floor_ms": floor * 1e3,
        "step_ms_max": max(total) * 1e3,
        "memory_rank0": ranks[0]["memory"],
        "cuda_memory_rank0": ranks[0]["cuda_memory"],
        "text": "\n".join(lines),
    }


# `DistributedMuon.memory_bytes` keys, in the order and with the names the bench prints.
MEMORY_ROWS = (
    ("muon_state_bytes", "Muon momentum"),
    ("adamw_state_bytes", "AdamW state"),
    ("exchange_local_bytes", "exchange local"),
    ("exchange_batch_bytes", "exchange batch"),
    ("exchange_to_owners_send_bytes", "to_owners send"),
    ("exchange_to_owners_recv_bytes", "to_owners recv"),
    ("exchange_to_holders_send_bytes", "to_holders send"),
    ("exchange_to_holders_recv_bytes", "to_holders recv"),
    ("total_bytes", "total in a step"),
    ("between_steps_bytes", "between steps"),
)
GIB = 2**30


def memory_lines(rank: dict) -> list[str]:
    """The bench's memory breakdown of one rank's results: the optimizer's accounted bytes by
    kind (GiB and bytes per Muon parameter of that rank) and, on CUDA, the measured peak."""
    mem = rank["memory"]
    per = max(mem["muon_params"], 1)
    lines = [f"optimizer memory on rank {rank['rank']}, accounted from the tensors it holds "
             f"({mem['muon_params']} Muon values, {mem['adamw_params']} AdamW values here):",
             f"{'':<18}{'GiB':>10}{'B/Muon param':>14}"]
    lines += [f"{label:<18}{mem[key] / GIB:>10.4f}{mem[key] / per:>14.2f}"
              for key, label in MEMORY_ROWS]
    cuda = rank.get("cuda_memory")
    lines.append("(the exchange's buffers are freed between steps on accelerators; not "
                 "accounted: the Newton-Schulz workspace and other transients of a step; "
                 + ("the measured peak below holds them)" if cuda else "measured on CUDA only)"))
    if cuda:
        resident = cuda["allocated_before_bytes"]
        peak = cuda["max_allocated_bytes"]
        lines.append(
            f"CUDA memory on rank {rank['rank']} (measured): allocated before the timed steps "
            f"{resident / GIB:.3f} GiB (parameters {rank['params_bytes'] / GIB:.3f}, gradients "
            f"{rank['grads_bytes'] / GIB:.3f}, optimizer accounted between steps "
            f"{mem['between_steps_bytes'] / GIB:.3f}); max_memory_allocated during them "
            f"{peak / GIB:.3f} GiB ({(peak - resident) / GIB:.3f} GiB above)")
    return lines


def _progress(done: int, total: int) -> None:
    """One line rewritten in place on a terminal; a line per step when piped."""
    if sys.stdout.isatty():
        print(f"\rstep {done}/{total}", end="\n" if done == total else "", flush=True)
    else:
        print(f"step {done}/{total}", flush=True)


def run(cfg: BenchConfig) -> None:
    """Run the benchmark: in this process's job if launched by torchrun/srun, else on
    ``cfg.nproc`` local ranks. Raises ValueError for a bad config before any rank starts."""
    cfg = cfg.resolved()
    world = env_world_size() if launched_externally() else cfg.nproc
    if leads_job():
        print(f"benchmarking {cfg.layers} x ({cfg.shapes}) on {world} rank(s)", flush=True)
    if launched_externally():
        _rank_main(cfg)
    else:
        spawn(_rank_main, cfg.nproc, cfg)

