"""`Exchange`: move local pieces to their owners as whole matrices, and updates back.

Everything is planned at construction: persistent buffers and, for every piece, the views it
is copied between. A step is then two ``_foreach_copy_`` calls and one ``all_to_all_single``
in each direction, whatever the layout (even or ragged pieces, row or column blocks,
replicas): no per-element Python and no allocation.

Buffers on this rank (``local`` in the parameters' dtype, the rest in ``comm_dtype``):

- ``local``: this rank's local values of every Muon parameter, concatenated; the optimizer
  writes the momentum update ``u`` here before `gather`, and reads the scaled orthogonal update
  here after `scatter`.
- ``batch``: the whole matrices this rank owns, as one ``[B, m, n]`` view per `Batch`
  (``Batch.view``).
- send/receive buffers of the two all-to-alls, ordered by peer rank, then matrix, then piece.
  Pieces a rank keeps for itself are copied directly between ``local`` and ``batch``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distributed_muon.layout import Piece, ShardLayout
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


class Exchange:
    """Routes between this rank's local pieces and the whole matrices it owns.

    ``local_shapes[p]`` is the shape of this rank's storage of Muon parameter ``p``. With
    ``group=None`` (one process) no collective runs and send buffers double as receive buffers.
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
        # No matrices anywhere (every rank sees the same layout): nothing to exchange.
        self.layout, self.plan = layout, plan
        self.group = group if layout.matrices else None
        world, me = layout.world_size, layout.rank
        mats = layout.matrices

        # Batches of owned matrices, grouped by (options, shape) in matrix order.
        grouped: dict[tuple, list[int]] = {}
        for mat in mats:
            if plan.owner[mat.id] == me:
                grouped.setdefault((mat.key, mat.m, mat.n), []).append(mat.id)
        batch_numel = sum(len(ids) * m * n for (_, m, n), ids in grouped.items())
        self._batch_flat = torch.zeros(batch_numel, dtype=comm_dtype, device=device)
        self.batches: list[Batch] = []
        base_of: dict[int, int] = {}  # matrix -> flat offset in _batch_flat
        pos = 0
        for (key, m, n), ids in grouped.items():
            view = self._batch_flat.narrow(0, pos, len(ids) * m * n).view(-1, m, n)
            self.batches.append(Batch(options=key, m=m, n=n, matrices=tuple(ids), view=view))
            for mid in ids:
                base_of[mid] = pos
                pos += m * n

        numels = [int(torch.Size(s).numel()) for s in local_shapes]
        self.local = torch.zeros(sum(numels), dtype=local_dtype, device=device)
        param_base = [0]
        for k in numels:
            param_base.append(param_base[-1] + k)
        self.local_views = [
            self.local.narrow(0, param_base[p], numels[p]).view(local_shapes[p])
            for p in range(len(numels))
        ]

        def local_slice(pc: Piece) -> torch.Tensor:
            return self.local.narrow(0, param_base[pc.param] + pc.offset, pc.size)

        def batch_segments(pc: Piece, flat: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
            """(view of the owner's matrix, view of ``flat`` holding the piece's values)."""
            n = mats[pc.matrix].n
            return [
                (
                    torch.as_strided(self._batch_flat, seg.size, seg.stride,
                                     base_of[pc.matrix] + seg.matrix_offset),
                    flat.narrow(0, seg.value_offset, math.prod(seg.size)).view(seg.size),
                )
                for seg in pc.block.segments(n)
            ]

        # Per peer, pieces in matrix order (then layout order): the order both ends agree on.
        send_in: list[list[Piece]] = [[] for _ in range(world)]
        recv_in: list[list[Piece]] = [[] for _ in range(world)]
        send_out: list[list[Piece]] = [[] for _ in range(world)]
        recv_out: list[list[Piece]] = [[] for _ in range(world)]
        for mid, owner in enumerate(plan.owner):
            for pc in layout.pieces[mid]:
                if pc.replica == plan.source[mid]:  # in: source replica, holder -> owner
                    if pc.rank == me:
                        send_in[owner].append(pc)
                    if owner == me:
                        recv_in[pc.rank].append(pc)
                if owner == me:  # out: every replica, owner -> holder
                    send_out[pc.rank].append(pc)
                if pc.rank == me:
                    recv_out[owner].append(pc)

        own_in = send_in[me]
        send_in[me], recv_in[me] = [], []
        self.inward = self._route(send_in, recv_in, comm_dtype, device)
        for pc in own_in:
            for dst, src in batch_segments(pc, local_slice(pc)):
                self.inward.direct_dst.append(dst)
                self.inward.direct_src.append(src)
        for pc, buf in _slices(send_in, self.inward.send):
            self.inward.pack_dst.append(buf)
            self.inward.pack_src.append(local_slice(pc))
        for pc, buf in _slices(recv_in, self.inward.recv):
            for dst, src in batch_segments(pc, buf):
                self.inward.unpack_dst.append(dst)
                self.inward.unpack_src.append(src)

        own_out = send_out[me]
        send_out[me], recv_out[me] = [], []
        self.outward = self._route(send_out, recv_out, comm_dtype, device)
        for pc in own_out:
            for owner_view, local_view in batch_segments(pc, local_slice(pc)):
                self.outward.direct_dst.append(local_view)
                self.outward.direct_src.append(owner_view)
        for pc, buf in _slices(send_out, self.outward.send):
            for owner_view, value_view in batch_segments(pc, buf):
                self.outward.pack_dst.append(value_view)
                self.outward.pack_src.append(owner_view)
        for pc, buf in _slices(recv_out, self.outward.recv):
            self.outward.unpack_dst.append(local_slice(pc))
            self.outward.unpack_src.append(buf)

    def _route(self, send: list[list[Piece]], recv: list[list[Piece]], dtype: torch.dtype,
               device: torch.device) -> _Route:
        send_counts = [sum(pc.size for pc in per) for per in send]
        recv_counts = [sum(pc.size for pc in per) for per in recv]
        send_buf = torch.zeros(sum(send_counts), dtype=dtype, device=device)
        if self.group is None:
            return _Route(send_buf, send_buf, send_counts, recv_counts, None)
        recv_buf = torch.zeros(sum(recv_counts), dtype=dtype, device=device)
        return _Route(send_buf, recv_buf, send_counts, recv_counts, self.group)

    def gather(self) -> None:
        """Pieces of ``local`` -> whole owned matrices, in each `Batch`'s ``view``."""
        self.inward.run()

    def scatter(self) -> None:
        """Owned matrices (each `Batch`'s ``view``, overwritten with updates) -> ``local``."""
        self.outward.run()

    @property
    def bytes_per_step(self) -> tuple[int, int]:
        """(sent, received) bytes of this rank per step, both directions."""
        item = self._batch_flat.element_size()
        routes = (self.inward, self.outward)
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
