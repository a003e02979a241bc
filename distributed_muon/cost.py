"""What orthogonalizing one matrix costs, for the ownership plan: FLOPs, or measured seconds.

The plan balances the sum of its cost model over ranks. FLOPs (`flop_cost`) are exact and need
no device, but shapes run at different speeds (docs/benchmarks.md: the per-rank NS TFLOP/s in
"Optimizer step by phase, FSDP2 layout", and Gram's per-shape times in "After the reshape, and
Gram Newton-Schulz"), so a FLOP-balanced plan is not time-balanced. A `CostTable` holds the
measured seconds per matrix of each (shape, NS options) on one device: measured once
(`measure`, `CostTable.cached`), saved as JSON, and read by every rank. Shapes the table lacks
are priced at the speed of the nearest measured shape.

Every cost model here is an `NSCost`: ``cost(m, n, options) -> float`` for one ``m x n``
matrix with `NSOptions` ``options``. Only ratios matter to the plan, but the units of one model
must not mix (FLOPs or seconds).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from distributed_muon.orthogonalize import (
    NSOptions,
    gram_is_cheaper,
    newton_schulz_flops,
    orthogonalize,
)

NSCost = Callable[[int, int, Hashable], float]


def flop_cost(m: int, n: int, options: NSOptions) -> float:
    """Matmul FLOPs of `orthogonalize` on one ``m x n`` matrix (the path it takes)."""
    return newton_schulz_flops(m, n, options.steps, options.method, options.restart)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after ``warmup``, the device synchronized
    around each call (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
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


# A table entry's key: what decides the speed. The shape as given: NS works on a tall matrix
# through its transposed view, which may run at another speed than the wide matrix of the same
# sides (`scripts/bench_ns.py` times both orientations: docs/benchmarks.md, "After the reshape,
# and Gram Newton-Schulz"). Then the path taken (Gram only where it runs), steps, the restart
# of a Gram path, and the dtype.
Key = tuple[int, int, str, int, int, str]


def cost_key(m: int, n: int, options: NSOptions) -> Key:
    gram = options.method == "gram" and gram_is_cheaper(m, n, options.steps, options.restart)
    dtype = str(options.dtype).removeprefix("torch.")
    return (m, n, "gram" if gram else "standard", options.steps,
            options.restart if gram else 0, dtype)


def _distance(a: Key, b: Key) -> float:
    """How unlike two shapes are for speed: log-distance of their sides, plus a little for the
    other orientation (so the transposed shape is the nearest one, before any other size)."""
    (a_lo, a_hi), (b_lo, b_hi) = sorted(a[:2]), sorted(b[:2])
    flipped = (a[0] > a[1]) != (b[0] > b[1])
    return math.log(a_lo / b_lo) ** 2 + math.log(a_hi / b_hi) ** 2 + 0.01 * flipped


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass
class CostTable:
    """Measured seconds to orthogonalize one matrix, per `cost_key`, on one device.

    Called as an `NSCost`: a measured key gives its seconds; an unmeasured shape with measured
    shapes of the same path, steps, restart and dtype gives its FLOPs at the FLOP rate of the
    nearest of them (`_distance`); anything else is a `KeyError` that says how to
    measure it. ``batch`` is how many matrices of a shape each timed call orthogonalized
    together (the seconds are per matrix): owners batch same-shape matrices too.
    """

    device: str
    seconds: dict[Key, float] = field(default_factory=dict)
    batch: int = 4

    def __call__(self, m: int, n: int, options: Hashable) -> float:
        if not isinstance(options, NSOptions):
            raise TypeError(f"a CostTable prices matrices by their NSOptions, got {options!r}")
        key = cost_key(m, n, options)
        if key in self.seconds:
            return self.seconds[key]
        alike = [k for k in self.seconds if k[2:] == key[2:]]
        if not alike:
            raise KeyError(
                f"the NS cost table for {self.device} has no {key[2]} entry with {key[3]} steps "
                f"in {key[5]}: measure one for these options (python scripts/bench_ns.py "
                "--cost-table PATH --shapes ...)")
        near = min(alike, key=lambda k: (_distance(k, key), k))
        rate = _flops(near) / self.seconds[near]
        return _flops(key) / rate

    def save(self, path: str | os.PathLike) -> None:
        entries = [{"m": k[0], "n": k[1], "method": k[2], "steps": k[3], "restart": k[4],
                    "dtype": k[5], "seconds": s} for k, s in sorted(self.seconds.items())]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"device": self.device, "torch": torch.__version__, "batch": self.batch,
                       "entries": entries}, f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostTable:
        try:
            with open(path) as f:
                data = json.load(f)
            seconds = {(int(e["m"]), int(e["n"]), str(e["method"]), int(e["steps"]),
                        int(e["restart"]), str(e["dtype"])): float(e["seconds"])
                       for e in data["entries"]}
            return cls(str(data["device"]), seconds, int(data.get("batch", 4)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a readable NS cost table ({e!r}); write one with "
                             "python scripts/bench_ns.py --cost-table PATH") from None

    @classmethod
    def cached(
        cls, shapes: Iterable[tuple[int, int]], options: Iterable[NSOptions],
        device: torch.device | str, path: str | os.PathLike | None = None, **measure_kw,
    ) -> CostTable:
        """The table at ``path`` (default `default_cache_path`), measuring and adding whatever
        of ``shapes x options`` it lacks for this device; saved back when it grew."""
        path = Path(path) if path is not None else default_cache_path(device)
        table = cls.load(path) if path.exists() else cls(device_name(device))
        if table.device != device_name(device):
            table = cls(device_name(device))  # another device's speeds do not carry over
        options = list(options)
        missing = {(m, n) for m, n in shapes
                   if any(cost_key(m, n, o) not in table.seconds for o in options)}
        if missing:
            new = measure(sorted(missing), options, device, batch=table.batch, **measure_kw)
            table.seconds.update(new.seconds)
            table.save(path)
        return table


def _flops(key: Key) -> float:
    a, b, path, steps, restart, _ = key
    return newton_schulz_flops(a, b, steps, path, restart)


def default_cache_path(device: torch.device | str) -> Path:
    """``$XDG_CACHE_HOME/distributed_muon/ns-cost-<device>.json`` (``~/.cache`` by default)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device)).strip("-").lower()
    return root / "distributed_muon" / f"ns-cost-{slug}.json"


def measure(
    shapes: Iterable[tuple[int, int]], options: Iterable[NSOptions], device: torch.device | str,
    *, batch: int = 4, warmup: int = 2, iters: int = 5,
    progress: Callable[[str], None] | None = None,
) -> CostTable:
    """Time `orthogonalize` on a batch of ``batch`` random matrices per shape and options and
    return the seconds per matrix as a `CostTable` (options that take the same path share one
    measurement)."""
    device = torch.device(device)
    table = CostTable(device_name(device), batch=batch)
    gen = torch.Generator(device=device).manual_seed(0)
    for m, n in shapes:
        for opts in options:
            key = cost_key(m, n, opts)
            if key in table.seconds:
                continue
            X = torch.randn(batch, key[0], key[1], device=device, generator=gen)
            seconds = time_call(lambda X=X, opts=opts: orthogonalize(X, opts), device,
                                warmup, iters)
            table.seconds[key] = seconds / batch
            if progress:
                progress(f"{key[0]}x{key[1]} {key[2]} {key[5]}: "
                         f"{seconds / batch * 1e3:.3f} ms per matrix")
    return table


def matrix_costs(
    layout_matrices: Sequence, cost: NSCost, group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """``cost(m, n, key)`` of every layout matrix, identical on every rank of ``group``.

    A measured table can differ between ranks (each rank's own cache file); the plan must not,
    so rank 0's costs are broadcast (one collective) whenever ``cost`` is not `flop_cost`, which
    every rank computes alike.
    """
    costs = [float(cost(mat.m, mat.n, mat.key)) for mat in layout_matrices]
    if cost is flop_cost or group is None or dist.get_world_size(group) == 1:
        return costs
    values = torch.tensor(costs, dtype=torch.float64, device=device)
    dist.broadcast(values, src=dist.get_global_rank(group, 0), group=group)
    return values.tolist()


def resolve_ns_cost(ns_cost: NSCost | str | os.PathLike | None) -> NSCost:
    """The ``ns_cost`` option: None (`flop_cost`), the path of a saved `CostTable`, or any
    `NSCost` callable."""
    if ns_cost is None:
        return flop_cost
    if isinstance(ns_cost, str | os.PathLike):
        return CostTable.load(ns_cost)
    if callable(ns_cost):
        return ns_cost
    raise ValueError(f"ns_cost={ns_cost!r} is not valid: use None (FLOPs), the path of an NS "
                     "cost table (scripts/bench_ns.py --cost-table) or a callable cost(m, n, "
                     "options)")


def cost_unit(cost: NSCost) -> tuple[str, float]:
    """Column name and factor for per-rank sums of ``cost`` (`OwnershipPlan.summary`)."""
    if cost is flop_cost:
        return ("NS GFLOP", 1e-9)
    if isinstance(cost, CostTable):
        return ("NS ms", 1e3)
    return ("NS cost", 1.0)
