"""`ShardLayout`: where every piece of every logical matrix lives.

Every framework's sharding reduces to *regions*: a rank holds a `Block` (a flat range
``[start, stop)``, row-major, of a rectangular block) of a parameter's 2-D view ``[E*m, n]``,
stored from ``offset`` on in that rank's flat local storage of the parameter. FSDP2
``Shard(0)`` is a row block, a ZeRO partition a flat range of the whole parameter, a
tensor-parallel shard a column block. Replicas (DDP, HSDP) are whole tilings with different
``replica`` ids.

Cutting regions along logical matrices gives *pieces*; the pieces of one replica of a matrix
tile it exactly once (validated at build).

At scale (thousands of ranks, tens of thousands of expert matrices) the layout is held as two
integer tables rather than Python objects: one row per region (gathered once from every rank)
and one row per piece, sorted by matrix. `Piece` objects are made only for the pieces asked
for: those a rank sends or receives (`ShardLayout.pieces_where`), or one matrix's
(``layout.pieces[i]``). The plan works on the tables directly.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from distributed_muon.params import MatrixSpec


@dataclass(frozen=True, kw_only=True)
class Segment:
    """A strided rectangle of a matrix: values ``[value_offset, +rows*cols)`` of a block."""

    value_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    matrix_offset: int  # flat offset of the rectangle's first element in the m x n matrix


@dataclass(frozen=True, kw_only=True)
class Block:
    """Flat range ``[start, stop)`` (row-major) of the rectangular block rows ``[row0, row1)``
    x cols ``[col0, col1)`` of a matrix: the one shape every framework's shard takes."""

    row0: int
    row1: int
    col0: int
    col1: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    def segments(self, n: int) -> list[Segment]:
        """The values as at most three rectangles of the ``m x n`` matrix, in value order:
        partial first row, full middle rows, partial last row. A full-width block is
        contiguous in the matrix: one flat segment."""
        w = self.width
        if w == n:
            base = self.row0 * n + self.start
            return [Segment(value_offset=0, size=(self.size,), stride=(1,), matrix_offset=base)]
        out: list[Segment] = []
        pos = self.start
        while pos < self.stop:
            r, c = divmod(pos, w)
            if c == 0 and self.stop - pos >= w:
                rows = (self.stop - pos) // w
                cols = w
            else:
                rows, cols = 1, min(w - c, self.stop - pos)
            out.append(Segment(value_offset=pos - self.start, size=(rows, cols), stride=(n, 1),
                               matrix_offset=(self.row0 + r) * n + self.col0 + c))
            pos += rows * cols
        return out


@dataclass(frozen=True, kw_only=True)
class Region:
    """What one rank holds of one parameter: ``block`` of its ``[E*m, n]`` view, stored from
    ``offset`` on in the rank's flat local storage of the parameter."""

    rank: int
    replica: int
    block: Block
    offset: int = 0

    def intervals(self, cols: int) -> list[tuple[int, int, int]]:
        """``(global flat start, length, local offset)`` runs of the parameter's row-major
        storage that this region holds (``cols``: width of the ``[rows, cols]`` view)."""
        runs = []
        for seg in self.block.segments(cols):
            rows, width = (1, seg.size[0]) if len(seg.size) == 1 else seg.size
            for r in range(rows):
                runs.append((seg.matrix_offset + r * cols, width,
                             self.offset + seg.value_offset + r * width))
        return runs

    @classmethod
    def flat(cls, *, rank: int, replica: int, spec: MatrixSpec, start: int, stop: int) -> Region:
        """A flat range ``[start, stop)`` of the whole parameter, stored from offset 0."""
        block = Block(row0=0, row1=spec.experts * spec.rows, col0=0, col1=spec.cols,
                      start=start, stop=stop)
        return cls(rank=rank, replica=replica, block=block)


@dataclass(frozen=True, kw_only=True)
class Piece:
    """``block`` of logical matrix ``matrix`` (coordinates in the ``m x n`` matrix), held by
    ``rank`` (of replica ``replica``) at ``offset`` of its local storage of ``param``."""

    matrix: int
    rank: int
    replica: int
    param: int
    block: Block
    offset: int

    @property
    def size(self) -> int:
        return self.block.size


@dataclass(frozen=True)
class LogicalMatrix:
    """One matrix Muon orthogonalizes: rows ``[row0, row0+m)`` of parameter ``param``'s view.

    ``key`` groups matrices that may share one batched Newton-Schulz call (same options).
    """

    id: int
    param: int
    row0: int
    m: int
    n: int
    key: Hashable


class LayoutError(ValueError):
    """Raised alike on every rank when ranks disagree or pieces do not tile a matrix."""


# Columns of a region table: one row per region, in rank order, then each rank's own order.
REGION_COLUMNS = ("rank", "replica", "row0", "row1", "col0", "col1", "start", "stop", "offset")
# Columns of the piece table: one row per piece, sorted by matrix, then region order.
PIECE_COLUMNS = ("matrix", "rank", "replica", "param", "row0", "row1", "col0", "col1", "start",
                 "stop", "offset")
(P_MATRIX, P_RANK, P_REPLICA, P_PARAM, P_ROW0, P_ROW1, P_COL0, P_COL1, P_START, P_STOP,
 P_OFFSET) = range(len(PIECE_COLUMNS))


def region_row(reg: Region) -> tuple[int, ...]:
    """A `Region` as one row of a region table (`REGION_COLUMNS`)."""
    b = reg.block
    return (reg.rank, reg.replica, b.row0, b.row1, b.col0, b.col1, b.start, b.stop, reg.offset)


def region_table(regions: Sequence[Region]) -> np.ndarray:
    """``[len(regions), 9]`` int64 rows (`REGION_COLUMNS`)."""
    return np.array([region_row(r) for r in regions], dtype=np.int64).reshape(-1, 9)


def _piece(row: Sequence[int]) -> Piece:
    mid, rank, replica, param, r0, r1, c0, c1, start, stop, offset = row
    return Piece(matrix=mid, rank=rank, replica=replica, param=param, offset=offset,
                 block=Block(row0=r0, row1=r1, col0=c0, col1=c1, start=start, stop=stop))


class _Pieces(Sequence):
    """``pieces[i]``: the `Piece`s of matrix ``i`` over all replicas, made on demand."""

    def __init__(self, table: np.ndarray, ptr: np.ndarray) -> None:
        self._table, self._ptr = table, ptr

    def __len__(self) -> int:
        return len(self._ptr) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        rows = self._table[self._ptr[i]:self._ptr[i + 1]].tolist()
        return [_piece(r) for r in rows]

    def __iter__(self) -> Iterator[list[Piece]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Pieces):
            return bool(np.array_equal(self._table, other._table)
                        and np.array_equal(self._ptr, other._ptr))
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class ShardLayout:
    """All pieces of all logical matrices, identical on every rank.

    ``matrices[i]`` is logical matrix ``i``; ``pieces[i]`` its pieces over all replicas (made on
    demand). ``table`` holds every piece as a row (`PIECE_COLUMNS`), sorted by matrix;
    ``ptr[i]:ptr[i+1]`` are matrix ``i``'s rows.
    """

    def __init__(
        self,
        specs: Sequence[MatrixSpec],
        keys: Sequence[Hashable],
        regions: Sequence[Sequence[Sequence[Region]]],
        world_size: int,
        rank: int,
    ) -> None:
        """``regions[r][p]``: the regions rank ``r`` holds of parameter ``p``."""
        tables = [region_table([reg for rank_regions in regions for reg in rank_regions[p]])
                  for p in range(len(specs))]
        self._build(specs, keys, tables, world_size, rank)

    @classmethod
    def from_tables(
        cls,
        specs: Sequence[MatrixSpec],
        keys: Sequence[Hashable],
        tables: Sequence[np.ndarray],
        world_size: int,
        rank: int,
    ) -> ShardLayout:
        """Build from one region table per parameter (rows `REGION_COLUMNS`, rank order), as
        `gather` receives them or a planner computes them from a sharding rule."""
        layout = cls.__new__(cls)
        layout._build(specs, keys, tables, world_size, rank)
        return layout

    def _build(self, specs, keys, tables, world_size, rank) -> None:
        self.specs = list(specs)
        self.world_size = world_size
        self.rank = rank
        self.matrices: list[LogicalMatrix] = []
        chunks = []
        for p, (spec, key) in enumerate(zip(specs, keys, strict=True)):
            first = len(self.matrices)
            mats = spec.matrices()
            for row0, m, n in mats:
                self.matrices.append(LogicalMatrix(len(self.matrices), p, row0, m, n, key))
            chunks.append(_cut(np.asarray(tables[p], dtype=np.int64).reshape(-1, 9), mats,
                               first, p))
        self.table = (np.concatenate(chunks) if chunks
                      else np.zeros((0, len(PIECE_COLUMNS)), dtype=np.int64))
        counts = np.bincount(self.table[:, P_MATRIX], minlength=len(self.matrices))
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.pieces = _Pieces(self.table, self.ptr)
        for p, spec in enumerate(self.specs):
            if not _tiles(np.asarray(tables[p], dtype=np.int64).reshape(-1, 9), spec):
                # Slow path, per matrix, for the exact error (or a layout whose replicas each
                # tile only some matrices of a parameter).
                for mat in self.matrices:
                    if mat.param == p:
                        _check_tiling(mat, self.pieces[mat.id], spec)

    @classmethod
    def gather(
        cls,
        specs: Sequence[MatrixSpec],
        keys: Sequence[Hashable],
        local_regions: Sequence[Sequence[Region]],
        group: dist.ProcessGroup | None,
    ) -> ShardLayout:
        """Build from this rank's regions with one metadata all-gather over ``group``.

        Each rank sends a digest of its parameters and its regions as one integer array, so
        what a rank receives grows as (ranks x regions per rank), not as Python objects.
        Ranks must pass the same specs and keys; a mismatch raises `LayoutError` on every rank.
        """
        if group is None:
            return cls(specs, keys, [local_regions], 1, 0)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        everything: list = [None] * world
        dist.all_gather_object(everything, metadata(specs, keys, local_regions), group=group)
        return cls.from_gathered(specs, keys, everything, rank)

    @classmethod
    def from_gathered(
        cls,
        specs: Sequence[MatrixSpec],
        keys: Sequence[Hashable],
        everything: Sequence[tuple[int, str, np.ndarray]],
        rank: int,
    ) -> ShardLayout:
        """Build from every rank's `metadata` (rank order), as `gather` receives them."""
        for r, (count, theirs, _) in enumerate(everything):
            if theirs != everything[0][1]:
                raise LayoutError(
                    f"rank {r} of the process group has different Muon parameters than rank 0 "
                    f"({count} vs {everything[0][0]} parameters, or other "
                    "shapes/options): every rank must build the optimizer over the same model "
                    "with the same param groups"
                )
        tables = split_by_param([e[2] for e in everything], len(specs))
        return cls.from_tables(specs, keys, tables, len(everything), rank)

    def pieces_where(self, mask: np.ndarray) -> list[Piece]:
        """The `Piece`s of the table rows where ``mask`` is true, in table order."""
        return [_piece(r) for r in self.table[mask].tolist()]


def metadata(
    specs: Sequence[MatrixSpec], keys: Sequence[Hashable], local_regions: Sequence[Sequence[Region]]
) -> tuple[int, str, np.ndarray]:
    """What a rank sends in `ShardLayout.gather`: its parameter count, a digest of the
    parameters' shapes and options, and its regions as rows ``(param, *REGION_COLUMNS)``."""
    rows = np.array([(p, *region_row(reg)) for p, regs in enumerate(local_regions)
                     for reg in regs], dtype=np.int64).reshape(-1, 10)
    return len(specs), params_digest(specs, keys), rows


def params_digest(specs: Sequence[MatrixSpec], keys: Sequence[Hashable]) -> str:
    """A digest of the parameters' shapes, row blocks and options: equal on ranks that build
    the optimizer over the same parameters."""
    mine = repr(([s.shape for s in specs], [s.row_blocks for s in specs], list(keys)))
    return hashlib.sha256(mine.encode()).hexdigest()


def split_by_param(per_rank: Sequence[np.ndarray], params: int) -> list[np.ndarray]:
    """Rows ``(param, *region)`` of every rank (rank order) -> one region table per param."""
    rows = (np.concatenate(per_rank) if per_rank else np.zeros((0, 10), dtype=np.int64))
    # Stable, so each parameter's rows stay in rank order; 16-bit keys sort by radix, O(rows).
    keys = rows[:, 0].astype(np.uint16 if params < 2**16 else np.int64)
    rows = rows[np.argsort(keys, kind="stable")]
    bounds = np.searchsorted(rows[:, 0], np.arange(params + 1))
    return [rows[bounds[p]:bounds[p + 1], 1:] for p in range(params)]


def _cut(t: np.ndarray, mats: list[tuple[int, int, int]], first: int, param: int) -> np.ndarray:
    """Piece rows of the matrices ``mats`` (``(row0, m, n)``, ascending row0) of one parameter
    from its region table ``t``: each region cut at matrix row boundaries, sorted by matrix."""
    if not len(t) or not mats:
        return np.zeros((0, len(PIECE_COLUMNS)), dtype=np.int64)
    starts = np.array([r0 for r0, _, _ in mats], dtype=np.int64)
    ends = starts + np.array([m for _, m, _ in mats], dtype=np.int64)
    # The rows the flat range [start, stop) of each block touches (a flat region of a whole
    # expert tensor touches a few experts, not all of them).
    width = np.maximum(t[:, 5] - t[:, 4], 1)
    first_row, last_row = t[:, 2] + t[:, 6] // width, t[:, 2] + -(-t[:, 7] // width)
    lo_k = np.searchsorted(ends, first_row, side="right")  # first matrix ending after it
    hi_k = np.searchsorted(starts, last_row, side="left")  # past the last starting before
    count = np.maximum(hi_k - lo_k, 0)
    reg = np.repeat(np.arange(len(t)), count)
    k = lo_k[reg] + np.arange(len(reg)) - np.repeat(np.cumsum(count) - count, count)
    r = t[reg]
    m0, m1 = starts[k], ends[k]
    a, b = np.maximum(r[:, 2], m0), np.minimum(r[:, 3], m1)
    width = r[:, 5] - r[:, 4]
    lo, hi = (a - r[:, 2]) * width, (b - r[:, 2]) * width  # block-flat coordinates
    fs, fe = np.maximum(lo, r[:, 6]), np.minimum(hi, r[:, 7])
    keep = (a < b) & (fs < fe)
    out = np.stack([first + k, r[:, 0], r[:, 1], np.full_like(k, param), a - m0, b - m0,
                    r[:, 4], r[:, 5], fs - lo, fe - lo, r[:, 8] + fs - r[:, 6]], axis=1)[keep]
    return out[np.lexsort((reg[keep], k[keep]))]


def _tiles(t: np.ndarray, spec: MatrixSpec) -> bool:
    """True when every replica's regions tile the parameter's ``[E*m, n]`` view exactly once
    (which implies every matrix is tiled by every replica that holds part of it)."""
    t = t[t[:, 7] > t[:, 6]]
    if not len(t):
        return False
    n, rows = spec.cols, spec.experts * spec.rows
    total = rows * n
    if bool(((t[:, 4] == 0) & (t[:, 5] == n)).all()):
        # Full-width regions are flat intervals of the view: they must abut exactly.
        g0, g1 = t[:, 2] * n + t[:, 6], t[:, 2] * n + t[:, 7]
        order = np.lexsort((g0, t[:, 1]))
        rep, g0, g1 = t[order, 1], g0[order], g1[order]
        new = rep[1:] != rep[:-1]
        inner = np.where(new, (g1[:-1] == total) & (g0[1:] == 0), g0[1:] == g1[:-1])
        return bool(g0[0] == 0 and g1[-1] == total and inner.all())
    for replica in np.unique(t[:, 1]).tolist():
        if not _rectangles_tile(t[t[:, 1] == replica], rows, n):
            return False
    return True


def _rectangles_tile(t: np.ndarray, rows: int, n: int) -> bool:
    """True when the regions of one replica tile ``rows x n`` exactly once: each as at most
    three rectangles; per band between column boundaries, their row intervals must abut."""
    rects = []
    for row in t.tolist():
        blk = Block(row0=row[2], row1=row[3], col0=row[4], col1=row[5], start=row[6],
                    stop=row[7])
        for seg in blk.segments(n):
            if len(seg.size) == 2:
                r, c = divmod(seg.matrix_offset, n)
                rects.append((r, r + seg.size[0], c, c + seg.size[1]))
                continue
            pos, end = seg.matrix_offset, seg.matrix_offset + seg.size[0]
            while pos < end:  # a flat run of full rows: partial first, whole middle, partial last
                r, c = divmod(pos, n)
                if c == 0 and end - pos >= n:
                    k = (end - pos) // n
                    rects.append((r, r + k, 0, n))
                    pos += k * n
                else:
                    w = min(n - c, end - pos)
                    rects.append((r, r + 1, c, c + w))
                    pos += w
    cuts = sorted({0, n, *(c for _, _, c, _ in rects), *(c for _, _, _, c in rects)})
    bands: list[list[tuple[int, int]]] = [[] for _ in range(len(cuts) - 1)]
    for r0, r1, c0, c1 in rects:
        for i in range(bisect.bisect_left(cuts, c0), bisect.bisect_left(cuts, c1)):
            bands[i].append((r0, r1))
    for spans in bands:
        spans.sort()
        pos = 0
        for r0, r1 in spans:
            if r0 != pos:
                return False
            pos = r1
        if pos != rows:
            return False
    return True


def _check_tiling(mat: LogicalMatrix, pieces: list[Piece], spec: MatrixSpec) -> None:
    by_replica: dict[int, list[Piece]] = {}
    for pc in pieces:
        by_replica.setdefault(pc.replica, []).append(pc)
    if not by_replica:
        raise LayoutError(f"matrix {mat.id} (parameter {mat.param}, shape {spec.shape}) has no "
                          "holder on any rank")
    for replica, pcs in by_replica.items():
        blocks = [pc.block for pc in pcs]
        if all(b.width == mat.n for b in blocks):
            # Full-width pieces are flat intervals of the matrix: check they abut exactly.
            spans = sorted((b.row0 * mat.n + b.start, b.row0 * mat.n + b.stop) for b in blocks)
            ends = [0] + [e for _, e in spans]
            if [s for s, _ in spans] == ends[:-1] and ends[-1] == mat.m * mat.n:
                continue
        count = torch.zeros(mat.m * mat.n, dtype=torch.int32)
        for b in blocks:
            for seg in b.segments(mat.n):
                torch.as_strided(count, seg.size, seg.stride, seg.matrix_offset).add_(1)
        if not bool((count == 1).all()):
            raise LayoutError(
                f"the pieces of replica {replica} of matrix {mat.id} (parameter {mat.param}, "
                f"shape {spec.shape}) cover {int((count > 0).sum())} of {count.numel()} "
                f"elements, {int((count > 1).sum())} more than once: the sharding adapter "
                "described the parameter wrongly"
            )
