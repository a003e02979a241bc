"""Diagnostics against independent computations (SVD nuclear norms, the applied update), the
collectives they add, and the gradient-noise-scale estimator on synthetic gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
from multiproc import run_ranks

from distributed_muon import DistributedMuon, orthogonalize
from distributed_muon.diagnostics import kind_of, matrix_stats, nuclear_ratio, orthogonality_error


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(m, n, generator=gen, dtype=torch.float64),
                                full_matrices=False)
    return (u @ torch.diag(s.double()) @ vh).float()


def _spectra(k: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, k + 1).double()
    return {"rank1": (i == 1).double(), "rank4": (i <= 4).double(), "1/i": 1 / i,
            "1/i^2": 1 / i**2, "flat": torch.ones(k, dtype=torch.float64)}


def _nuc(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double(), "nuc"))


# <O, u> / ||u||_* over the spectra above and these shapes, fp32 and bf16: the band each
# schedule lands in (measured by this test; docs/diagnostics.md quotes it). svd: fp32 SVD
# loses tiny singular values (1/i^2 at k = 160: 0.9992).
BANDS = {"svd": (0.998, 1.00001), "jordan": (0.68, 1.14), "polar_express": (0.91, 1.06)}


@pytest.mark.parametrize("schedule", list(BANDS))
@pytest.mark.parametrize("shape", [(64, 64), (160, 480), (320, 160)])
def test_o_dot_u_against_the_svd_nuclear_norm(schedule, shape):
    m, n = shape
    lo, hi = BANDS[schedule]
    for dtype in ("fp32", "bf16") if schedule != "svd" else ("fp32",):
        for name, s in _spectra(min(m, n)).items():
            u = _with_spectrum(m, n, s)
            o = orthogonalize(u[None], schedule, 5, dtype)
            norm, dot, o_norm = matrix_stats(u[None], o)[0].tolist()
            assert norm == pytest.approx(float(torch.linalg.matrix_norm(u)), rel=1e-5)
            assert lo <= dot / _nuc(u) <= hi, (schedule, dtype, name, dot / _nuc(u))
            assert o_norm == pytest.approx(float(torch.linalg.matrix_norm(o.float())), rel=1e-5)


def test_exact_nuclear_ratio_and_orthogonality_error():
    k = 48
    for name, s in _spectra(k).items():
        u = _with_spectrum(64, k, s)
        expected = _nuc(u) ** 2 / float(torch.linalg.matrix_norm(u.double())) ** 2
        assert nuclear_ratio(u) == pytest.approx(expected, rel=1e-6), name
        assert nuclear_ratio(u.T) == pytest.approx(expected, rel=1e-6), name
    assert nuclear_ratio(_with_spectrum(64, k, _spectra(k)["rank1"])) == pytest.approx(1.0)
    assert nuclear_ratio(_with_spectrum(64, k, _spectra(k)["flat"])) == pytest.approx(k)
    assert math.isnan(nuclear_ratio(torch.zeros(4, 5)))
    # Orthogonality error: 0 for a polar factor; RMS of s_i^2 - 1 otherwise.
    u = _with_spectrum(64, k, _spectra(k)["1/i"])
    assert orthogonality_error(orthogonalize(u, "svd")) < 1e-5
    half = _with_spectrum(64, k, torch.full((k,), 0.5))
    assert orthogonality_error(half) == pytest.approx(0.75, rel=1e-5)
    assert orthogonality_error(half.T) == pytest.approx(0.75, rel=1e-5)


def test_kind_of_drops_layer_and_expert_indices():
    assert kind_of("blocks.3.moe.w_in[e2]") == "blocks.*.moe.w_in"
    assert kind_of("blocks.0.attn.qkv.weight[1]") == "blocks.*.attn.qkv.weight[1]"
    assert kind_of("proj") == "proj"


SHAPES = [(24, 40), (40, 24), (3, 16, 12)]  # the 3-D one: three 16 x 12 expert matrices
LR, MU, STEPS, EVERY = 0.05, 0.95, 4, 2


def _problem():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _train(opt_kwargs, params, grads, group=None):
    """Step a DistributedMuon (svd NS in fp32, so <O, u> is exactly the nuclear norm); returns
    the parameters, the diagnostics after each step, and the parameters before the last."""
    ps = [p.clone().requires_grad_() for p in params]
    opt = DistributedMuon(ps, lr=LR, momentum=MU, ns_schedule="svd", ns_dtype="fp32",
                          comm_dtype="fp32", process_group=group, **opt_kwargs)
    seen, before = [], None
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        before = [p.detach().clone() for p in ps]
        opt.step()
        seen.append(opt.diagnostics())
    return [p.detach() for p in ps], seen, before


def _matrices(tensors):
    """Each parameter's logical matrices, labelled as the optimizer labels unnamed ones."""
    out = {}
    for t, shape in zip(tensors, SHAPES, strict=True):
        label = f"parameter {shape} of group 0"
        if t.ndim == 3:
            out.update({f"{label}[e{e}]": t[e] for e in range(t.shape[0])})
        else:
            out[label] = t
    return out


def test_optimizer_diagnostics_equal_direct_computation():
    params, grads = _problem()
    after, seen, before = _train({"diagnostics_every": EVERY}, params, grads)
    assert seen[0] == {} and seen[1]["step"] == 2 and seen[2] == seen[1]
    d = seen[-1]
    assert d["step"] == STEPS
    # Nesterov EMA momentum, computed here from the gradients.
    buf = [torch.zeros(s) for s in SHAPES]
    for step_grads in grads:
        buf = [MU * b + (1 - MU) * g for b, g in zip(buf, step_grads, strict=True)]
    u = [(1 - MU) * g + MU * b for g, b in zip(grads[-1], buf, strict=True)]
    change = [b - a for a, b in zip(after, before, strict=True)]
    for label, x in _matrices(u).items():
        m, n = x.shape
        assert d[f"{label}/u_norm"] == pytest.approx(float(x.norm()), rel=1e-5)
        assert d[f"{label}/o_dot_u"] == pytest.approx(_nuc(x), rel=1e-5)
        assert d[f"{label}/nuclear_ratio"] == pytest.approx(
            _nuc(x) ** 2 / float(x.norm()) ** 2, rel=1e-4)
        # the RMS of what the step really subtracted from the weights (weight decay 0)
        applied = _matrices(change)[label]
        assert d[f"{label}/update_rms"] == pytest.approx(
            float(applied.pow(2).mean().sqrt()), rel=1e-4)
        assert d[f"{label}/update_rms"] == pytest.approx(
            LR * 0.2 * math.sqrt(max(m, n)) * math.sqrt(min(m, n) / (m * n)), rel=1e-4)
    # NS error and the exact ratio: on the first matrix of each shape batch only
    labels = list(_matrices(u))
    sampled = {k for k in labels if not math.isnan(d[f"{k}/ns_error"])}
    assert sampled == {labels[0], labels[1], labels[2]}
    for k in sampled:
        assert d[f"{k}/nuclear_ratio_svd"] == pytest.approx(d[f"{k}/nuclear_ratio"], rel=1e-4)
    assert d["all/ns_error"] < 1e-5
    assert d["rank0/ns_matrices"] == 5 and d["ns_imbalance"] == 1.0
    assert d["rank0/time_ns"] > 0


def test_diagnostics_off_by_default_and_checked():
    params, grads = _problem()
    _, seen, _ = _train({}, params, grads)
    assert seen == [{}] * STEPS
    with pytest.raises(ValueError, match="diagnostics_every"):
        DistributedMuon([torch.zeros(4, 4, requires_grad=True)], diagnostics_every=-1)


def _count_collectives(rank, world):
    """Off, then on every EVERY steps: per step the collectives that ran, the last
    diagnostics and the parameters."""
    import torch.distributed as dist

    calls = []
    for name in ("all_reduce", "all_to_all_single", "all_gather_into_tensor",
                 "reduce_scatter_tensor", "broadcast", "all_gather", "gather", "reduce"):
        original = getattr(dist, name)

        def counted(*a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(*a, **k)

        setattr(dist, name, counted)
    params, grads = _problem()
    runs = []
    for every in (0, EVERY):
        ps = [p.clone().requires_grad_() for p in params]
        opt = DistributedMuon(ps, lr=LR, momentum=MU, ns_schedule="svd", ns_dtype="fp32",
                              comm_dtype="fp32", diagnostics_every=every)
        per_step = []
        for step_grads in grads:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            before = len(calls)
            opt.step()
            per_step.append(calls[before:])
        runs.append((per_step, opt.diagnostics(), [p.detach() for p in ps]))
    return runs


def test_one_small_collective_on_logging_steps_only():
    world = 2  # uneven: 5 matrices over 2 ranks
    ranks = run_ranks(world, _count_collectives)
    on = [r[1] for r in ranks]
    for (steps_off, _, p_off), (steps_on, diag, p_on) in ranks:
        for step, (a, b) in enumerate(zip(steps_off, steps_on, strict=True), start=1):
            extra = ["all_reduce"] if step % EVERY == 0 else []
            assert b == a + extra, (step, a, b)
        for x, y in zip(p_off, p_on, strict=True):
            assert torch.equal(x, y)  # measuring does not change the update
        assert repr(diag) == repr(on[0][1])  # every rank reads the same scalars (NaN too)
    # The matrices are spread over the ranks; the values are the one-process ones.
    single = _train({"diagnostics_every": EVERY}, *_problem())[1][-1]
    diag = on[0][1]
    assert sum(diag[f"rank{r}/ns_matrices"] for r in range(world)) == 5
    for key, value in single.items():
        if key.startswith("rank") or key in ("ns_imbalance", "bytes_sent"):
            continue
        if math.isnan(value) or math.isnan(diag[key]):  # sampled: the first of each batch
            assert key.endswith(("/ns_error", "/nuclear_ratio_svd")), key
            continue
        if key.endswith(("/ns_error", "/nuclear_ratio_svd")) and key.startswith(("all", "par")):
            continue  # a mean over other samples (batches differ per owner)
        assert diag[key] == pytest.approx(value, rel=1e-5), key
    assert diag["bytes_sent"] > 0 and diag["ns_imbalance"] >= 1.0


# ---------------------------------------------------------------- gradient noise scale

M, N, SIGMA, LOCAL = 16, 8, 2.0, 4  # per-sample gradient of w: G + SIGMA z; of v: 3G + SIGMA/2 z


def test_two_batch_estimator_recovers_a_known_noise_scale():
    from distributed_muon.noise_scale import NoiseScale, two_batch_estimates

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(M, N, generator=gen)
    true = M * N * SIGMA**2 / float(G.norm() ** 2)
    ranks, scale = 4, NoiseScale(["w"], beta=0.98)
    for _ in range(400):
        local = G + SIGMA * torch.randn(ranks, LOCAL, M, N, generator=gen).mean(1)
        small = local.pow(2).sum((1, 2)).mean()
        big = local.mean(0).pow(2).sum()
        out = scale.update(small[None], big[None], LOCAL, LOCAL * ranks)
    assert out["w/b_simple"] == pytest.approx(true, rel=0.1)
    assert out["w/trace_cov"] == pytest.approx(M * N * SIGMA**2, rel=0.1)
    with pytest.raises(ValueError, match="small < big"):
        two_batch_estimates(torch.ones(1), torch.ones(1), 4, 4)


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(M, N))

    def forward(self, a):
        return (self.w * a).sum((1, 2)).mean()


class _Linear(torch.nn.Module):
    """Loss per sample ``<w, a_i> + <v, b_i>``: its gradient is ``(a_i, b_i)``, whose mean
    and covariance the test chooses."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.v = torch.nn.Parameter(torch.zeros(M, N))

    def forward(self, a, b):
        return self.inner(a) + (self.v * b).sum((1, 2)).mean()


def _noise_ranks(rank, world):
    from distributed_muon.launch.grad_noise import (
        MODEL,
        NoiseProbe,
        add_averaged_grads,
        fsdp2_module_keys,
        hook_fsdp2_reduce_scatter,
        hook_local_gradients,
    )
    from torch.distributed.fsdp import fully_shard

    G = torch.randn(M, N, generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("ddp", "fsdp2"):
        torch.manual_seed(100 + rank)  # each rank its own samples
        model = _Linear()
        if backend == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            key_of = {"inner.w": "inner.w", "v": "v"}
        else:
            fully_shard(model.inner)
            fully_shard(model)
            wrapped, key_of = model, fsdp2_module_keys(model)
        keys = sorted(set(key_of.values())) + [MODEL]
        probe = NoiseProbe(keys, LOCAL, LOCAL * world, 1, torch.device("cpu"), beta=0.9)
        if backend == "ddp":
            hook_local_gradients(probe, model.named_parameters(), key_of)
        else:
            hook_fsdp2_reduce_scatter(probe, model)
        out = {}
        for step in range(1, 101):
            probe.begin(step)
            a = G + SIGMA * torch.randn(LOCAL, M, N)
            b = 3 * G + SIGMA / 2 * torch.randn(LOCAL, M, N)
            wrapped(a, b).backward()
            if probe.active:
                add_averaged_grads(probe, model.named_parameters(), key_of)
                out = probe.finish(averaged_is_sharded=backend == "fsdp2")
            for p in model.parameters():
                p.grad = None
        results[backend] = out
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_noise_scale_from_ranks_ddp_and_fsdp2(world):
    """Local gradients from DDP's parameter hooks and FSDP2's reduce-scatter input recover
    the known B_simple within 15% (100 steps, EMA 0.9)."""
    G = torch.randn(M, N, generator=torch.Generator().manual_seed(0))
    w_true = M * N * SIGMA**2 / float(G.norm() ** 2)
    v_true = M * N * (SIGMA / 2) ** 2 / float((3 * G).norm() ** 2)
    model_true = M * N * (SIGMA**2 + SIGMA**2 / 4) / float(10 * G.norm() ** 2)
    out = run_ranks(world, _noise_ranks)[0]
    for backend, w_key, v_key in (("ddp", "inner.w", "v"), ("fsdp2", "inner", "root")):
        got = out[backend]
        assert got[f"noise/{w_key}/b_simple"] == pytest.approx(w_true, rel=0.15), backend
        assert got[f"noise/{v_key}/b_simple"] == pytest.approx(v_true, rel=0.15), backend
        assert got["noise/model/b_simple"] == pytest.approx(model_true, rel=0.15), backend


# ---------------------------------------------------------------- dmuon lr


def _fixture_run(folder, estimates, lr=0.02, batch=16):
    """A run folder with per-step (|G|^2, tr(Sigma)) estimates logged every 10 steps."""
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"lr": lr, "batch": batch, "seq": 64}))
    lines = [{"step": s, "loss": 3.0} for s in range(1, 81)]
    for i, (g2, trace) in enumerate(estimates):
        lines[10 * i + 9].update({"noise/model/grad_sq_step": g2,
                                  "noise/model/trace_cov_step": trace})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_dmuon_lr_on_a_fixture_run(tmp_path, capsys):
    from distributed_muon.launch.cli import main

    run = tmp_path / "run"
    # the last quarter (2 of 8): mean tr(Sigma) 48 / mean |G|^2 1.5 = 32
    _fixture_run(run, [(9.0, 9.0)] * 6 + [(1.0, 40.0), (2.0, 56.0)])
    assert main(["lr", str(run), "--batch", "4", "16", "128"]) == 0
    out = capsys.readouterr().out
    assert "B_simple (model) = 32 sequences = 2048 tokens" in out
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]]
            for line in out.splitlines() if line.strip()[:1].isdigit()}
    for batch, (rule, ratio, sqrt_lr, linear_lr) in rows.items():
        eta_max = 0.02 * math.sqrt(1 + 32 / 16)  # the run's lr taken as best at batch 16
        assert rule == pytest.approx(eta_max / math.sqrt(1 + 32 / batch), rel=1e-3)
        assert ratio == pytest.approx(rule / 0.02, abs=1e-3)
        assert sqrt_lr == pytest.approx(0.02 * math.sqrt(batch / 16), rel=1e-3)
        assert linear_lr == pytest.approx(0.02 * batch / 16, rel=1e-3)
    assert rows[16][0] == pytest.approx(0.02)
    assert "Assumptions" in out


def test_dmuon_lr_errors_are_one_line(tmp_path, capsys):
    from distributed_muon.launch.cli import main

    run = tmp_path / "run"
    _fixture_run(run, [])
    assert main(["lr", str(run), "--batch", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmuon lr:") and "--diagnostics-every" in err and "\n" not in err
    assert main(["lr", str(tmp_path / "missing"), "--batch", "32"]) == 2
    assert main(["lr", str(run), "--batch", "0"]) == 2
    assert main(["train", "--diagnostics-every", "-1"]) == 2
    assert "--diagnostics-every" in capsys.readouterr().err


def test_dmuon_lr_unknown_key_lists_the_logged_keys(tmp_path, capsys):
    from distributed_muon.launch.cli import main

    run = tmp_path / "run"
    _fixture_run(run, [(1.0, 40.0)] * 4)
    assert main(["lr", str(run), "--batch", "32", "--key", "nosuchkey"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("logs no noise scale of it; keys logged: model"), err
    assert "--diagnostics-every" not in err  # the run did log: only the key is wrong


def test_dmuon_train_logs_diagnostics(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "distributed_muon.launch.cli", "train", "--steps", "4",
                    "--backend", "ddp", "--diagnostics-every", "2", "--eval-every", "4",
                    "--eval-batches", "1", "--out", str(out)], check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "noise/model/b_simple" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert [r["step"] for r in records if "muon/all/nuclear_ratio" in r] == [2, 4]
    last = logged[-1]
    assert 1 <= last["muon/all/nuclear_ratio"] and last["muon/ns_imbalance"] >= 1
    assert last["muon/blocks.0.attn.qkv.weight[0]/update_rms"] > 0
    assert "noise/blocks.0.moe.w_in/b_simple" in last and last["noise/seconds"] >= 0
    assert (out / "diagnostics.png").stat().st_size > 10_000


def test_dmuon_plot_redraws_from_metrics(tmp_path, capsys):
    from distributed_muon.launch.cli import main

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 3.0 - 0.01 * s} for s in range(1, 21)]
    for r in records[9::10]:
        r.update({"noise/model/b_simple": 2.0, "noise/model/b_simple_step": 3.0,
                  "muon/blocks.*.moe.w_in/nuclear_ratio": 4.0,
                  "muon/blocks.*.moe.w_in/update_rms": 1e-3,
                  "muon/rank0/time_ns": 0.1, "muon/rank0/time_update": 0.01})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(run)]) == 0
    assert "diagnostics.png" in capsys.readouterr().out
    assert (run / "loss.png").stat().st_size > 10_000
    assert (run / "diagnostics.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_diagnostics_png_reads_alone():
    """Titles in words, both axes labelled, and a panel the run could not fill says so (a
    backend that logs only the noise scale leaves three of four panels empty)."""
    import matplotlib.pyplot as plt
    from distributed_muon.launch.reporting import diagnostics_figure

    records = [{"step": s, "loss": 3.0} for s in range(1, 21)]
    for r in records[9::10]:
        r.update({"noise/model/b_simple": 2.0, "noise/model/b_simple_step": 3.0})
    fig = diagnostics_figure(records)
    try:
        axes = fig.axes
        assert len(axes) == 4
        for ax in axes:
            assert ax.get_xlabel() == "step" and ax.get_ylabel(), ax.get_title()
            assert not any(c in ax.get_title() for c in "<>^_"), ax.get_title()
        notes = ["not logged by this run" in " ".join(t.get_text() for t in ax.texts)
                 for ax in axes]
        assert notes == [False, True, True, True]
    finally:
        plt.close(fig)
