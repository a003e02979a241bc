import pytest
import torch

from distributed_muon import DistributedMuon, orthogonalize, schedule_band
from distributed_muon.orthogonalize import (
    GRAM_RESTART,
    GRAM_RESTART_FP16,
    POLAR_EXPRESS,
    NSOptions,
    gram_is_cheaper,
    gram_restart,
    newton_schulz_flops,
    resolve_schedule,
)
from distributed_muon.plan import ns_flops


def conditioned(m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """A random m x n float64 matrix with singular values log-spaced in [1/cond, 1]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64)
    return (U * s) @ V.T


def polar64(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


SHAPES = [(64, 128), (128, 64), (96, 96), (1, 40), (40, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_schedule_is_the_polar_factor(shape):
    # fp64 input: the float64 polar factor to rounding. fp32 input (condition 10, where fp32
    # SVD itself is accurate to ~5e-7): every element within 1e-6.
    X = conditioned(*shape, cond=10.0)
    O = orthogonalize(X, "svd", dtype="bf16")  # svd ignores the NS dtype
    assert O.dtype == torch.float64
    torch.testing.assert_close(O, polar64(X), atol=1e-12, rtol=0)
    X32 = X.float()
    O32 = orthogonalize(X32, "svd")
    assert O32.dtype == torch.float32
    torch.testing.assert_close(O32.double(), polar64(X32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (96, 96)])
@pytest.mark.parametrize("cond", [10.0, 1e3])
def test_singular_values_fall_in_the_schedule_band(schedule, shape, cond):
    X = conditioned(*shape, cond=cond, seed=int(cond))
    sv = torch.linalg.svdvals(X)
    lo, hi = schedule_band(schedule, 5, float(sv.min() / X.norm()), float(sv.max() / X.norm()))
    # fp32 follows the scalar map closely; bf16 rounding moves singular values by a few 1e-2,
    # fp16's (8x finer) by a few 1e-3.
    for dtype, slack in ((torch.float32, 2e-3), (torch.bfloat16, 4e-2), (torch.float16, 1e-2)):
        out = torch.linalg.svdvals(orthogonalize(X.float(), schedule, 5, dtype).double())
        assert out.min() >= lo - slack, (dtype, float(out.min()), lo)
        assert out.max() <= hi + slack, (dtype, float(out.max()), hi)
    # The orthogonal factor itself: directions agree with U V^T.
    O = orthogonalize(X.float(), schedule, 5, torch.float32).double()
    cos = (O * polar64(X)).sum() / (O.norm() * polar64(X).norm())
    assert cos > 0.9


def test_documented_bands():
    # The numbers docs/muon.md quotes for normalized singular values in [1e-3, 1].
    lo, hi = schedule_band("jordan", 5, 1e-3)
    assert (round(lo, 2), round(hi, 2)) == (0.47, 1.20)
    lo, hi = schedule_band("polar_express", 5, 1e-3)
    assert (round(lo, 2), round(hi, 2)) == (0.85, 1.12)


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("schedule", ["jordan", "polar_express", "svd"])
def test_zero_matrix_gives_zeros(schedule, method):
    for shape in [(8, 16), (3, 5, 7), (1, 9), (2, 40, 8)]:
        O = orthogonalize(torch.zeros(shape), schedule, method=method)
        assert O.shape == shape
        assert torch.isfinite(O).all() and (O == 0).all()


def test_batched_equals_one_by_one():
    X = torch.randn(2, 3, 24, 40)
    out = orthogonalize(X, dtype=torch.float32)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], orthogonalize(X[i, j], dtype=torch.float32),
                                       atol=1e-5, rtol=1e-5)


def test_vectors_normalize():
    # A 1 x n matrix has polar factor x / ||x||; NS gets close in a few steps.
    x = torch.randn(1, 50)
    for schedule in ("jordan", "polar_express"):
        O = orthogonalize(x, schedule, dtype=torch.float32)
        cos = (O * x).sum() / (O.norm() * x.norm())
        assert cos > 0.999
        assert 0.6 < O.norm() < 1.25


def test_custom_coefficients():
    X = torch.randn(16, 32)
    same = orthogonalize(X, [(3.4445, -4.7750, 2.0315)], dtype=torch.float32)
    torch.testing.assert_close(same, orthogonalize(X, "jordan", dtype=torch.float32))
    pe = orthogonalize(X, list(POLAR_EXPRESS), steps=9, dtype=torch.float32)
    torch.testing.assert_close(pe, orthogonalize(X, "polar_express", 9, torch.float32))
    # Cubic Newton-Schulz (1.5, -0.5, 0) converges to the polar factor given enough steps.
    cubic = orthogonalize(X.double(), [(1.5, -0.5, 0.0)], steps=60, dtype=torch.float64)
    torch.testing.assert_close(cubic, polar64(X), atol=1e-6, rtol=0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown ns_schedule"):
        orthogonalize(torch.randn(4, 4), "newton")
    with pytest.raises(ValueError, match="triples"):
        orthogonalize(torch.randn(4, 4), [(1.0, 2.0)])
    with pytest.raises(ValueError, match=r"\[\.\.\., m, n\]"):
        orthogonalize(torch.randn(4))
    with pytest.raises(ValueError, match="ns_dtype"):
        orthogonalize(torch.randn(4, 4), dtype="half-ish")


# ---------------------------------------------------------------- Gram Newton-Schulz


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (3, 24, 80), (2, 2, 80, 24), (1, 40)])
def test_gram_is_the_standard_map(schedule, shape):
    # The same polynomial map: in float64 equal to rounding, in fp32 within fp32 rounding,
    # whatever the restart interval (0: never; 1: every step, i.e. the standard iteration).
    X = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref64 = orthogonalize(X.double(), schedule, 5, torch.float64)
    for restart in (0, 1, 2, 3):
        out = orthogonalize(X.double(), schedule, 5, torch.float64, method="gram",
                            restart=restart)
        torch.testing.assert_close(out, ref64, atol=1e-12, rtol=0)
    ref = orthogonalize(X, schedule, 5, torch.float32)
    gram = orthogonalize(X, schedule, 5, torch.float32, method="gram")
    assert gram.shape == X.shape and gram.dtype == torch.float32
    torch.testing.assert_close(gram, ref, atol=2e-5, rtol=0)
    opts = NSOptions(schedule=schedule, steps=5, dtype=torch.float32, eps=1e-7, scale="none",
                     method="gram")
    assert torch.equal(orthogonalize(X, opts), gram)


def test_gram_batched_equals_one_by_one():
    X = torch.randn(2, 3, 24, 80)
    out = orthogonalize(X, dtype=torch.float32, method="gram")
    for i in range(2):
        for j in range(3):
            one = orthogonalize(X[i, j], dtype=torch.float32, method="gram")
            torch.testing.assert_close(out[i, j], one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(48, 192), (192, 48)])
@pytest.mark.parametrize("cond", [10.0, 1e3])
def test_gram_singular_values_fall_in_the_schedule_band(schedule, shape, cond):
    # As for the standard iteration: fp32 on the scalar map; bf16 within a few 1e-2 of it, the
    # top singular value up to ~0.04 above it now and then (standard bf16: ~0.01), with the
    # default restart (without one, bf16 Gram drifts far outside at condition 1e3).
    X = conditioned(*shape, cond=cond, seed=int(cond))
    sv = torch.linalg.svdvals(X)
    lo, hi = schedule_band(schedule, 5, float(sv.min() / X.norm()), float(sv.max() / X.norm()))
    # fp16 restarts once in 5 steps (GRAM_RESTART_FP16), and stays within a few 1e-3.
    for dtype, slack in ((torch.float32, 2e-3), (torch.bfloat16, 6e-2), (torch.float16, 1e-2)):
        O = orthogonalize(X.float(), schedule, 5, dtype, method="gram")
        out = torch.linalg.svdvals(O.double())
        assert out.min() >= lo - slack, (dtype, float(out.min()), lo)
        assert out.max() <= hi + slack, (dtype, float(out.max()), hi)
        cos = (O.double() * polar64(X)).sum() / (O.double().norm() * polar64(X).norm())
        assert cos > 0.9


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
def test_gram_on_a_rank_deficient_matrix(schedule):
    # Rank 16 of 48: the 16 directions land in the band; the null space stays zero in fp32. In
    # bf16 the input's rounding puts ~1e-3 in every direction and both methods amplify it (the
    # standard iteration to 0.2-0.4 here): Gram no more than standard.
    U, S, Vh = torch.linalg.svd(conditioned(48, 192, cond=10.0, seed=3), full_matrices=False)
    S[16:] = 0
    X = ((U * S) @ Vh).float()
    lo, hi = schedule_band(schedule, 5, float(S[15] / S.norm()), float(S[0] / S.norm()))
    for dtype, slack in ((torch.float32, 2e-3), (torch.bfloat16, 6e-2)):
        out = torch.linalg.svdvals(orthogonalize(X, schedule, 5, dtype, method="gram").double())
        assert lo - slack <= out[15] and out[0] <= hi + slack, (dtype, out[:16])
        std = torch.linalg.svdvals(orthogonalize(X, schedule, 5, dtype).double())
        null = 1e-4 if dtype == torch.float32 else float(std[16:].max()) + 0.05
        assert out[16:].max() < null, (dtype, float(out[16:].max()), null)


def test_gram_falls_back_where_it_saves_no_flops():
    # Gram - standard = (steps - S)(6a^3 - 4a^2 b): it pays only for b > 1.5 a.
    assert not gram_is_cheaper(64, 64, 5) and not gram_is_cheaper(64, 96, 5)
    assert gram_is_cheaper(64, 97, 5) and gram_is_cheaper(97, 64, 5)
    assert not gram_is_cheaper(32, 256, 5, restart=1)  # a restart every step is standard NS
    for shape in [(96, 96), (64, 96), (96, 64), (2, 40, 40)]:
        X = torch.randn(shape)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(orthogonalize(X, dtype=dtype, method="gram"),
                               orthogonalize(X, dtype=dtype))
    X = torch.randn(64, 97)
    assert not torch.equal(orthogonalize(X, dtype=torch.float32, method="gram"),
                           orthogonalize(X, dtype=torch.float32))


def test_gram_cost_model():
    a, b = 128, 1024
    segments = 3  # restarts after steps 2 and 4 of 5
    assert GRAM_RESTART == 2
    gram = segments * 4 * a * a * b + (4 * 5 - 3 * segments) * 2 * a**3
    assert ns_flops(a, b, 5, "gram") == ns_flops(b, a, 5, "gram") == gram
    assert ns_flops(a, b, 5, "gram") == newton_schulz_flops(a, b, 5, "gram")
    assert ns_flops(a, b, 5) == ns_flops(a, b, 5, "standard") == 5 * (4 * a * a * b + 2 * a**3)
    assert ns_flops(a, b, 5, "gram", restart=0) == 4 * a * a * b + 17 * 2 * a**3
    assert ns_flops(a, b, 5, "gram") < ns_flops(a, b, 5)
    # Where orthogonalize falls back, the cost model counts the standard iteration.
    assert ns_flops(96, 96, 5, "gram") == ns_flops(96, 96, 5)
    assert ns_flops(64, 96, 5, "gram") == ns_flops(64, 96, 5)


def test_bad_ns_method_is_refused():
    with pytest.raises(ValueError, match="ns_method='newton' is not valid.*'gram'"):
        orthogonalize(torch.randn(4, 8), method="newton")
    w = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="ns_method='fast' is not valid"):
        DistributedMuon([w], ns_method="fast")
    with pytest.raises(ValueError, match="ns_method=None is not valid"):
        DistributedMuon([{"params": [w], "ns_method": None}])


def test_distributed_muon_gram_matches_standard():
    # One process, fp32 NS and exchange: one step by Gram equals one by the standard method.
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 128), (128, 32), (48, 48), (4, 16, 64), (64,)]
    results = {}
    for method in ("standard", "gram"):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        opt = DistributedMuon(params, lr=0.1, ns_dtype="fp32", comm_dtype="fp32",
                              ns_method=method)
        assert {b.options.method for b in opt.exchange.batches} == {method}
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        results[method] = [p.detach().clone() for p in params]
        gen.manual_seed(0)
    for std, gram in zip(results["standard"], results["gram"], strict=True):
        torch.testing.assert_close(gram, std, atol=1e-6, rtol=1e-5)


# ------------------------------------- Gram NS against the SVD and an independent implementation


def scalar_map(schedule: str, steps: int, s: torch.Tensor) -> torch.Tensor:
    """The schedule's polynomial applied to singular values ``s`` in float64."""
    for a, b, c in [resolve_schedule(schedule)[min(k, len(resolve_schedule(schedule)) - 1)]
                    for k in range(steps)]:
        s = s * (a + s * s * (b + c * s * s))
    return s


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(40, 160), (160, 40), (24, 200)])
@pytest.mark.parametrize("cond", [1.0, 1e2, 1e3])
def test_gram_is_the_svd_map(schedule, shape, cond):
    # In the float64 SVD basis of X (X = U S V^T), Gram NS is U p(S/||X||_F) V^T with p the
    # schedule's scalar map: diagonal, with p on the diagonal. fp32: every entry of U^T O V
    # within 3e-5 of it. bf16: within 0.25 (measured up to 0.19 for polar_express at condition
    # 1e2-1e3, where the standard bf16 iteration stays within 0.05: Gram's m x m products
    # round more), its singular values in the band within 0.06, and its distance to U V^T the
    # schedule's own within 0.06.
    X = conditioned(*shape, cond=cond, seed=7)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    want = torch.diag(scalar_map(schedule, 5, S / X.norm()))
    lo, hi = schedule_band(schedule, 5, float(S.min() / X.norm()), float(S.max() / X.norm()))
    exact = (want - torch.eye(len(S), dtype=torch.float64)).norm() / len(S) ** 0.5
    for dtype, entry, slack in ((torch.float32, 3e-5, 2e-3), (torch.bfloat16, 0.25, 6e-2)):
        O = orthogonalize(X.float(), schedule, 5, dtype, method="gram").double()
        core = U.T @ O @ Vh.T
        assert (core - want).abs().max() < entry, (dtype, float((core - want).abs().max()))
        sv = torch.linalg.svdvals(O)
        assert lo - slack <= sv.min() and sv.max() <= hi + slack, (dtype, sv.aminmax())
        err = (O - U @ Vh).norm() / (U @ Vh).norm()
        assert abs(err - exact) < entry / 4, (dtype, float(err), float(exact))


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(192, 48), (32, 256)])
def test_gram_on_rank_deficient_matrices(schedule, shape):
    # Rank r < min(m, n), both orientations and a wider aspect: the r directions follow the
    # scalar map; the null space gets nothing in fp32 and no more than the standard iteration
    # gives it in bf16.
    X = conditioned(*shape, cond=1e2, seed=11)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    r = len(S) // 4
    S[r:] = 0
    X = (U * S) @ Vh
    want = scalar_map(schedule, 5, S[:r] / X.norm())
    for dtype, tol in ((torch.float32, 3e-5), (torch.bfloat16, 0.25)):
        O = orthogonalize(X.float(), schedule, 5, dtype, method="gram").double()
        core = U.T @ O @ Vh.T
        assert (core[:r, :r] - torch.diag(want)).abs().max() < tol, dtype
        null = torch.linalg.svdvals(O)[r:].max()
        std = torch.linalg.svdvals(orthogonalize(X.float(), schedule, 5, dtype).double())[r:]
        assert null < (1e-4 if dtype == torch.float32 else float(std.max()) + 0.05), dtype


@pytest.fixture(scope="module")
def deepspeed_ns():
    """DeepSpeed's Newton-Schulz module with its Gram and standard functions eager (its
    torch.compile skipped) and a way to pick their compute dtype (its CPU accelerator picks
    fp32; on a GPU Gram runs in fp16)."""
    original = pytest.importorskip("deepspeed.runtime.zero.muon.original_muon")
    choose = original.ns_compute_dtype

    def eager(fn):
        return getattr(fn, "_torchdynamo_orig_callable", fn)

    def run(fn, X, dtype):
        original.ns_compute_dtype = lambda method="gram": dtype
        return eager(fn)(X, 5)

    yield original, run
    original.ns_compute_dtype = choose


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 48, 192), (96, 96)])
@pytest.mark.parametrize("cond", [None, 1e3])
def test_gram_matches_deepspeeds_gram(deepspeed_ns, shape, cond):
    # Same map (Jordan's quintic, Frobenius normalization with eps 1e-7); DeepSpeed restarts
    # once (after step 2), we every 2 steps: equal in exact arithmetic. fp32 against fp32: to
    # fp32 rounding. Our fp32 against DeepSpeed's fp16 Gram (its GPU choice): within 2.5x the
    # distance of DeepSpeed's own standard NS in fp16, i.e. fp16 rounding of this map (measured:
    # 3e-3-3e-2, and 1.0-1.9x).
    module, run = deepspeed_ns
    if cond is None:
        X = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    else:
        X = conditioned(*shape[-2:], cond=cond, seed=5).float().expand(*shape).clone()
    ours = orthogonalize(X, "jordan", 5, torch.float32, method="gram").double()

    def rel(theirs: torch.Tensor) -> float:
        assert theirs.shape == X.shape
        return float((theirs.double() - ours).norm() / ours.norm())

    assert rel(run(module.zeropower_via_gram_newtonschulz, X, torch.float32)) < 2e-5
    gram16 = run(module.zeropower_via_gram_newtonschulz, X, torch.float16)
    assert gram16.dtype == torch.float16
    std16 = rel(run(module.zeropower_via_newtonschulz5, X, torch.float16))
    assert rel(gram16) < 2.5 * std16, (rel(gram16), std16)


def test_fp16_restarts_once_in_five_steps_and_counts_two_segments():
    assert gram_restart(torch.float16) == GRAM_RESTART_FP16 == 3
    assert gram_restart(torch.bfloat16) == gram_restart(torch.float32) == GRAM_RESTART == 2
    half = NSOptions(schedule="jordan", steps=5, dtype=torch.float16, eps=1e-7, scale="none",
                     method="gram")
    assert half.restart == 3 and NSOptions(**{**half.__dict__, "restart": 2}).restart == 2
    a, b = 128, 1024
    assert newton_schulz_flops(a, b, 5, "gram", half.restart) == 2 * 4 * a * a * b + 14 * 2 * a**3
    # orthogonalize's default restart is the dtype's: fp16 runs the 2-segment iteration.
    X = torch.randn(a, b, generator=torch.Generator().manual_seed(0))
    assert torch.equal(orthogonalize(X, dtype=torch.float16, method="gram"),
                       orthogonalize(X, dtype=torch.float16, method="gram", restart=3))
    assert not torch.equal(orthogonalize(X, dtype=torch.float16, method="gram"),
                           orthogonalize(X, dtype=torch.float16, method="gram", restart=2))


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("cond", [10.0, 1e3])
def test_fp16_gram_is_closer_to_the_exact_iteration_than_bf16(schedule, cond):
    # Why fp16 may restart less often: with one restart it still rounds less than bf16 does
    # with two, and less than bf16's standard iteration (measured ~5x and more).
    X = conditioned(64, 256, cond=cond, seed=7)
    exact = orthogonalize(X.double(), schedule, 5, torch.float64)

    def err(dtype: torch.dtype, method: str) -> float:
        O = orthogonalize(X.float(), schedule, 5, dtype, method=method).double()
        return float((O - exact).norm() / exact.norm())

    half = err(torch.float16, "gram")
    assert 2 * half < min(err(torch.bfloat16, "gram"), err(torch.bfloat16, "standard")), half
