"""`Exchange`: move local pieces to their owners as whole matrices, and updates back.

Everything is planned at construction: persistent buffers and, for every piece, the views it
is copied between. A step (`Exchange.run`) is then, per chunk and direction, two
``_foreach_copy_`` calls and one ``all_to_all_single``, whatever the layout (even or ragged
pieces, row or column blocks, replicas): no per-element Python and no allocation.

Buffers on this rank, all in the buffer dtype (``comm_dtype``, or the iteration's own dtype in
one process):

- ``local``: this rank's local values of every Muon parameter, concatenated; the optimizer
  writes the momentum update ``u`` here before `run`, and reads the scaled orthogonal update
  here after it (`local_views`). A parameter whose matrices this rank holds whole and owns
  (every parameter in one process, a DDP owner's own matrices) has no room here: its local
  view is its matrices' place in ``batch``, so it is neither stored twice nor copied.
- ``batch``: the whole matrices this rank owns, as one ``[B, m, n]`` view per `Batch`
  (``Batch.view``).
- one send and one receive buffer per direction, ordered by chunk, then peer rank, then
  matrix, then piece; each chunk's all-to-all moves a narrow of them. Other pieces a rank
  keeps for itself are copied directly between ``local`` and ``batch``.

With ``free_between_steps`` the buffers hold memory only inside `in_use` (a step): their
storage is freed after it and allocated again before the next, as FSDP2 frees unsharded
parameters, so the planned views stay valid. Every value read in a step is written in it
first, so nothing carries over.

The two directions are named by where values go: to owners (each holder of a matrix's source
replica sends its pieces to the owner) and to holders (the owner sends the update to every
holder of every replica); the to-holders routing is derived as the inverse of the to-owners
one plus the replicas that only receive.

Pipelining (``chunks=K``): every rank cuts each owner's matrices, in that owner's batch order,
into K parts of about equal NS cost (`chunk_of_matrices`, from layout and plan alone), so
a chunk is a contiguous range of every batch (its `Chunk.batches` narrow the batch views).
The pieces of each routing are split by their matrix's chunk, keeping their order, and `run`
overlaps chunk k's Newton-Schulz with the transfers of its neighbours.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
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
    `Exchange.batches` are whole batches; a pipeline chunk's (`Chunk.batches`) are contiguous
    parts of them, their views narrows of the whole batch's.
    """

    options: Hashable
    m: int
    n: int
    matrices: tuple[int, ...]
    view: torch.Tensor


class Route:
    """One direction of one chunk of the exchange: pack, all-to-all, unpack.

    ``send``/``recv`` are narrows of the direction's persistent buffers; ``send_counts[peer]``
    and ``recv_counts[peer]`` are in values. `start` packs and issues the all-to-all (async),
    `finish` waits for it and unpacks; with ``group=None`` no collective runs.
    """

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
        self._work: dist.Work | None = None

    def start(self) -> None:
        if self.pack_dst:
            torch._foreach_copy_(self.pack_dst, self.pack_src)
        if self.direct_dst:
            torch._foreach_copy_(self.direct_dst, self.direct_src)
        if self.group is not None:
            self._work = dist.all_to_all_single(self.recv, self.send, self.recv_counts,
                                                self.send_counts, group=self.group,
                                                async_op=True)

    def finish(self) -> None:
        # On NCCL, wait() makes the current stream wait for the transfer; the CPU goes on.
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self.unpack_dst:
            torch._foreach_copy_(self.unpack_dst, self.unpack_src)


@dataclass(frozen=True)
class Chunk:
    """One stage of the pipeline: the (sub-)batches this rank orthogonalizes in it, and the two
    routes that bring their matrices in and their updates back."""

    batches: tuple[Batch, ...]
    to_owners: Route
    to_holders: Route


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

    def split(self, chunk_of: Sequence[int], chunks: int) -> list[_Routing]:
        """One routing per chunk: each piece goes to its matrix's chunk, order kept (so both
        ends of every pair still agree on it)."""
        parts = [_Routing.empty(len(self.send)) for _ in range(chunks)]
        for side in ("send", "recv"):
            for peer, pieces in enumerate(getattr(self, side)):
                for pc in pieces:
                    getattr(parts[chunk_of[pc.matrix]], side)[peer].append(pc)
        for pc in self.keep:
            parts[chunk_of[pc.matrix]].keep.append(pc)
        return parts


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


def check_chunks(chunks: object) -> None:
    """Refuse a pipeline depth (the ``exchange_chunks`` option) that is not an integer >= 1."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"exchange_chunks={chunks!r} is not valid: must be an integer >= 1 "
                         "(1: no pipelining)")


def batch_groups(layout: ShardLayout, plan: OwnershipPlan) -> list[dict[tuple, list[int]]]:
    """Per rank, the matrices it owns grouped as its batches: ``(options, m, n) -> matrix ids``,
    groups in order of first appearance, matrix order inside a group."""
    groups: list[dict[tuple, list[int]]] = [{} for _ in range(layout.world_size)]
    for mat in layout.matrices:
        groups[plan.owner[mat.id]].setdefault((mat.key, mat.m, mat.n), []).append(mat.id)
    return groups


def chunk_of_matrices(layout: ShardLayout, plan: OwnershipPlan, chunks: int) -> list[int]:
    """The pipeline chunk of every matrix, alike on every rank (from layout and plan alone).

    Each owner's matrices, in the order of its batches, are cut into ``chunks`` contiguous
    parts of about equal NS cost (``plan.cost``): a matrix goes to the part its cost midpoint
    falls in. A chunk is thus a contiguous range of each batch; parts may be empty."""
    chunk = [0] * len(layout.matrices)
    if chunks == 1:
        return chunk
    for groups in batch_groups(layout, plan):
        order = [mid for ids in groups.values() for mid in ids]
        total = sum(plan.cost[mid] for mid in order)
        done = 0.0
        for pos, mid in enumerate(order):
            cost = plan.cost[mid]
            mid_point = (done + cost / 2) / total if total > 0 else (pos + 0.5) / len(order)
            chunk[mid] = min(chunks - 1, int(mid_point * chunks))
            done += cost
    return chunk


class Exchange:
    """Routes between this rank's local pieces and the whole matrices it owns.

    ``local_shapes[p]`` is the shape of this rank's storage of Muon parameter ``p``. With
    ``group=None`` (one process) no collective runs and send buffers double as receive buffers
    (a planner may build one rank's exchange of a larger layout with ``group=None``, e.g. on
    the ``meta`` device, to measure setup: it cannot run).

    ``chunks`` (>= 1) is the depth of the pipeline `run` builds (`chunk_of_matrices`); with 1
    a step is one all-to-all each way. ``free_between_steps``: the buffers hold memory only
    inside `in_use` (module docstring).
    """

    def __init__(
        self,
        layout: ShardLayout,
        plan: OwnershipPlan,
        group: dist.ProcessGroup | None,
        local_shapes: list[torch.Size],
        device: torch.device,
        comm_dtype: torch.dtype,
        chunks: int = 1,
        free_between_steps: bool = False,
    ) -> None:
        check_chunks(chunks)
        self.layout, self.plan = layout, plan
        # No matrices anywhere (every rank sees the same layout): nothing to exchange.
        self.group = group if layout.matrices else None
        self.comm_dtype, self.device = comm_dtype, device
        self._chunk_of = chunk_of_matrices(layout, plan, chunks)
        # Each direction's whole send and receive buffers (one tensor for both in one process).
        self._route_buffers: dict[str, torch.Tensor] = {}
        self._allocate_batches()
        to_owners, to_holders = _routings(layout, plan)
        self._allocate_local(local_shapes, self._params_in_place(to_owners.keep, local_shapes))
        inward = self._routes(to_owners.split(self._chunk_of, chunks), towards_owner=True)
        outward = self._routes(to_holders.split(self._chunk_of, chunks), towards_owner=False)
        self.chunks = tuple(Chunk(*parts) for parts in zip(self._sub_batches(chunks), inward,
                                                            outward, strict=True))
        self.free_between_steps = free_between_steps
        self._storage_bytes = [(t.untyped_storage(), t.untyped_storage().nbytes())
                               for t in self._owned_buffers()]
        if free_between_steps:
            self._resize(allocated=False)

    # ------------------------------------------------------------ memory

    def _owned_buffers(self) -> list[torch.Tensor]:
        """The distinct tensors that own this exchange's memory."""
        unique: dict[int, torch.Tensor] = {}
        for t in (self.local, self._batch_flat, *self._route_buffers.values()):
            unique.setdefault(id(t), t)
        return list(unique.values())

    def _resize(self, allocated: bool) -> None:
        for storage, nbytes in self._storage_bytes:
            storage.resize_(nbytes if allocated else 0)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """The block in which the buffers hold memory (a step: momentum in, `run`, update
        out). Without ``free_between_steps`` they always do and this does nothing."""
        if not self.free_between_steps:
            yield
            return
        self._resize(allocated=True)
        try:
            yield
        finally:
            self._resize(allocated=False)

    # ------------------------------------------------------------ buffers

    def _allocate_batches(self) -> None:
        """``batches``: owned matrices grouped by (options, shape) in matrix order, each a
        ``[B, m, n]`` view of one flat buffer."""
        grouped = batch_groups(self.layout, self.plan)[self.layout.rank]
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

    def _sub_batches(self, chunks: int) -> list[tuple[Batch, ...]]:
        """Per chunk, the part of each batch in it (one contiguous range of the batch:
        `chunk_of_matrices`), its view a narrow of the batch's."""
        parts: list[list[Batch]] = [[] for _ in range(chunks)]
        for b in self.batches:
            start = 0
            for k, run in itertools.groupby(b.matrices, key=self._chunk_of.__getitem__):
                count = len(list(run))
                parts[k].append(Batch(options=b.options, m=b.m, n=b.n,
                                      matrices=b.matrices[start:start + count],
                                      view=b.view.narrow(0, start, count)))
                start += count
        return [tuple(p) for p in parts]

    def _allocate_local(self, local_shapes: list[torch.Size], in_place: dict[int, int]) -> None:
        """``local`` (the local values of every Muon parameter not in ``in_place``,
        concatenated) and every parameter's view: in ``local``, or for a parameter in
        ``in_place`` (parameter -> its first matrix) its matrices' run of ``batch``."""
        numels = [0 if p in in_place else int(torch.Size(s).numel())
                  for p, s in enumerate(local_shapes)]
        self.local = torch.zeros(sum(numels), dtype=self.comm_dtype, device=self.device)
        self._param_base = [0]
        for k in numels:
            self._param_base.append(self._param_base[-1] + k)
        self._in_place = frozenset(in_place)
        self.local_views = [
            self._batch_flat.narrow(0, self._matrix_base[in_place[p]],
                                    torch.Size(shape).numel()).view(shape)
            if p in in_place else self.local.narrow(0, self._param_base[p], k).view(shape)
            for p, (k, shape) in enumerate(zip(numels, local_shapes, strict=True))
        ]

    def _params_in_place(self, kept: list[Piece], local_shapes: list[torch.Size]
                         ) -> dict[int, int]:
        """Parameters whose local storage is whole matrices this rank owns, stored as they sit
        in ``batch`` (each matrix's piece is all of it, matrices back to back in local storage
        and in one run of ``batch``): parameter -> its first matrix."""
        whole: dict[int, list[Piece]] = {}
        for pc in kept:
            mat = self.layout.matrices[pc.matrix]
            b = pc.block
            if (b.row0, b.row1, b.col0, b.col1, b.start, b.stop) == (0, mat.m, 0, mat.n, 0,
                                                                      mat.m * mat.n):
                whole.setdefault(pc.param, []).append(pc)
        out = {}
        for param, pieces in whole.items():
            pieces.sort(key=lambda pc: pc.offset)
            first = self._matrix_base[pieces[0].matrix]
            pos = 0
            for pc in pieces:
                if pc.offset != pos or self._matrix_base[pc.matrix] != first + pos:
                    break
                pos += pc.size
            else:
                if pos == torch.Size(local_shapes[param]).numel():
                    out[param] = pieces[0].matrix
        return out

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

    def _routes(self, parts: list[_Routing], towards_owner: bool) -> list[Route]:
        """One direction (holder -> owner or owner -> holder): one send and one receive buffer,
        chunk after chunk (peer order inside a chunk), and each chunk's `Route` over its
        narrows, with the copy views of its pieces."""
        sends = [[sum(pc.size for pc in per) for per in part.send] for part in parts]
        recvs = [[sum(pc.size for pc in per) for per in part.recv] for part in parts]
        send = torch.zeros(sum(map(sum, sends)), dtype=self.comm_dtype, device=self.device)
        alone = self.group is None and self.layout.world_size == 1
        recv = send if alone else torch.zeros(sum(map(sum, recvs)), dtype=self.comm_dtype,
                                              device=self.device)
        group = None if alone else self.group
        direction = "to_owners" if towards_owner else "to_holders"
        self._route_buffers[f"{direction}_send"] = send
        self._route_buffers[f"{direction}_recv"] = recv
        sender, receiver = ((self._holder_views, self._owner_views) if towards_owner
                            else (self._owner_views, self._holder_views))
        routes, s_pos, r_pos = [], 0, 0
        for part, send_counts, recv_counts in zip(parts, sends, recvs, strict=True):
            route = Route(send.narrow(0, s_pos, sum(send_counts)),
                          recv.narrow(0, r_pos, sum(recv_counts)),
                          send_counts, recv_counts, group)
            s_pos += sum(send_counts)
            r_pos += sum(recv_counts)
            for pc in part.keep:
                if pc.param in self._in_place:  # its local view is its place in the batch
                    continue
                for owner_view, local_view in self._owner_views(pc, self._local_run(pc)):
                    dst, src = ((owner_view, local_view) if towards_owner
                                else (local_view, owner_view))
                    route.direct_dst.append(dst)
                    route.direct_src.append(src)
            for pc, buf in _slices(part.send, route.send):
                for place, values in sender(pc, buf):
                    route.pack_dst.append(values)
                    route.pack_src.append(place)
            for pc, buf in _slices(part.recv, route.recv):
                for place, values in receiver(pc, buf):
                    route.unpack_dst.append(place)
                    route.unpack_src.append(values)
            routes.append(route)
        return routes

    def run(self, work: Callable[[Batch], None],
            mark: Callable[[str], None] | None = None) -> None:
        """One step's exchange around ``work``: pieces of ``local`` -> whole owned matrices ->
        ``work(batch)`` for every owned (sub-)batch, which overwrites ``batch.view`` with the
        update -> updates back into ``local`` on every holder of every replica.

        With K chunks, chunk k+1's matrices travel while chunk k's ``work`` runs, and chunk k's
        updates travel back while chunk k+1's runs: to-owners(k+1) is issued before chunk k is
        waited for, to-holders(k) right after chunk k's work, and the to-holders are waited
        for at the end. Every rank issues the same 2K collectives in the same order.

        ``mark(phase)`` (profiling) is called with ``"to_owners"`` once chunk 0's matrices are
        in place, ``"ns"`` once the last chunk's work is issued, and ``"to_holders"`` once all
        updates are in ``local``.
        """
        chunks = self.chunks
        chunks[0].to_owners.start()
        for k, chunk in enumerate(chunks):
            if k + 1 < len(chunks):
                chunks[k + 1].to_owners.start()
            chunk.to_owners.finish()
            if k == 0 and mark is not None:
                mark("to_owners")
            for batch in chunk.batches:
                work(batch)
            if k + 1 == len(chunks) and mark is not None:
                mark("ns")
            chunk.to_holders.start()
        for chunk in chunks:
            chunk.to_holders.finish()
        if mark is not None:
            mark("to_holders")

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """This rank's buffers, whole: ``local``, ``batch``, ``to_owners_send``,
        ``to_owners_recv``, ``to_holders_send``, ``to_holders_recv`` (in one process a
        direction's receive buffer is its send buffer, the same tensor). With
        ``free_between_steps`` they hold memory only inside `in_use`."""
        return {"local": self.local, "batch": self._batch_flat, **self._route_buffers}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of each of `buffers` while in use (``numel * element_size``); a buffer over
        the same memory as one before it (a receive buffer that is its send buffer) counts 0
        bytes, so the values add up to what is allocated (`count_once`)."""
        return count_once(self.buffers)

    @property
    def bytes_per_step(self) -> tuple[int, int]:
        """(sent, received) bytes of this rank per step, both directions."""
        item = self._batch_flat.element_size()
        routes = [rt for c in self.chunks for rt in (c.to_owners, c.to_holders)]
        sent = sum(sum(rt.send_counts) for rt in routes)
        recv = sum(sum(rt.recv_counts) for rt in routes)
        return sent * item, recv * item


def count_once(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``numel * element_size`` (bytes) of each named tensor, in order, with a tensor over the
    same memory (storage, offset and size) as an earlier one counted as 0 bytes. Read from the
    tensors' sizes, so a storage freed for now (`Exchange.in_use`) counts what it holds in use.
    """
    seen: set[tuple] = set()
    out: dict[str, int] = {}
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        key = (t.untyped_storage()._cdata, t.storage_offset(), size)
        out[name] = size if size and key not in seen else 0
        seen.add(key)
    return out


def _slices(per_peer: list[list[Piece]], buf: torch.Tensor):
    """Each piece with its slice of ``buf`` (peers in rank order, pieces back to back)."""
    pos = 0
    for pieces in per_peer:
        for pc in pieces:
            yield pc, buf.narrow(0, pos, pc.size)
            pos += pc.size
