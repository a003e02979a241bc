"""Setup time and host memory of one rank as the world grows, from simulated ranks.

For each world size N, in a fresh process: compute every rank's regions of a model under a
layout (`distributed_muon.cluster`, the simulation: each real rank computes only its own),
pickle each rank's metadata as ``all_gather_object`` ships it, then time what ONE rank does at
setup, with the engine's own code:

1. ``unpickle``: deserialize the N received payloads (what ``all_gather_object`` does);
2. ``layout``: `ShardLayout.from_gathered` (digest check, tables per parameter, cut into pieces,
   tiling validation);
3. ``plan``: NS costs and `OwnershipPlan.build` (LPT);
4. ``exchange``: `Exchange` construction on the ``meta`` device (routing of this rank's pieces,
   every copy view; no buffer memory).

Times are those of the run with the least CPU time of ``--repeat`` runs, wall and CPU
(``time.process_time``: on a shared machine, wall time includes waiting for a core);
memory is the peak traced by ``tracemalloc`` during steps 1-4 (a second pass: tracing slows
Python down), plus the received payload bytes, which a real rank holds too. The rank
measured is ``--rank`` (default 0).

    python scripts/bench_setup.py --model deepseek-v3 --layout fsdp2 --ep 64 \\
        --worlds 64 256 1024 4096 --json setup.json
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch
from distributed_muon.launch.layouts import units
from distributed_muon.launch.model_configs import load_model

from distributed_muon.cluster import ParallelLayout
from distributed_muon.exchange import Exchange
from distributed_muon.layout import ShardLayout, params_digest
from distributed_muon.plan import OwnershipPlan, ns_flops


def _payloads(unit, keys) -> list[bytes]:
    """Every rank's `metadata` of the unit, pickled as all_gather_object sends it."""
    world = len(unit.ranks)
    digest = params_digest(unit.specs, keys)
    rows = np.concatenate([np.concatenate([np.full((len(t), 1), p, dtype=np.int64), t], axis=1)
                           for p, t in enumerate(unit.tables)])
    rows = rows[np.argsort(rows[:, 1], kind="stable")]  # by rank, then parameter order
    bounds = np.searchsorted(rows[:, 1], np.arange(world + 1))
    return [pickle.dumps((len(unit.specs), digest, rows[bounds[r]:bounds[r + 1]]))
            for r in range(world)]


def _setup(unit, keys, payloads: list[bytes], rank: int) -> dict[str, float]:
    """One rank's setup, phase by phase: wall seconds, and CPU seconds (``*_cpu``) of this
    process, which other work on a shared machine does not inflate."""
    marks = [(time.perf_counter(), time.process_time())]
    everything = [pickle.loads(b) for b in payloads]
    marks.append((time.perf_counter(), time.process_time()))
    layout = ShardLayout.from_gathered(unit.specs, keys, everything, rank)
    marks.append((time.perf_counter(), time.process_time()))
    costs = [ns_flops(m.m, m.n, 5) for m in layout.matrices]
    plan = OwnershipPlan.build(layout, costs, "lpt")
    marks.append((time.perf_counter(), time.process_time()))
    mine = everything[rank][2]
    shapes = []
    for p in range(len(unit.specs)):
        rows = mine[mine[:, 0] == p]
        shapes.append(torch.Size([int((rows[:, 9] + rows[:, 8] - rows[:, 7]).max())
                                  if len(rows) else 0]))
    ex = Exchange(layout, plan, None, shapes, torch.device("meta"), torch.bfloat16)
    marks.append((time.perf_counter(), time.process_time()))
    out = {}
    for i, name in enumerate(("unpickle", "layout", "plan", "exchange")):
        out[name] = marks[i + 1][0] - marks[i][0]
        out[name + "_cpu"] = marks[i + 1][1] - marks[i][1]
    out["total"] = marks[-1][0] - marks[0][0]
    out["total_cpu"] = marks[-1][1] - marks[0][1]
    out["pieces"] = float(len(layout.table))
    out["copy_views"] = float(sum(len(rt.pack_dst) + len(rt.unpack_dst) + len(rt.direct_dst)
                                  for c in ex.chunks for rt in (c.to_owners, c.to_holders)))
    return out


def measure(args: argparse.Namespace, world: int) -> dict[str, float]:
    params = load_model(args.model)
    layout = ParallelLayout(args.layout, world, ep=args.ep, replicate=args.replicate)
    t0 = time.perf_counter()
    (unit,) = [u for u in units(params, layout) if u.stage == 0][:1]
    keys = ["k"] * len(unit.specs)
    payloads = _payloads(unit, keys)
    simulate = time.perf_counter() - t0
    payload_bytes = sum(len(b) for b in payloads)
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        gc.collect()
        res = _setup(unit, keys, payloads, args.rank)
        best = res if not best or res["total_cpu"] < best["total_cpu"] else best
    gc.collect()
    tracemalloc.start()
    _setup(unit, keys, payloads, args.rank)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"world": world, "simulate_s": simulate, "payload_bytes": payload_bytes,
            "peak_traced_bytes": peak, "rank_memory_bytes": peak + payload_bytes,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "matrices": sum(len(s.matrices()) for s in unit.specs), **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek-v3")
    parser.add_argument("--layout", default="fsdp2", choices=("fsdp2", "hsdp", "ddp", "zero1",
                                                              "zero3"))
    parser.add_argument("--ep", type=int, default=64)
    parser.add_argument("--replicate", type=int, default=1)
    parser.add_argument("--worlds", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one world size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return
    rows = []
    print(f"{'N':>5} {'pieces':>9} {'unpickle s':>10} {'layout s':>9} {'plan s':>7} "
          f"{'exchange s':>10} {'setup s':>8} {'setup CPU s':>11} {'memory MiB':>10} "
          f"{'RSS MiB':>8}", flush=True)
    for world in args.worlds:
        argv = [sys.executable, __file__, *sys.argv[1:], "--one", str(world)]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"N={world} failed: {out.stderr.strip().splitlines()[-1]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{world:>5} {int(r['pieces']):>9} {r['unpickle']:>10.2f} {r['layout']:>9.2f} "
              f"{r['plan']:>7.2f} {r['exchange']:>10.2f} {r['total']:>8.2f} "
              f"{r['total_cpu']:>11.2f} "
              f"{r['rank_memory_bytes'] / 2**20:>10.0f} {r['max_rss_bytes'] / 2**20:>8.0f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "one"},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
