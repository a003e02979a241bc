"""`Exchange`: move local pieces to their owners as whole matrices, and updates back.

Everything is planned at construction: persistent buffers and, for every piece, the views it
is copied between. A step is then two ``_foreach_copy_`` calls and one ``all_to_all_single``
in each direction, whatever the layout (even or ragged pieces, row or column blocks,
replicas): no per-element Python and no allocation.

Buffers on this rank (``local`` in the parameters' dtype, the rest in ``comm_dtype``):

- ``local``: this rank's local values of every Muon parameter, concatenated; the optimizer
  writes the momentum update ``u`` here before `to_owners`, and reads the scaled orthogonal
  update here after `to_holders`.
- ``batch``: the whole matrices this rank owns, as one ``[B, m, n]`` view per `Batch`
  (``Batch.view``).
- send/receive buffers of the two all-to-alls, ordered by peer rank, then matrix, then piece.
  Pieces a rank keeps for itself are copied directly between ``local`` and ``batch``.

The two directions are named by where values go: `to_owners` (each holder of a matrix's
source replica sends its pieces to the owner) and `to_holders` (the owner sends the update to
every holder of every replica); the to-holders routing is derived as the inverse of the
to-owners one plus the replicas that only receive.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distributed_muon.layout import P_MATRIX, P_RANK, Piece, ShardLayout
from distributed_muon.plan import OwnershipPlan


@dataclass(frozen=True, eq=False, kw_only=True)
class Batch:
    """Same-shape, same-options matrices one owner orthogonalizes in one batched call.

    ``options`` is the layout's batching key of these matrices (the optimizer's `NSOptions`);
    ``view`` is their ``[len(matrices), m, n]`` values in the exchange's batch buffer.
    """

    options: Hashable
    m: int
    n: int
    matrices: tuple[int, ...]
    view: torch.Tensor


class _Route:
    """One direction of the exchange: pack, all-to-all, unpack."""

    def __init__(self, send: torch.Tensor, recv: torch.Tensor, send_counts: list[int],
                 recv_counts: list[int], group: dist.ProcessGroup | None) -> None:
        self.send, self.recv = send, recv
        self.send_counts, self.recv_counts = send_counts, recv_counts
        self.group = group
        self.pack_dst: list[torch.Tensor] = []
        self.pack_src: list[torch.Tensor] = []
        self.unpack_dst: list[torch.Tensor] = []
        self.unpack_src: list[torch.Tensor] = []
        # Pieces that stay on this rank skip the buffers: one copy instead of two.
        self.direct_dst: list[torch.Tensor] = []
        self.direct_src: list[torch.Tensor] = []

    def run(self) -> None:
        if self.pack_dst:
            torch._foreach_copy_(self.pack_dst, self.pack_src)
        if self.direct_dst:
            torch._foreach_copy_(self.direct_dst, self.direct_src)
        if self.group is not None:
            dist.all_to_all_single(
                self.recv, self.send, self.recv_counts, self.send_counts, group=self.group
            )
        if self.unpack_dst:
            torch._foreach_copy_(self.unpack_dst, self.unpack_src)


@dataclass
class _Routing:
    """The pieces one direction moves, seen from this rank: ``send[peer]`` and ``recv[peer]``
    in the order both ends agree on (matrix, then layout order); ``keep``: pieces this rank
    moves to itself, copied without a buffer."""

    send: list[list[Piece]]
    recv: list[list[Piece]]
    keep: list[Piece]

    @classmethod
    def empty(cls, world: int) -> _Routing:
        return cls([[] for _ in range(world)], [[] for _ in range(world)], [])

    def add(self, piece: Piece, sender: int, receiver: int, me: int) -> None:
        if sender == receiver == me:
            self.keep.append(piece)
        elif sender == me:
            self.send[receiver].append(piece)
        elif receiver == me:
            self.recv[sender].append(piece)

    def inverse(self) -> _Routing:
        """The same pieces the other way: what was sent is received, and back."""
        return _Routing(self.recv, self.send, self.keep)

    def __add__(self, other: _Routing) -> _Routing:
        """Per peer, this routing's pieces followed by ``other``'s."""
        return _Routing([a + b for a, b in zip(self.send, other.send, strict=True)],
                        [a + b for a, b in zip(self.recv, other.recv, strict=True)],
                        self.keep + other.keep)


def _routings(layout: ShardLayout, plan: OwnershipPlan) -> tuple[_Routing, _Routing]:
    """(to owners, to holders) for this rank.

    To owners, every holder of the matrix's source replica sends its pieces to the owner. To
    holders is the inverse of that, plus the pieces of the other replicas (DDP, HSDP), which
    only receive the update: every holder of every replica gets its values back. Only the
    pieces this rank holds or owns are looked at (`ShardLayout.pieces_where`).
    """
    me, world = layout.rank, layout.world_size
    source, other_replicas = _Routing.empty(world), _Routing.empty(world)
    t = layout.table
    owners = np.asarray(plan.owner, dtype=np.int64)
    mine = (t[:, P_RANK] == me) | (owners[t[:, P_MATRIX]] == me)
    for pc in layout.pieces_where(mine):
        owner = plan.owner[pc.matrix]
        table = source if pc.replica == plan.source[pc.matrix] else other_replicas
        table.add(pc, sender=pc.rank, receiver=owner, me=me)
    return source, source.inverse() + other_replicas.inverse()


class Exchange:
    """Routes between this rank's local pieces and the whole matrices it owns.

    ``local_shapes[p]`` is the shape of this rank's storage of Muon parameter ``p``. With
    ``group=None`` (one process) no collective runs and send buffers double as receive buffers
    (a planner may build one rank's exchange of a larger layout with ``group=None``, e.g. on
    the ``meta`` device, to measure setup: it cannot run).
    """

    def __init__(
        self,
        layout: ShardLayout,
        plan: OwnershipPlan,
        group: dist.ProcessGroup | None,
        local_shapes: list[torch.Size],
        device: torch.device,
        local_dtype: torch.dtype,
        comm_dtype: torch.dtype,
    ) -> None:
        self.layout, self.plan = layout, plan
        # No matrices anywhere (every rank sees the same layout): nothing to exchange.
        self.group = group if layout.matrices else None
        self.comm_dtype, self.device = comm_dtype, device
        self._allocate_batches()
        self._allocate_local(local_shapes, local_dtype)
        to_owners, to_holders = _routings(layout, plan)
        self.route_to_owners = self._route(to_owners, towards_owner=True)
        self.route_to_holders = self._route(to_holders, towards_owner=False)

    # ------------------------------------------------------------ buffers

    def _allocate_batches(self) -> None:
        """``batches``: owned matrices grouped by (options, shape) in matrix order, each a
        ``[B, m, n]`` view of one flat buffer."""
        grouped: dict[tuple, list[int]] = {}
        for mat in self.layout.matrices:
            if self.plan.owner[mat.id] == self.layout.rank:
                grouped.setdefault((mat.key, mat.m, mat.n), []).append(mat.id)
        numel = sum(len(ids) * m * n for (_, m, n), ids in grouped.items())
        self._batch_flat = torch.zeros(numel, dtype=self.comm_dtype, device=self.device)
        self.batches: list[Batch] = []
        self._matrix_base: dict[int, int] = {}  # matrix -> flat offset in _batch_flat
        pos = 0
        for (key, m, n), ids in grouped.items():
            view = self._batch_flat.narrow(0, pos, len(ids) * m * n).view(-1, m, n)
            self.batches.append(Batch(options=key, m=m, n=n, matrices=tuple(ids), view=view))
            for mid in ids:
                self._matrix_base[mid] = pos
                pos += m * n

    def _allocate_local(self, local_shapes: list[torch.Size], dtype: torch.dtype) -> None:
        """``local`` (every Muon parameter's local values, concatenated) and its views."""
        numels = [int(torch.Size(s).numel()) for s in local_shapes]
        self.local = torch.zeros(sum(numels), dtype=dtype, device=self.device)
        self._param_base = [0]
        for k in numels:
            self._param_base.append(self._param_base[-1] + k)
        self.local_views = [
            self.local.narrow(0, self._param_base[p], k).view(shape)
            for p, (k, shape) in enumerate(zip(numels, local_shapes, strict=True))
        ]

    def _local_run(self, pc: Piece) -> torch.Tensor:
        """The piece's values in ``local``: one contiguous run on its holder."""
        return self.local.narrow(0, self._param_base[pc.param] + pc.offset, pc.size)

    def _holder_views(self, pc: Piece, values: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(the piece in ``local``, ``values``)."""
        return [(self._local_run(pc), values)]

    def _owner_views(self, pc: Piece, values: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """(rectangle of the owner's matrix, the matching run of ``values``) per segment."""
        n = self.layout.matrices[pc.matrix].n
        base = self._matrix_base[pc.matrix]
        return [
            (torch.as_strided(self._batch_flat, seg.size, seg.stride, base + seg.matrix_offset),
             values.narrow(0, seg.value_offset, math.prod(seg.size)).view(seg.size))
            for seg in pc.block.segments(n)
        ]

    # ------------------------------------------------------------ routes

    def _route(self, routing: _Routing, towards_owner: bool) -> _Route:
        """Buffers and copy views of one direction: holder -> owner or owner -> holder."""
        send_counts = [sum(pc.size for pc in per) for per in routing.send]
        recv_counts = [sum(pc.size for pc in per) for per in routing.recv]
        send = torch.zeros(sum(send_counts), dtype=self.comm_dtype, device=self.device)
        if self.group is None and self.layout.world_size == 1:
            route = _Route(send, send, send_counts, recv_counts, None)
        else:
            recv = torch.zeros(sum(recv_counts), dtype=self.comm_dtype, device=self.device)
            route = _Route(send, recv, send_counts, recv_counts, self.group)
        sender, receiver = ((self._holder_views, self._owner_views) if towards_owner
                            else (self._owner_views, self._holder_views))
        for pc in routing.keep:
            for owner_view, local_view in self._owner_views(pc, self._local_run(pc)):
                dst, src = (owner_view, local_view) if towards_owner else (local_view, owner_view)
                route.direct_dst.append(dst)
                route.direct_src.append(src)
        for pc, buf in _slices(routing.send, route.send):
            for place, values in sender(pc, buf):
                route.pack_dst.append(values)
                route.pack_src.append(place)
        for pc, buf in _slices(routing.recv, route.recv):
            for place, values in receiver(pc, buf):
                route.unpack_dst.append(place)
                route.unpack_src.append(values)
        return route

    def to_owners(self) -> None:
        """Pieces of ``local`` -> whole owned matrices, in each `Batch`'s ``view``."""
        self.route_to_owners.run()

    def to_holders(self) -> None:
        """Owned matrices (each `Batch`'s ``view``, overwritten with updates) -> ``local``,
        on every holder of every replica."""
        self.route_to_holders.run()

    @property
    def bytes_per_step(self) -> tuple[int, int]:
        """(sent, received) bytes of this rank per step, both directions."""
        item = self._batch_flat.element_size()
        routes = (self.route_to_owners, self.route_to_holders)
        sent = sum(sum(rt.send_counts) for rt in routes)
        recv = sum(sum(rt.recv_counts) for rt in routes)
        return sent * item, recv * item


def _slices(per_peer: list[list[Piece]], buf: torch.Tensor):
    """Each piece with its slice of ``buf`` (peers in rank order, pieces back to back)."""
    pos = 0
    for pieces in per_peer:
        for pc in pieces:
            yield pc, buf.narrow(0, pos, pc.size)
            pos += pc.size
