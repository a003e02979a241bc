"""`OwnershipPlan`: which rank orthogonalizes each logical matrix.

Longest-processing-time-first on the Newton-Schulz cost model, deterministic from layout
metadata alone, so every rank computes the same plan without communicating. A matrix that one
rank holds whole, with no other replica (an expert whose shard holds it entirely), is pinned
to that rank: it is orthogonalized where it lies and never crosses the network. A matrix that
several ranks hold whole, one per replica (experts under HSDP), goes to the least loaded of
them: only its update travels, to the other replicas.

The plan reads the layout's piece table (one integer row per piece) with vectorized
operations, never one Python object per piece: at thousands of ranks a layout has millions of
pieces. ``costs`` is a plain sequence (one number per matrix) or a plain callable
``cost(m, n, key)`` (`distributed_muon.cost`: FLOPs or measured seconds), so any cost model fits.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from distributed_muon.layout import P_MATRIX, P_RANK, P_REPLICA, P_START, P_STOP, ShardLayout
from distributed_muon.orthogonalize import GRAM_RESTART, newton_schulz_flops


def ns_flops(
    m: int, n: int, steps: int, method: str = "standard", restart: int = GRAM_RESTART
) -> float:
    """FLOPs of ``steps`` Newton-Schulz steps on an ``m x n`` matrix by ``method``, as
    `orthogonalize` runs them. Standard: ``steps*(4a^2b + 2a^3)``, ``a = min(m, n)``,
    ``b = max(m, n)`` (``X X^T``, ``A A`` and ``B X``). Gram, where it saves FLOPs
    (``b > 1.5a``): ``S*4a^2b + (4*steps - 3S)*2a^3`` with ``S`` the segments between restarts
    (see `distributed_muon.orthogonalize.newton_schulz_flops`)."""
    return newton_schulz_flops(m, n, steps, method, restart)


STRATEGIES = ("lpt", "round_robin")


@dataclass(frozen=True)
class OwnershipPlan:
    """``owner[i]``: rank that orthogonalizes matrix ``i``; ``source[i]``: the replica whose
    pieces are sent to it; ``cost[i]``: its NS FLOPs."""

    owner: tuple[int, ...]
    source: tuple[int, ...]
    cost: tuple[float, ...]
    world_size: int

    @classmethod
    def build(
        cls, layout: ShardLayout, costs: Sequence[float] | Callable[[int, int, Hashable], float],
        strategy: str = "lpt",
    ) -> OwnershipPlan:
        """``costs``: one number per matrix, or ``cost(m, n, key)`` of a layout matrix."""
        if callable(costs):
            costs = [float(costs(mat.m, mat.n, mat.key)) for mat in layout.matrices]
        if strategy not in STRATEGIES:
            raise ValueError(f"plan strategy {strategy!r} is not valid: use one of {STRATEGIES}")
        world = layout.world_size
        owner = [-1] * len(layout.matrices)
        load = [0.0] * world
        free = []
        for mid, holder in enumerate(pinned_holders(layout).tolist()):
            if holder >= 0:
                owner[mid] = holder
                load[holder] += costs[mid]
            else:
                free.append(mid)
        if strategy == "round_robin":
            for i, mid in enumerate(free):
                owner[mid] = i % world
                load[owner[mid]] += costs[mid]
        else:
            whole = whole_holders(layout)
            heap = [(load[r], r) for r in range(world)]
            heapq.heapify(heap)
            for mid in sorted(free, key=lambda i: (-costs[i], i)):
                ranks = whole.get(mid)
                if ranks is not None and len(ranks) < world:
                    # Some ranks hold the whole matrix (one per replica): the least loaded of
                    # them computes it, so it never travels to its owner.
                    rank = min(ranks, key=lambda r: (load[r], r))
                else:
                    while True:  # entries whose load is outdated were superseded: skip them
                        rank_load, rank = heapq.heappop(heap)
                        if rank_load == load[rank]:
                            break
                owner[mid] = rank
                load[rank] += costs[mid]
                heapq.heappush(heap, (load[rank], rank))
        return cls.from_owners(layout, owner, costs)

    @classmethod
    def from_owners(
        cls, layout: ShardLayout, owner: Sequence[int], costs: Sequence[float]
    ) -> OwnershipPlan:
        """A plan with the given owners (one rank per matrix); sources as `build` picks them."""
        return cls(tuple(int(o) for o in owner), _sources(layout, owner),
                   tuple(float(c) for c in costs), layout.world_size)

    def rank_costs(self) -> list[float]:
        load = [0.0] * self.world_size
        for own, c in zip(self.owner, self.cost, strict=True):
            load[own] += c
        return load

    def imbalance(self) -> float:
        """max / mean of per-rank NS cost (1.0 is perfect)."""
        load = self.rank_costs()
        mean = sum(load) / len(load)
        return max(load) / mean if mean > 0 else 1.0

    def traffic(self, layout: ShardLayout, itemsize: int) -> tuple[list[int], list[int]]:
        """Bytes each rank sends and receives per step (both exchanges, self-copies excluded)."""
        sent, recv = self.flows(layout)
        return ((sent.sum(axis=1) * itemsize).tolist(), (recv.sum(axis=1) * itemsize).tolist())

    def flows(self, layout: ShardLayout) -> tuple[np.ndarray, np.ndarray]:
        """Values each rank sends and receives per step, ``[world, 2]`` each: column 0 to the
        owners, column 1 to the holders (self-copies excluded)."""
        t, world = layout.table, self.world_size
        owner = np.asarray(self.owner, dtype=np.int64)[t[:, P_MATRIX]]
        source = np.asarray(self.source, dtype=np.int64)[t[:, P_MATRIX]]
        moved = t[:, P_RANK] != owner
        size = (t[:, P_STOP] - t[:, P_START])[moved]
        holder, owner = t[moved, P_RANK], owner[moved]
        in_source = (t[moved, P_REPLICA] == source[moved])

        def count(ranks, weights):
            return np.bincount(ranks, weights=weights, minlength=world).astype(np.int64)

        sent = np.stack([count(holder, size * in_source), count(owner, size)], axis=1)
        recv = np.stack([count(owner, size * in_source), count(holder, size)], axis=1)
        return sent, recv

    def summary(self, layout: ShardLayout, itemsize: int = 2,
                unit: tuple[str, float] = ("NS GFLOP", 1e-9)) -> str:
        """Per-rank planned NS cost (``unit``: column name and factor; ``("NS ms", 1e3)`` for a
        cost in seconds), matrices owned, and bytes sent/received per step."""
        load = self.rank_costs()
        sent, recv = self.traffic(layout, itemsize)
        counts = np.bincount(np.asarray(self.owner, dtype=np.int64),
                             minlength=self.world_size).tolist()
        lines = [f"{'rank':>4} {'matrices':>8} {unit[0]:>10} {'sent MB':>9} {'recv MB':>9}"]
        for r in range(self.world_size):
            lines.append(
                f"{r:>4} {counts[r]:>8} {load[r] * unit[1]:>10.2f} "
                f"{sent[r] / 1e6:>9.2f} {recv[r] / 1e6:>9.2f}"
            )
        lines.append(f"imbalance (max/mean NS cost): {self.imbalance():.3f}")
        return "\n".join(lines)


def _segment_min_max(values: np.ndarray, ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-matrix min and max of a piece column (every matrix has a piece once validated)."""
    if not len(values):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.minimum.reduceat(values, ptr[:-1]), np.maximum.reduceat(values, ptr[:-1])


def pinned_holders(layout: ShardLayout) -> np.ndarray:
    """Per matrix, the one rank that holds it whole with no other replica, else -1."""
    t = layout.table
    rank_lo, rank_hi = _segment_min_max(t[:, P_RANK], layout.ptr)
    rep_lo, rep_hi = _segment_min_max(t[:, P_REPLICA], layout.ptr)
    return np.where((rank_lo == rank_hi) & (rep_lo == rep_hi), rank_lo, -1)


def whole_holders(layout: ShardLayout) -> dict[int, list[int]]:
    """Matrix -> the ranks that hold all of it in one piece (of some replica), for matrices
    that have such ranks (whole experts under HSDP, every matrix under DDP)."""
    t = layout.table
    if not len(t):
        return {}
    mats = t[:, P_MATRIX]
    numel = np.array([m.m * m.n for m in layout.matrices], dtype=np.int64)
    full = t[(t[:, P_STOP] - t[:, P_START]) == numel[mats]]
    out: dict[int, list[int]] = {}
    for mid, rank in full[:, [P_MATRIX, P_RANK]].tolist():
        out.setdefault(mid, []).append(rank)
    return out


def _sources(layout: ShardLayout, owner: Sequence[int]) -> tuple[int, ...]:
    """Per matrix, the replica of which the owner already holds the most values (ties to the
    lowest replica id; the lowest replica when the owner holds nothing)."""
    t = layout.table
    if not len(t):
        return ()
    source, _ = _segment_min_max(t[:, P_REPLICA], layout.ptr)
    own = np.asarray(owner, dtype=np.int64)
    mine = t[t[:, P_RANK] == own[t[:, P_MATRIX]]]
    if len(mine):
        pairs, inverse = np.unique(mine[:, [P_MATRIX, P_REPLICA]], axis=0, return_inverse=True)
        held = np.bincount(inverse.reshape(-1), weights=mine[:, P_STOP] - mine[:, P_START])
        best = np.lexsort((pairs[:, 1], -held, pairs[:, 0]))  # per matrix: most held, lowest id
        pairs = pairs[best]
        first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
        source[pairs[first, 0]] = pairs[first, 1]
    return tuple(source.tolist())
