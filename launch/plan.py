"""``dmuon plan``: what Muon's optimizer step costs on a cluster, before running it.

Builds, from metadata alone, the region tables every rank would report, the `ShardLayout`
and the `OwnershipPlan` the engine builds (the same code), then prices the step on a
hardware model: Newton-Schulz FLOPs per rank at the NS rate, bytes per rank inside and across
nodes at the link rates, and the elementwise phases at memory bandwidth. The same is done for
the alternatives: redundant NS on every rank, round-robin owners, our LPT, and whole
matrices in model order ("layer-wise": contiguous runs of equal NS cost).

A model of time, not a measurement: docs/scale.md compares it with measured steps.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from distributed_muon.launch.layouts import units

from distributed_muon.cluster import LAYOUTS, ModelParam, ParallelLayout, Unit
from distributed_muon.layout import P_MATRIX, P_RANK, P_REPLICA, P_START, P_STOP, ShardLayout
from distributed_muon.params import MatrixSpec
from distributed_muon.plan import OwnershipPlan, ns_flops, pinned_holders

STRATEGIES = ("redundant", "round_robin", "lpt", "layerwise")


@dataclass(frozen=True)
class Hardware:
    """Rates per GPU. ``peak_tflops``: dense bf16 matmul; ``ns_efficiency``: the fraction of it
    batched Newton-Schulz reaches; bandwidths in GB/s per direction: ``hbm_gbs`` memory,
    ``intra_gbs`` to a GPU of the same node (NVLink), ``inter_gbs`` to another node (the
    GPU's NIC); ``elementwise_bytes``: memory traffic per local value of the momentum and
    update phases."""

    name: str
    peak_tflops: float
    hbm_gbs: float
    intra_gbs: float
    inter_gbs: float
    gpus_per_node: int = 8
    ns_efficiency: float = 0.52
    elementwise_bytes: float = 58.0


# NVIDIA's datasheets (sources in docs/scale.md): 989 dense bf16 TFLOP/s (SXM), HBM 3.35 TB/s
# (H100) / 4.8 TB/s (H200), NVLink 900 GB/s per GPU (450 each way), one 400 Gb/s NIC per GPU
# (50 GB/s each way). ns_efficiency and elementwise_bytes: fitted to the measured N=1 H200
# step of docs/benchmarks.md (514 TFLOP/s NS; 9.7 ms momentum + update for 805M values).
HARDWARE = {
    "h100": Hardware("h100", 989.0, 3350.0, 450.0, 50.0),
    "h200": Hardware("h200", 989.0, 4800.0, 450.0, 50.0),
}


@dataclass
class Cost:
    """One strategy's predicted step over the whole job (times in ms, bytes per rank)."""

    strategy: str
    ns_flops_max: float
    ns_flops_mean: float
    imbalance: float
    ns_ms: float
    to_owners_ms: float
    to_holders_ms: float
    elementwise_ms: float
    optimizer_ms: float
    floor_ms: float
    peak_floor_ms: float
    intra_bytes_max: float
    inter_bytes_max: float
    intra_bytes_mean: float
    inter_bytes_mean: float
    # Per global rank (all stages): NS FLOPs, NS ms, bytes sent + received inside / across nodes.
    per_rank: dict[str, list[float]]


def layerwise_owners(layout: ShardLayout, costs: Sequence[float]) -> list[int]:
    """Whole matrices in model order, cut into ``world`` contiguous runs of equal NS cost
    (pinned matrices stay with their holder, as in every strategy)."""
    world = layout.world_size
    pinned = pinned_holders(layout).tolist()
    free = [i for i, h in enumerate(pinned) if h < 0]
    total = sum(costs[i] for i in free) or 1.0
    owner = list(pinned)
    done = 0.0
    for i in free:
        owner[i] = min(world - 1, int((done + costs[i] / 2) * world / total))
        done += costs[i]
    return owner


def _directions(unit: Unit, layout: ShardLayout, plan: OwnershipPlan,
                gpus_per_node: int) -> np.ndarray:
    """Values per rank ``[world, direction (to owners, to holders), link (intra, inter),
    (sent, received)]``, self-copies excluded."""
    t, world = layout.table, layout.world_size
    owner = np.asarray(plan.owner, dtype=np.int64)[t[:, P_MATRIX]]
    source = np.asarray(plan.source, dtype=np.int64)[t[:, P_MATRIX]]
    moved = t[:, P_RANK] != owner
    holder, owner = t[moved, P_RANK], owner[moved]
    size = (t[moved, P_STOP] - t[moved, P_START]).astype(np.float64)
    in_source = t[moved, P_REPLICA] == source[moved]
    inter = (unit.ranks[holder] // gpus_per_node) != (unit.ranks[owner] // gpus_per_node)
    out = np.zeros((world, 2, 2, 2))
    for d, (src, dst, w) in enumerate(((holder, owner, size * in_source),
                                       (owner, holder, size))):
        for link, mask in enumerate((~inter, inter)):
            out[:, d, link, 0] = np.bincount(src[mask], weights=w[mask], minlength=world)
            out[:, d, link, 1] = np.bincount(dst[mask], weights=w[mask], minlength=world)
    return out


def _local_values(unit: Unit) -> np.ndarray:
    """Values each rank holds of the unit's parameters."""
    world = len(unit.ranks)
    held = np.zeros(world)
    for t in unit.tables:
        if len(t):
            held += np.bincount(t[:, 0], weights=(t[:, 7] - t[:, 6]).astype(np.float64),
                                minlength=world)
    return held


@dataclass
class _UnitCost:
    flops: np.ndarray  # per rank
    ns_ms: float
    to_owners_ms: float
    to_holders_ms: float
    elementwise_ms: float
    floor_ms: float
    peak_floor_ms: float
    intra: np.ndarray  # bytes per rank (sent + received, both directions)
    inter: np.ndarray


def price_unit(unit: Unit, strategy: str, hw: Hardware, steps: int = 5,
               itemsize: int = 2, cost: Callable[[int, int], float] | None = None) -> _UnitCost:
    """Predicted cost of one unit's step under ``strategy``. ``cost(m, n)``: NS FLOPs of an
    ``m x n`` matrix (default: `ns_flops` with ``steps`` standard quintic steps)."""
    if cost is None:
        def cost(m: int, n: int) -> float:
            return ns_flops(m, n, steps)
    layout = unit.layout(0)
    world = layout.world_size
    costs = [cost(m.m, m.n) for m in layout.matrices]
    total = sum(costs)
    rate = hw.peak_tflops * 1e12 * hw.ns_efficiency / 1e3  # FLOP per ms
    spans_nodes = len(set((unit.ranks // hw.gpus_per_node).tolist())) > 1
    elementwise = float(_local_values(unit).max(initial=0.0)) * hw.elementwise_bytes / (
        hw.hbm_gbs * 1e6)
    if strategy == "redundant":
        # Every rank all-gathers every matrix of the group and orthogonalizes all of them.
        values = sum(m.m * m.n for m in layout.matrices)
        held = _local_values(unit)
        recv = (values - held) * itemsize
        bw = hw.inter_gbs if spans_nodes else hw.intra_gbs
        gather = float(recv.max(initial=0.0)) / (bw * 1e6)
        flops = np.full(world, total)
        link = np.zeros(world)
        intra, inter = (link, recv) if spans_nodes else (recv, link)
        best = price_unit(unit, "lpt", hw, steps, itemsize, cost)  # the floor is the layout's
        return _UnitCost(flops, total / rate, gather, 0.0, elementwise, best.floor_ms,
                         best.peak_floor_ms, intra, inter)
    if strategy == "layerwise":
        plan = OwnershipPlan.from_owners(layout, layerwise_owners(layout, costs), costs)
    else:
        plan = OwnershipPlan.build(layout, costs, strategy)
    flops = np.asarray(plan.rank_costs())
    moved = _directions(unit, layout, plan, hw.gpus_per_node) * itemsize
    bw = np.array([hw.intra_gbs, hw.inter_gbs]) * 1e6  # bytes per ms
    # A direction lasts as long as its slowest rank's busiest link (send or receive).
    per_dir = (moved.max(axis=3) / bw[None, None, :]).max(axis=2).max(axis=0)
    even = (moved.sum(axis=0).max(axis=2) / world / bw[None, :]).max(axis=1).sum()
    return _UnitCost(
        flops, float(flops.max(initial=0.0)) / rate, float(per_dir[0]), float(per_dir[1]),
        elementwise, total / world / rate + float(even),
        total / world / (hw.peak_tflops * 1e9) + float(even),
        moved[:, :, 0, :].sum(axis=(1, 2)), moved[:, :, 1, :].sum(axis=(1, 2)))


def predict(all_units: list[Unit], strategy: str, hw: Hardware, steps: int = 5,
            itemsize: int = 2, cost: Callable[[int, int], float] | None = None) -> Cost:
    """The whole job: units of a stage one after another, stages (and copies of a unit)
    side by side."""
    world = max(int(u.ranks.max()) + 1 + (u.copies - 1) * u.copy_stride for u in all_units)
    flops, intra, inter = np.zeros(world), np.zeros(world), np.zeros(world)
    by_stage: dict[int, list[_UnitCost]] = {}
    for unit in all_units:
        uc = price_unit(unit, strategy, hw, steps, itemsize, cost)
        by_stage.setdefault(unit.stage, []).append(uc)
        for c in range(unit.copies):
            ranks = unit.ranks + c * unit.copy_stride
            np.add.at(flops, ranks, uc.flops)
            np.add.at(intra, ranks, uc.intra)
            np.add.at(inter, ranks, uc.inter)

    def stage_sum(costs: list[_UnitCost], key: str) -> float:
        return sum(getattr(c, key) for c in costs)

    def total_ms(costs: list[_UnitCost]) -> float:
        return sum(c.ns_ms + c.to_owners_ms + c.to_holders_ms + c.elementwise_ms for c in costs)

    worst = max(by_stage.values(), key=total_ms)
    mean = float(flops.mean())
    return Cost(
        strategy=strategy,
        ns_flops_max=float(flops.max()), ns_flops_mean=mean,
        imbalance=float(flops.max()) / mean if mean else 1.0,
        ns_ms=stage_sum(worst, "ns_ms"), to_owners_ms=stage_sum(worst, "to_owners_ms"),
        to_holders_ms=stage_sum(worst, "to_holders_ms"),
        elementwise_ms=stage_sum(worst, "elementwise_ms"), optimizer_ms=total_ms(worst),
        floor_ms=max(stage_sum(c, "floor_ms") + stage_sum(c, "elementwise_ms")
                     for c in by_stage.values()),
        peak_floor_ms=max(stage_sum(c, "peak_floor_ms") for c in by_stage.values()),
        intra_bytes_max=float(intra.max()), inter_bytes_max=float(inter.max()),
        intra_bytes_mean=float(intra.mean()), inter_bytes_mean=float(inter.mean()),
        per_rank={"ns_flops": flops.tolist(),
                  "ns_ms": (flops / (hw.peak_tflops * 1e9 * hw.ns_efficiency)).tolist(),
                  "intra_bytes": intra.tolist(), "inter_bytes": inter.tolist()},
    )


# ------------------------------------------------------------------ the command


@dataclass(frozen=True)
class PlanConfig:
    """What `dmuon plan` prices (flags are these fields)."""

    model: str
    layout: str
    gpus: int
    tp: int
    ep: int
    pp: int
    replicate: int
    hardware: str
    gpus_per_node: int | None
    peak_tflops: float | None
    ns_efficiency: float | None
    hbm_gbs: float | None
    intra_gbs: float | None
    inter_gbs: float | None
    ns_steps: int
    comm_bytes: int
    strategies: tuple[str, ...]
    per_head: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from distributed_muon.launch.model_configs import MODELS

    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(MODELS)}) or a Hugging Face config.json")
    parser.add_argument("--layout", choices=LAYOUTS, default="fsdp2",
                        help="how the job shards the model")
    parser.add_argument("--gpus", type=int, required=True, help="ranks in the job")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel (megatron)")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    parser.add_argument("--replicate", type=int, default=1, help="HSDP replica groups")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h100",
                        help="the GPU model priced")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the "
                        "hardware's)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU")
    parser.add_argument("--ns-efficiency", type=float,
                        help="fraction of the peak Newton-Schulz reaches")
    parser.add_argument("--hbm-gbs", type=float, help="memory GB/s per GPU")
    parser.add_argument("--intra-gbs", type=float, help="GB/s per GPU each way inside a node")
    parser.add_argument("--inter-gbs", type=float, help="GB/s per GPU each way across nodes")
    parser.add_argument("--ns-steps", type=int, default=5, help="Newton-Schulz iterations")
    parser.add_argument("--comm-bytes", type=int, choices=(2, 4), default=2,
                        help="bytes per value exchanged (bf16: 2, fp32: 4)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                        help="ownership strategies to compare")
    parser.add_argument("--per-head", action="store_true",
                        help="attention Q, K, V split into one matrix per head (as dmuon train "
                        "--per-head)")
    parser.add_argument("--json", help="also write the result as JSON here")


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    return PlanConfig(**{f.name: (tuple(getattr(args, f.name)) if f.name == "strategies"
                                  else getattr(args, f.name)) for f in fields(PlanConfig)})


def hardware_of(cfg: PlanConfig) -> Hardware:
    hw = HARDWARE[cfg.hardware]
    overrides = {k: getattr(cfg, k) for k in ("gpus_per_node", "peak_tflops", "ns_efficiency",
                                              "hbm_gbs", "intra_gbs", "inter_gbs")
                 if getattr(cfg, k) is not None}
    for key, value in overrides.items():
        if value <= 0 or (key == "ns_efficiency" and value > 1):
            raise ValueError(f"--{key.replace('_', '-')} {value}: must be positive"
                             + (" and at most 1" if key == "ns_efficiency" else ""))
    return replace(hw, **overrides)


# Pieces a plan may build (int64 rows of 11 columns: about 90 bytes each).
MAX_PIECES = 30_000_000


def run_plan(cfg: PlanConfig, params: list[ModelParam] | None = None) -> dict[str, Any]:
    """Build the layouts and price every strategy; the JSON-able result."""
    from distributed_muon.launch.model_configs import load_model

    # Checked here, by flag name (the core names them world=, tp=, ...).
    for name in ("gpus", "tp", "ep", "pp", "replicate", "ns_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at "
                             "least 1")
    hw = hardware_of(cfg)
    if params is None:
        params = load_model(cfg.model, per_head=cfg.per_head)
    if not params:
        raise ValueError(f"--model {cfg.model}: no Muon matrices")
    layout = ParallelLayout(cfg.layout, cfg.gpus, tp=cfg.tp, ep=cfg.ep, pp=cfg.pp,
                            replicate=cfg.replicate)
    matrices = sum(len(MatrixSpec.of(p.shape, p.row_blocks).matrices()) for p in params)
    if cfg.layout == "ddp" and matrices * cfg.gpus > MAX_PIECES:
        raise ValueError(f"ddp: {matrices} matrices x {cfg.gpus} replicas is too many pieces "
                         "to plan; DDP is not a layout for this size (try fsdp2 or hsdp)")
    start = time.perf_counter()
    all_units = units(params, layout)
    for unit in all_units:
        unit.layout(0)
    setup_s = time.perf_counter() - start
    costs = [predict(all_units, s, hw, cfg.ns_steps, cfg.comm_bytes) for s in cfg.strategies]
    return {
        "model": cfg.model,
        "layout": asdict(layout),
        "hardware": asdict(hw),
        "ns_steps": cfg.ns_steps,
        "comm_bytes": cfg.comm_bytes,
        "muon_parameters": len(params),
        "matrices": matrices,
        "muon_values": sum(math.prod(p.shape) for p in params),
        "units": [{"name": u.name, "stage": u.stage, "ranks": len(u.ranks), "copies": u.copies,
                   "parameters": len(u.specs), "matrices": len(u.layout(0).matrices),
                   "pieces": int(len(u.layout(0).table))} for u in all_units],
        "setup_seconds": setup_s,
        "strategies": [asdict(c) for c in costs],
    }


def format_table(result: dict[str, Any]) -> str:
    lay, hw = result["layout"], result["hardware"]
    head = (f"{result['model']}: {result['matrices']} matrices, "
            f"{result['muon_values'] / 1e9:.2f}B Muon values; {lay['kind']} on {lay['world']} "
            f"GPUs (tp {lay['tp']}, ep {lay['ep']}, pp {lay['pp']}, replicate {lay['replicate']})"
            f", {hw['name']} x{hw['gpus_per_node']} per node; {len(result['units'])} exchange "
            f"group(s), layouts built in {result['setup_seconds']:.2f} s")
    cols = ("strategy", "NS TFLOP max", "imbal", "NS ms", "to_own ms", "to_hold ms",
            "elem ms", "optim ms", "floor ms", "intra GB", "inter GB")
    rows = [cols]
    for c in result["strategies"]:
        rows.append((c["strategy"], f"{c['ns_flops_max'] / 1e12:.2f}", f"{c['imbalance']:.3f}",
                     f"{c['ns_ms']:.1f}", f"{c['to_owners_ms']:.1f}", f"{c['to_holders_ms']:.1f}",
                     f"{c['elementwise_ms']:.1f}", f"{c['optimizer_ms']:.1f}",
                     f"{c['floor_ms']:.1f}", f"{c['intra_bytes_max'] / 1e9:.2f}",
                     f"{c['inter_bytes_max'] / 1e9:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head, ""]
    for r in rows:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    lines.append("")
    lines.append("per rank, the busiest: NS TFLOP, intra/inter-node GB sent + received per step; "
                 "floor: perfect NS balance and evenly spread bytes at the same rates")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run_plan(cfg)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0
