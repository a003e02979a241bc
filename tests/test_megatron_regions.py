"""`dmuon plan`'s Megatron tables equal what `MegatronSharding` reports on a real megatron-core
parallel state (TP 2 x DP 2, EP 2 with expert-TP 1, 4 gloo ranks on CPU), and what
`MegatronMuon`'s main-shard adapter (`_MainSharding`, with the replica ids `_shared_replicas`
agrees on over data parallel) reports of distributed-optimizer shards; distributed-optimizer
ranges cut regions exactly where local storage is cut.

Megatron's distributed optimizer itself needs CUDA, so its buffer ranges are checked here
against the local-storage arithmetic, not against a running wrapper.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distributed_muon.integrations.megatron_regions import (
    block_rect,
    buffer_layout,
    megatron_units,
    range_in_param,
    restrict_rows,
    tp_rects,
)
from multiproc import run_ranks

from distributed_muon.cluster import ModelParam, ParallelLayout, table

TP, EP, WORLD, D = 2, 2, 4, 16
# name -> (plan's ModelParam, live parameter name). Experts: 2 local on each of 2 EP ranks.
PARAMS = [ModelParam("col.weight", (8, D), 0, tp="col"),
          ModelParam("row.weight", (D, 24), 0, tp="row"),
          ModelParam("router.weight", (4, D), 0),
          ModelParam("experts", (2 * EP, 6, D), 0, expert=True)]
LIVE = {"col.weight": "col.weight", "row.weight": "row.weight",
        "router.weight": "router.weight", "experts[0::2]": "experts.0.weight",
        "experts[1::2]": "experts.1.weight"}
# The distributed optimizer's buffers, in the plan's parameter order: dense, then experts.
BUFFERS = (("col.weight", "row.weight", "router.weight"), ("experts.0.weight", "experts.1.weight"))


def _model():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=2,
                               use_cpu_initialization=True, tensor_model_parallel_size=TP,
                               expert_model_parallel_size=EP, expert_tensor_parallel_size=1,
                               num_moe_experts=2 * EP, add_bias_linear=False)
    init = torch.nn.init.normal_

    def column(rows, **kw):
        return ColumnParallelLinear(D, rows, config=config, init_method=init, bias=False, **kw)

    model = torch.nn.Module()
    model.col = column(8)
    model.glu = column(24, stride=2)  # GLU's fc1: every TP-size-th chunk of rows
    model.row = RowParallelLinear(24, D, config=config, init_method=init, bias=False,
                                  input_is_parallel=True, skip_bias_add=True)
    model.router = torch.nn.Linear(D, 4, bias=False)
    model.experts = torch.nn.ModuleList(column(6, is_expert=True) for _ in range(2))
    return model


def _worker(rank, world):
    from distributed_muon.integrations.megatron import MegatronSharding
    from megatron.core import parallel_state as ps

    from distributed_muon.layout import region_table
    from distributed_muon.params import MatrixSpec

    ps.initialize_model_parallel(tensor_model_parallel_size=TP, expert_model_parallel_size=EP,
                                 expert_tensor_parallel_size=1)
    try:
        model = _model()
        sharding = MegatronSharding(model)
        out = {"tp_rank": ps.get_tensor_model_parallel_rank()}
        for name, p in model.named_parameters():
            spec = MatrixSpec.of(tuple(sharding.shape(p)))
            out[name] = region_table(sharding.regions(p, spec))
        out["do"] = _main_shard_regions(model, sharding)
        return out
    finally:
        ps.destroy_model_parallel()


def _main_shard_regions(model, sharding):
    """What `MegatronMuon` reports of each parameter's distributed-optimizer main shard: its
    ranges from the buffer arithmetic (`buffer_layout`), cut and given replica ids by the live
    `_MainSharding` / `_shared_replicas` (an all-reduce over each buffer's DP group)."""
    import torch.distributed as dist
    from distributed_muon.integrations.megatron_optimizer import _MainSharding, _shared_replicas
    from megatron.core import parallel_state as ps

    from distributed_muon.layout import region_table
    from distributed_muon.params import MatrixSpec

    named = dict(model.named_parameters())
    out = {}
    for names, dp in zip(BUFFERS, (ps.get_data_parallel_group(),
                                   ps.get_expert_data_parallel_group()), strict=True):
        params = [named[n] for n in names]
        bases, part = buffer_layout([p.numel() for p in params], dist.get_world_size(dp))
        mains = {}
        for p, base in zip(params, bases, strict=True):
            lo, hi = (int(v) for v in range_in_param(base, p.numel(), part, dist.get_rank(dp)))
            if lo < hi:
                mains[id(p)] = (p.detach().view(-1)[lo:hi], (lo, hi))
        main = _MainSharding(sharding, mains, _shared_replicas(sharding, [params], dp),
                             torch.device("cpu"))
        for name, p in zip(names, params, strict=True):
            out[name] = region_table(main.regions(p, MatrixSpec.of(tuple(sharding.shape(p)))))
    return out


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("megatron.core")
    return run_ranks(WORLD, _worker, timeout=240)


def test_planned_megatron_tables_are_the_live_ones(live):
    (unit,) = megatron_units(PARAMS, ParallelLayout("megatron", WORLD, tp=TP, ep=EP), 0)
    assert sorted(unit.names) == sorted(LIVE)
    for name, planned in zip(unit.names, unit.tables, strict=True):
        for rank, got in enumerate(live):
            assert np.array_equal(got[LIVE[name]], planned[planned[:, 0] == rank]), (name, rank)


def test_planned_distributed_optimizer_tables_are_the_live_ones(live):
    """The plan's ``megatron_do`` tables: the live main shards' regions and replica ids."""
    (unit,) = megatron_units(PARAMS, ParallelLayout("megatron_do", WORLD, tp=TP, ep=EP), 0)
    assert sorted(unit.names) == sorted(LIVE)
    cut = False
    for name, planned in zip(unit.names, unit.tables, strict=True):
        for rank, got in enumerate(live):
            mine = planned[planned[:, 0] == rank]
            assert np.array_equal(got["do"][LIVE[name]], mine), (name, rank)
            cut |= bool((mine[:, 6] > 0).any() or (mine[:, 8] > 0).any())
    assert cut, "some main shard must start inside a TP block"


def test_strided_column_blocks_are_the_live_ones(live):
    for rank, got in enumerate(live):
        t = got["tp_rank"]
        want = table([(rank, rank - t, *block_rect(r)) for r in tp_rects(24, D, 0, 2, TP, t)])
        assert np.array_equal(got["glu.weight"], want), rank


def test_restricted_regions_hold_exactly_the_range():
    """Every value of local storage ``[lo, hi)`` is in the cut regions, at ``offset - lo``,
    with the same global coordinates as before the cut (GLU stride 2 and a row-parallel
    block, ranges that cut inside rows and across blocks)."""
    for rects, cols in ((tp_rects(24, D, 0, 2, TP, 1), D), (tp_rects(D, 24, 1, 1, TP, 1), 24)):
        rows = table([(0, 0, *block_rect(r)) for r in rects])
        local = _positions(rows, cols)
        for lo, hi in ((0, len(local)), (5, 101), (96, 97), (100, len(local)), (7, 7)):
            cut = _positions(restrict_rows(rows, lo, hi), cols)
            assert cut == {pos - lo: local[pos] for pos in range(lo, hi)}, (lo, hi)


def _positions(rows: np.ndarray, cols: int) -> dict[int, tuple[int, int]]:
    """local storage position -> (row, col) of the [rows, cols] view, from region rows."""
    out = {}
    for _, _, r0, _r1, c0, c1, start, stop, offset in rows.tolist():
        width = c1 - c0
        for k in range(start, stop):
            out[offset + k - start] = (r0 + k // width, c0 + k % width)
    return out


def test_buffer_ranges_are_reverse_order_even_cuts():
    # Three params of 10, 6, 4 values: buffer [p2 (4), p1 (6), p0 (10)] cut in 2 ranges of 10.
    bases, part = buffer_layout([10, 6, 4], 2)
    assert (bases, part) == ([10, 4, 0], 10)
    ranges = [[tuple(map(int, range_in_param(b, n, part, d))) for d in (0, 1)]
              for b, n in zip(bases, [10, 6, 4], strict=True)]
    assert ranges == [[(0, 0), (0, 10)], [(0, 6), (6, 6)], [(0, 4), (4, 4)]]
