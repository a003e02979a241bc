import pytest
import torch

from distributed_muon import orthogonalize, schedule_band
from distributed_muon.orthogonalize import POLAR_EXPRESS


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
    # fp32 follows the scalar map closely; bf16 rounding moves singular values by a few 1e-2.
    for dtype, slack in ((torch.float32, 2e-3), (torch.bfloat16, 4e-2)):
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


@pytest.mark.parametrize("schedule", ["jordan", "polar_express", "svd"])
def test_zero_matrix_gives_zeros(schedule):
    for shape in [(8, 16), (3, 5, 7), (1, 9)]:
        O = orthogonalize(torch.zeros(shape), schedule)
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
