"""`ShardLayout`: where every piece of every logical matrix lives.

Every framework's sharding reduces to *regions*: a rank holds a `Block` (a flat range
``[start, stop)``, row-major, of a rectangular block) of a parameter's 2-D view ``[E*m, n]``,
stored from ``offset`` on in that rank's flat local storage of the parameter. FSDP2
``Shard(0)`` is a row block, a ZeRO partition a flat range of the whole parameter, a
tensor-parallel shard a column block. Replicas (DDP, HSDP) are whole tilings with different
``replica`` ids.

Cutting regions along logical matrices gives *pieces*; the pieces of one replica of a matrix
tile it exactly once (validated at build).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

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


class ShardLayout:
    """All pieces of all logical matrices, identical on every rank.

    ``matrices[i]`` is logical matrix ``i``; ``pieces[i]`` its pieces over all replicas.
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
        self.specs = list(specs)
        self.world_size = world_size
        self.rank = rank
        self.matrices: list[LogicalMatrix] = []
        self.pieces: list[list[Piece]] = []
        for p, (spec, key) in enumerate(zip(specs, keys, strict=True)):
            held = [reg for rank_regions in regions for reg in rank_regions[p]]
            for row0, m, n in spec.matrices():
                mid = len(self.matrices)
                self.matrices.append(LogicalMatrix(mid, p, row0, m, n, key))
                self.pieces.append(_cut(mid, p, row0, m, n, held))
        for mat, pieces in zip(self.matrices, self.pieces, strict=True):
            _check_tiling(mat, pieces, self.specs[mat.param])

    @classmethod
    def gather(
        cls,
        specs: Sequence[MatrixSpec],
        keys: Sequence[Hashable],
        local_regions: Sequence[Sequence[Region]],
        group: dist.ProcessGroup | None,
    ) -> ShardLayout:
        """Build from this rank's regions with one metadata all-gather over ``group``.

        Ranks must pass the same specs and keys; a mismatch raises `LayoutError` on every rank.
        """
        if group is None:
            return cls(specs, keys, [local_regions], 1, 0)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = ([s.shape for s in specs], [s.row_blocks for s in specs], list(keys))
        everything: list = [None] * world
        dist.all_gather_object(everything, (mine, [list(r) for r in local_regions]), group=group)
        for r, (theirs, _) in enumerate(everything):
            if theirs != everything[0][0]:
                raise LayoutError(
                    f"rank {r} of the process group has different Muon parameters than rank 0 "
                    f"({len(theirs[0])} vs {len(everything[0][0][0])} parameters, or other "
                    "shapes/options): every rank must build the optimizer over the same model "
                    "with the same param groups"
                )
        return cls(specs, keys, [regs for _, regs in everything], world, rank)

    def replicas(self, matrix: int) -> dict[int, list[Piece]]:
        out: dict[int, list[Piece]] = {}
        for piece in self.pieces[matrix]:
            out.setdefault(piece.replica, []).append(piece)
        return out


def _cut(
    mid: int, param: int, mrow0: int, m: int, n: int, regions: Sequence[Region]
) -> list[Piece]:
    """Pieces of the matrix at rows ``[mrow0, mrow0+m)`` of the view, from held regions."""
    pieces = []
    for reg in regions:
        blk = reg.block
        a, b = max(blk.row0, mrow0), min(blk.row1, mrow0 + m)
        if a >= b:
            continue
        lo, hi = (a - blk.row0) * blk.width, (b - blk.row0) * blk.width  # block-flat coords
        fs, fe = max(lo, blk.start), min(hi, blk.stop)
        if fs >= fe:
            continue
        block = Block(row0=a - mrow0, row1=b - mrow0, col0=blk.col0, col1=blk.col1,
                      start=fs - lo, stop=fe - lo)
        pieces.append(Piece(matrix=mid, rank=reg.rank, replica=reg.replica, param=param,
                            block=block, offset=reg.offset + fs - blk.start))
    return pieces


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
