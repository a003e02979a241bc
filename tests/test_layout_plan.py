"""ShardLayout and OwnershipPlan from metadata alone (no process group needed)."""

from __future__ import annotations

import pytest
import torch
from distributed_muon.integrations.fsdp2_regions import chunk_range as _chunk

from distributed_muon.layout import Block, LayoutError, Region, ShardLayout
from distributed_muon.params import MatrixSpec
from distributed_muon.plan import OwnershipPlan, ns_flops


def flat(rank, spec, start, stop):
    """A flat range of the whole parameter, rank ``rank`` of one replica."""
    return Region.flat(rank=rank, replica=0, spec=spec, start=start, stop=stop)


def fsdp_layout(shapes, world, row_blocks=None):
    """The layout FSDP2 Shard(0) gives these parameter shapes on ``world`` ranks."""
    specs = [MatrixSpec.of(s, (row_blocks or {}).get(i)) for i, s in enumerate(shapes)]
    regions = []
    for rank in range(world):
        per_param = []
        for spec in specs:
            lo, hi = _chunk(spec.shape[0], world, rank)
            inner = spec.experts * spec.rows * spec.cols // spec.shape[0]
            per_param.append([flat(rank, spec, lo * inner, hi * inner)] if hi > lo else [])
        regions.append(per_param)
    return ShardLayout(specs, ["k"] * len(specs), regions, world, 0)


def test_pieces_cut_rows_experts_and_blocks():
    # 33 rows over 4 ranks: 9, 9, 9, 6.
    lay = fsdp_layout([(33, 16)], 4)
    # (A flat range of the whole matrix: the block is the matrix, the range picks the rows.)
    assert [(p.rank, p.block.start, p.block.stop) for p in lay.pieces[0]] == [
        (0, 0, 144), (1, 144, 288), (2, 288, 432), (3, 432, 528)]
    # 3 experts over 2 ranks: rank 0 holds experts 0-1, rank 1 expert 2.
    lay = fsdp_layout([(3, 4, 5)], 2)
    assert [[p.rank for p in pcs] for pcs in lay.pieces] == [[0], [0], [1]]
    # A fused (8, 4, 4) x 6 weight over 2 ranks: the cut at row 8 falls between blocks.
    lay = fsdp_layout([(16, 6)], 2, row_blocks={0: (8, 4, 4)})
    assert [[(p.rank, p.block.start, p.block.stop, p.offset) for p in pcs]
            for pcs in lay.pieces] == [
        [(0, 0, 48, 0)], [(1, 0, 24, 0)], [(1, 0, 24, 24)]]


def test_flat_partition_straddles_rows_and_matrices():
    # A ZeRO-style flat split of two experts (2 x 3 x 4 = 24 values) at offsets 0/10/24.
    spec = MatrixSpec.of((2, 3, 4))
    regions = [[[flat(0, spec, 0, 10)]], [[flat(1, spec, 10, 24)]]]
    lay = ShardLayout([spec], ["k"], regions, 2, 0)
    first, second = lay.pieces
    assert [(p.rank, p.block.start, p.block.stop, p.offset) for p in first] == [
        (0, 0, 10, 0), (1, 10, 12, 0)]
    assert [(p.rank, p.block.start, p.block.stop, p.offset) for p in second] == [(1, 0, 12, 2)]


def test_column_block_segments():
    # Values 2..9 of a 3 x 4 column block (cols 2..6) of a 3 x 8 matrix.
    segs = Block(row0=0, row1=3, col0=2, col1=6, start=2, stop=10).segments(8)
    assert [(s.value_offset, s.size, s.matrix_offset) for s in segs] == [
        (0, (1, 2), 4), (2, (1, 4), 10), (6, (1, 2), 18)]
    m = torch.arange(24).view(3, 8)
    got = torch.cat([torch.as_strided(m, s.size, s.stride, s.matrix_offset).reshape(-1)
                     for s in segs])
    assert got.tolist() == m[:, 2:6].reshape(-1)[2:10].tolist()


def test_region_intervals_in_global_order():
    block = Block(row0=0, row1=3, col0=2, col1=6, start=2, stop=10)
    reg = Region(rank=0, replica=0, block=block, offset=5)
    assert reg.intervals(8) == [(4, 2, 5), (10, 4, 7), (18, 2, 11)]
    assert flat(0, MatrixSpec.of((4, 5)), 3, 17).intervals(5) == [(3, 14, 0)]


def test_tiling_errors_are_caught():
    spec = MatrixSpec.of((4, 4))
    gap = [[[flat(0, spec, 0, 6)]], [[flat(1, spec, 8, 16)]]]
    with pytest.raises(LayoutError, match="cover 14 of 16"):
        ShardLayout([spec], ["k"], gap, 2, 0)
    overlap = [[[flat(0, spec, 0, 10)]], [[flat(1, spec, 6, 16)]]]
    with pytest.raises(LayoutError, match="more than once"):
        ShardLayout([spec], ["k"], overlap, 2, 0)
    left = Block(row0=0, row1=4, col0=0, col1=2, start=0, stop=8)
    right = Block(row0=0, row1=4, col0=1, col1=4, start=0, stop=12)  # column 1 twice
    cols = [[[Region(rank=0, replica=0, block=left)]], [[Region(rank=1, replica=0, block=right)]]]
    with pytest.raises(LayoutError, match="more than once"):
        ShardLayout([spec], ["k"], cols, 2, 0)


def transformer(d=512, layers=4, experts=8):
    """qkv, proj, fc1, fc2 and a 3-D expert tensor per layer (shapes as [out, in])."""
    return [s for _ in range(layers) for s in
            [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (experts, 2 * d, d)]]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_lpt_balances_better_than_round_robin(world):
    lay = fsdp_layout(transformer(), world)
    costs = [ns_flops(m.m, m.n, 5) for m in lay.matrices]
    lpt = OwnershipPlan.build(lay, costs, "lpt")
    rr = OwnershipPlan.build(lay, costs, "round_robin")
    assert lpt.imbalance() <= rr.imbalance()
    assert len(lay.matrices) / world >= 4
    assert lpt.imbalance() <= 1.10, lpt.imbalance()
    # Whole experts (8 per layer, Shard(0) over <= 8 ranks) are pinned to their holders.
    for m in lay.matrices:
        holders = {pc.rank for pc in lay.pieces[m.id]}
        if len(holders) == 1:
            assert lpt.owner[m.id] == holders.pop()


def test_imbalance_of_a_known_plan():
    # Three matrices split over 2 ranks (nothing pinned), costs 5, 3, 3: LPT puts 5 on rank 0
    # and both 3s on rank 1 (3 < 5), loads (5, 6); round-robin gives (5 + 3, 3) = (8, 3).
    lay = fsdp_layout([(8, 8), (8, 8), (16, 8)], 2)
    costs = [3.0, 3.0, 5.0]
    lpt = OwnershipPlan.build(lay, costs, "lpt")
    assert lpt.owner == (1, 1, 0) and lpt.rank_costs() == [5.0, 6.0]
    assert lpt.imbalance() == pytest.approx(6 / 5.5)
    rr = OwnershipPlan.build(lay, costs, "round_robin")
    assert rr.owner == (0, 1, 0) and rr.imbalance() == pytest.approx(8 / 5.5)
    # Pinned matrices count too: 3 experts over 2 ranks lie whole on ranks 0, 0, 1.
    experts = fsdp_layout([(3, 4, 4)], 2)
    pinned = OwnershipPlan.build(experts, [1.0, 1.0, 1.0])
    assert pinned.owner == (0, 0, 1) and pinned.imbalance() == pytest.approx(2 / 1.5)


def test_summary_reports_every_rank():
    lay = fsdp_layout(transformer(layers=2), 4)
    plan = OwnershipPlan.build(lay, [ns_flops(m.m, m.n, 5) for m in lay.matrices])
    text = plan.summary(lay, itemsize=2)
    assert "imbalance" in text and len(text.splitlines()) == 4 + 2


def test_ns_flops():
    assert ns_flops(2, 3, 1) == 4 * 4 * 3 + 2 * 8
    assert ns_flops(3, 2, 5) == ns_flops(2, 3, 5)
