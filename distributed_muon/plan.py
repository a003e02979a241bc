"""`OwnershipPlan`: which rank orthogonalizes each logical matrix.

Longest-processing-time-first on the Newton-Schulz cost model, deterministic from layout
metadata alone, so every rank computes the same plan without communicating. A matrix that one
rank holds whole, with no other replica (an expert whose shard holds it entirely), is pinned
to that rank: it is orthogonalized where it lies and never crosses the network.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from distributed_muon.layout import ShardLayout
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
        cls, layout: ShardLayout, costs: Sequence[float], strategy: str = "lpt"
    ) -> OwnershipPlan:
        if strategy not in STRATEGIES:
            raise ValueError(f"plan strategy {strategy!r} is not valid: use one of {STRATEGIES}")
        world = layout.world_size
        owner = [-1] * len(layout.matrices)
        load = [0.0] * world
        free = []
        for mat in layout.matrices:
            replicas = layout.replicas(mat.id)
            holders = {pc.rank for pc in layout.pieces[mat.id]}
            if len(replicas) == 1 and len(holders) == 1:
                owner[mat.id] = holders.pop()
                load[owner[mat.id]] += costs[mat.id]
            else:
                free.append(mat.id)
        if strategy == "round_robin":
            for i, mid in enumerate(free):
                owner[mid] = i % world
                load[owner[mid]] += costs[mid]
        else:
            heap = [(load[r], r) for r in range(world)]
            heapq.heapify(heap)
            for mid in sorted(free, key=lambda i: (-costs[i], i)):
                rank_load, rank = heapq.heappop(heap)
                owner[mid] = rank
                heapq.heappush(heap, (rank_load + costs[mid], rank))
        source = []
        for mid, own in enumerate(owner):
            # Take the pieces of the replica of which the owner already holds the most.
            held: dict[int, int] = {}
            for pc in layout.pieces[mid]:
                held.setdefault(pc.replica, 0)
                if pc.rank == own:
                    held[pc.replica] += pc.size
            source.append(min(held, key=lambda r: (-held[r], r)))
        return cls(tuple(owner), tuple(source), tuple(float(c) for c in costs), world)

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
        sent = [0] * self.world_size
        recv = [0] * self.world_size
        for mid, own in enumerate(self.owner):
            for pc in layout.pieces[mid]:
                if pc.rank == own:
                    continue
                nbytes = pc.size * itemsize
                if pc.replica == self.source[mid]:  # to owners: source holder -> owner
                    sent[pc.rank] += nbytes
                    recv[own] += nbytes
                sent[own] += nbytes  # to holders: owner -> every holder
                recv[pc.rank] += nbytes
        return sent, recv

    def summary(self, layout: ShardLayout, itemsize: int = 2) -> str:
        """Per-rank planned NS GFLOP, matrices owned, and bytes sent/received per step."""
        load = self.rank_costs()
        sent, recv = self.traffic(layout, itemsize)
        counts = [self.owner.count(r) for r in range(self.world_size)]
        lines = [f"{'rank':>4} {'matrices':>8} {'NS GFLOP':>10} {'sent MB':>9} {'recv MB':>9}"]
        for r in range(self.world_size):
            lines.append(
                f"{r:>4} {counts[r]:>8} {load[r] / 1e9:>10.2f} "
                f"{sent[r] / 1e6:>9.2f} {recv[r] / 1e6:>9.2f}"
            )
        lines.append(f"imbalance (max/mean NS cost): {self.imbalance():.3f}")
        return "\n".join(lines)
