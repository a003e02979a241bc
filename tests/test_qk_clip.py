"""QK-clip (MuonClip): per-head maxima, the local row scaling, and multi-rank parity.

The distributed runs (FSDP2 row shards at 1-4 ranks, column shards, replicas) record each
rank's part of the batch, step, and must equal one process that steps unclipped and then
scales the full matrices, written here independently of `distributed_muon.qk_clip`.
"""

from __future__ import annotations

import math

import pytest
import torch
from multiproc import run_ranks

from distributed_muon import DistributedMuon
from distributed_muon.layout import Region
from distributed_muon.params import MatrixSpec
from distributed_muon.qk_clip import MaxLogitRecorder, max_logits, scale_rows

D, HEADS, HD, T, BATCH = 12, 3, 4, 6, 12
LR = 0.01
OPTS = {"lr": LR, "weight_decay": 0.1, "ns_dtype": "fp32", "comm_dtype": "fp32"}


def naive_max_logits(q, k, causal):
    """Per head, by loops: the largest q_i . k_j / sqrt(hd) with j <= i when causal."""
    b, h, t, hd = q.shape
    out = torch.full((h,), float("-inf"))
    for head in range(h):
        for i in range(t):
            for j in range(k.shape[2]):
                if causal and j > i:
                    continue
                s = (q[:, head, i] * k[:, head, j]).sum(-1).max() / math.sqrt(hd)
                out[head] = max(out[head], s)
    return out


def test_max_logits_matches_loops_and_sdpa_mask():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 4, generator=gen)
    for causal in (False, True):
        assert torch.allclose(max_logits(q, k, causal=causal), naive_max_logits(q, k, causal),
                              atol=1e-6)
    assert torch.allclose(max_logits(q, k, scale=1.0), naive_max_logits(q, k, False) * 2)
    with pytest.raises(ValueError, match="grouped keys"):
        max_logits(q, k[:, :1])


def test_recorder_keeps_the_max_over_micro_batches_and_resets():
    rec = MaxLogitRecorder(3)
    assert torch.equal(rec.take(torch.device("cpu")), torch.full((3,), float("-inf")))
    rec.record(torch.tensor([1.0, 5.0, -2.0]))
    rec.record(torch.tensor([3.0, 4.0, -3.0]))
    assert torch.equal(rec.take(torch.device("cpu")), torch.tensor([3.0, 5.0, -2.0]))
    assert rec.value is None
    with pytest.raises(ValueError, match="3 per-head"):
        rec.record(torch.zeros(4))


class _FlatRanges:
    """A ZeRO-like sharding: this rank holds ``[start, stop)`` of the flattened parameter."""

    group = None

    def __init__(self, full: torch.Tensor, start: int, stop: int) -> None:
        self.shape_, self.start, self.stop = full.shape, start, stop
        self.flat = full.reshape(-1)[start:stop].clone()

    def shape(self, param):
        return self.shape_

    def local(self, param):
        return self.flat

    def regions(self, param, spec):
        return [Region.flat(rank=0, replica=0, spec=spec, start=self.start, stop=self.stop)]


def test_scale_rows_on_flat_ranges_that_cut_rows():
    full = torch.randn(12, 5)
    factor = torch.rand(12)
    cuts = [0, 3, 7, 33, 34, 60]  # ranges inside one row, across rows, a single element
    parts = [_FlatRanges(full, a, b) for a, b in zip(cuts, cuts[1:])]
    for part in parts:
        scale_rows(part, None, factor)
    got = torch.cat([p.flat for p in parts]).view(12, 5)
    assert torch.equal(got, full * factor[:, None])
    assert MatrixSpec.storage(full.shape).cols == 5


def register_without_tau_fails():
    opt = DistributedMuon([torch.zeros(6, 4)])
    with pytest.raises(ValueError, match="qk_clip_tau"):
        opt.register_qk(MaxLogitRecorder(1), opt.param_groups[0]["params"][0], head_dim=2)


def test_register_checks():
    register_without_tau_fails()
    w = torch.nn.Parameter(torch.zeros(6, 4))
    opt = DistributedMuon([w], qk_clip_tau=10.0)
    with pytest.raises(ValueError, match="do not fit"):
        opt.register_qk(MaxLogitRecorder(2), w, head_dim=2)  # k rows [4, 8) of 6
    with pytest.raises(ValueError, match="not a parameter"):
        opt.register_qk(MaxLogitRecorder(1), torch.zeros(6, 4), head_dim=2)
    with pytest.raises(ValueError, match="must be > 0"):
        DistributedMuon([w], qk_clip_tau=0.0)


# ---------------------------------------------------------------- distributed parity

def tensors():
    """Initial weights (fused qkv [3D, D], separate wq, wk [D, D]), gradients, inputs."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(3 * D, D, generator=gen), torch.randn(D, D, generator=gen),
               torch.randn(D, D, generator=gen)]
    grads = [torch.randn(w.shape, generator=gen) for w in weights]
    x = torch.randn(BATCH, T, D, generator=gen)
    return weights, grads, x


def heads_of(x, wq, wk):
    """q, k as [B, H, T, hd] for inputs x [B, T, D]."""
    def split(y):
        return y.view(x.shape[0], T, HEADS, HD).transpose(1, 2)
    return split(x @ wq.T), split(x @ wk.T)


def layer_maxima(x, weights):
    qkv, wq, wk = weights
    return (naive_max_logits(*heads_of(x, qkv[:D], qkv[D:2 * D]), True),
            naive_max_logits(*heads_of(x, wq, wk), True))


def reference(tau):
    """One process: the unclipped step, then every clipped head's full q and k rows scaled."""
    weights, grads, x = tensors()
    s_fused, s_sep = layer_maxima(x, weights)
    ps = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = DistributedMuon([{"params": ps[:1], "row_blocks": (D, D, D)}, {"params": ps[1:]}],
                          **OPTS)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    out = [p.detach().clone() for p in ps]
    for h in range(HEADS):
        rows = slice(h * HD, (h + 1) * HD)
        if s_fused[h] > tau:
            f = math.sqrt(tau / float(s_fused[h]))
            out[0][rows] *= f
            out[0][D + h * HD:D + (h + 1) * HD] *= f
        if s_sep[h] > tau:
            f = math.sqrt(tau / float(s_sep[h]))
            out[1][rows] *= f
            out[2][rows] *= f
    return out


def _clip_worker(rank, world, layout, tau):
    from test_distributed import _full, _layout_fns

    weights, grads, x = tensors()
    make, make_grad = _layout_fns(layout, world)
    per = BATCH // world
    mine = x[rank * per:(rank + 1) * per]
    out = {}
    for name, t in (("clip", tau), ("off", None), ("high", 1e9)):
        ps = [make(w) for w in weights]
        opt = DistributedMuon([{"params": ps[:1], "row_blocks": (D, D, D)},
                               {"params": ps[1:]}], qk_clip_tau=t, **OPTS)
        recs = [MaxLogitRecorder(HEADS), MaxLogitRecorder(HEADS)]
        if t is not None:
            opt.register_qk(recs[0], ps[0], head_dim=HD)
            opt.register_qk(recs[1], ps[1], ps[2], head_dim=HD)
        full = [_full(p) for p in ps]
        for micro in mine.split(max(1, per // 2)):  # two micro-batches where possible
            recs[0].record_attention(*heads_of(micro, full[0][:D], full[0][D:2 * D]),
                                     causal=True)
            recs[1].record_attention(*heads_of(micro, full[1], full[2]), causal=True)
        for p, g in zip(ps, grads):
            p.grad = make_grad(g)
        opt.step()
        out[name] = {"weights": [_full(p) for p in ps],
                     "clipped": opt.qk_clip.last_clipped if opt.qk_clip else None,
                     "max_logit": opt.qk_clip.last_max_logit if opt.qk_clip else None}
    return out


@pytest.mark.parametrize("layout,world", [("fsdp2", 1), ("fsdp2", 2), ("fsdp2", 3),
                                          ("fsdp2", 4), ("fsdp2_cols", 2),
                                          ("replicated", 2)])
def test_clipped_weights_equal_full_matrix_reference(layout, world):
    weights, _, x = tensors()
    s_fused, s_sep = layer_maxima(x, weights)
    everything = torch.cat([s_fused, s_sep])
    tau = float(everything.median())  # some heads clipped, some not
    over = everything > tau
    assert 0 < int(over.sum()) < everything.numel()
    want = reference(tau)
    results = run_ranks(world, _clip_worker, layout, tau)
    for res in results:
        clip, off, high = res["clip"], res["off"], res["high"]
        assert clip["clipped"] == int(over.sum())
        assert clip["max_logit"] == pytest.approx(float(everything.max()), rel=1e-5)
        for got, exp in zip(clip["weights"], want):
            assert torch.allclose(got, exp, rtol=1e-5, atol=1e-6)
        # tau above every logit: bit for bit the unclipped step.
        assert high["clipped"] == 0
        for a, b in zip(high["weights"], off["weights"]):
            assert torch.equal(a, b)
        # Fused: V and the q/k rows of unclipped heads are untouched, bit for bit.
        fused_c, fused_o = clip["weights"][0], off["weights"][0]
        assert torch.equal(fused_c[2 * D:], fused_o[2 * D:])
        for h in range(HEADS):
            for base in (0, D):
                rows = slice(base + h * HD, base + (h + 1) * HD)
                if s_fused[h] > tau:
                    assert not torch.equal(fused_c[rows], fused_o[rows])
                else:
                    assert torch.equal(fused_c[rows], fused_o[rows])
        # The same batch through the clipped weights: every head's max logit is about <= tau
        # (exactly tau for the old weights; the update moved them a little).
        after = torch.cat(layer_maxima(x, clip["weights"]))
        assert bool((after <= tau * 1.05).all()), (after, tau)
