"""The Triton kernel for symmetric products (`distributed_muon.symmetric`) and its use in
Newton-Schulz. The kernel tests skip without CUDA or Triton (CI has neither); run them on a GPU
machine with ``python -m pytest tests/test_gpu_kernels.py``. The CPU tests at the end check that
the torch path is what runs everywhere else."""

from __future__ import annotations

import importlib

import pytest
import torch

from distributed_muon import orthogonalize, schedule_band
from distributed_muon.orthogonalize import KERNELS, symmetric_kernel_available

ortho = importlib.import_module("distributed_muon.orthogonalize")

kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and symmetric_kernel_available("cuda")),
    reason="needs CUDA and Triton",
)

# Output sizes around the tile sizes (64, 128): multiples, one over, one under, odd, tiny.
SIZES = [1, 63, 64, 129, 200, 384, 1000]
HALF = (torch.bfloat16, torch.float16)


def _matmul():
    from distributed_muon.symmetric import symmetric_matmul

    return symmetric_matmul


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Within one rounding of the result (both accumulate in fp32 and round once)."""
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    scale = float(want.abs().max())
    torch.testing.assert_close(got.float(), want, rtol=2 * ulp, atol=4 * ulp * scale)


@kernel
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", SIZES)
def test_gram_product_matches_torch(dtype, m):
    mm = _matmul()
    gen = torch.Generator(device="cuda").manual_seed(m)
    for k in (1, 70, 513):
        X = (torch.randn(3, m, k, device="cuda", generator=gen) / k**0.5).to(dtype)
        C = mm(X, X.mT)
        assert C.shape == (3, m, m) and C.dtype == dtype and C.is_contiguous()
        _close(C, X.float() @ X.float().mT, dtype)
        # The lower tiles are the upper ones transposed (diagonal tiles: within one rounding).
        _close(C.mT, C.float(), dtype)


@kernel
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", SIZES)
def test_polynomial_product_matches_torch(dtype, m):
    # alpha A A + beta A + diag I for a symmetric A: the NS step's b A + c A A (+ a I in Gram).
    mm = _matmul()
    gen = torch.Generator(device="cuda").manual_seed(m + 1)
    X = torch.randn(2, m, 2 * m + 3, device="cuda", generator=gen)
    A = (X @ X.mT / (2 * m + 3)).to(dtype)
    Af = A.float()
    want = -1.25 * Af @ Af + 0.75 * Af + 3.0 * torch.eye(m, device="cuda")
    _close(mm(A, A, alpha=-1.25, beta=0.75, D=A, diag=3.0), want, dtype)
    _close(mm(A, A, alpha=2.0), 2.0 * Af @ Af, dtype)
    # Products of commuting symmetric matrices (Gram NS's P Q): P = p(A), Q = q(A).
    P = (Af @ Af + Af).to(dtype)
    Q = (2 * Af + torch.eye(m, device="cuda")).to(dtype)
    _close(mm(P, Q), P.float() @ Q.float(), dtype)


@kernel
def test_strided_and_batched_operands():
    mm = _matmul()
    X = torch.randn(2, 3, 130, 300, device="cuda", dtype=torch.bfloat16)
    C = mm(X, X.mT)  # B is a transposed view
    assert C.shape == (2, 3, 130, 130)
    _close(C, X.float() @ X.float().mT, torch.bfloat16)
    Y = torch.randn(300, 260, device="cuda", dtype=torch.bfloat16)[:, ::2]  # strided columns
    _close(mm(Y, Y.mT), Y.float() @ Y.float().mT, torch.bfloat16)
    empty = torch.empty(0, 5, 7, device="cuda", dtype=torch.bfloat16)
    assert mm(empty, empty.mT).shape == (0, 5, 5)


@kernel
def test_bad_operands_are_refused():
    mm = _matmul()
    X = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA in bf16/fp16"):
        mm(X.float(), X.float().mT)
    with pytest.raises(ValueError, match="CUDA in bf16/fp16"):
        mm(X.cpu(), X.cpu().mT)
    with pytest.raises(ValueError, match=r"A\[\.\.\., m, k\] and B\[\.\.\., k, m\]"):
        mm(X, X)
    with pytest.raises(ValueError, match="D must be"):
        mm(X, X.mT, D=torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@kernel
@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(300, 1000), (1000, 300), (2, 257, 257), (129, 700)])
def test_newton_schulz_with_the_kernel_matches_without(method, schedule, shape):
    # The same map to bf16 rounding: each path's distance from the float64 iteration is that of
    # bf16 (~1-2e-2 here), the kernel's no worse than torch's by more than rounding noise, and
    # the output singular values stay in the schedule's band.
    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(shape, device="cuda", generator=gen)
    exact = orthogonalize(X.double().cpu(), schedule, 5, torch.float64, method=method)
    plain = orthogonalize(X, schedule, 5, "bf16", method=method, kernel="torch").cpu()
    fast = orthogonalize(X, schedule, 5, "bf16", method=method, kernel="triton").cpu()
    assert fast.shape == X.shape and fast.dtype == torch.bfloat16
    err_plain, err_fast = _rel(plain, exact), _rel(fast, exact)
    assert err_fast < 1.5 * err_plain + 5e-3, (err_fast, err_plain)
    assert _rel(fast, plain) < 0.1, _rel(fast, plain)
    Xm = X.double().cpu().reshape(-1, *shape[-2:])
    sv_in = torch.linalg.svdvals(Xm) / torch.linalg.matrix_norm(Xm).unsqueeze(-1)
    lo, hi = schedule_band(schedule, 5, float(sv_in.min()), float(sv_in.max()))
    sv = torch.linalg.svdvals(fast.double().reshape(-1, *shape[-2:]))
    assert lo - 6e-2 <= float(sv.min()) and float(sv.max()) <= hi + 6e-2, (sv.aminmax(), lo, hi)


@kernel
def test_auto_uses_the_kernel_from_the_size_threshold(monkeypatch):
    X = torch.randn(256, 600, device="cuda")
    with_kernel = orthogonalize(X, kernel="triton")
    without = orthogonalize(X, kernel="torch")
    monkeypatch.setattr(ortho, "SYMMETRIC_MIN_SIZE", 256)
    assert torch.equal(orthogonalize(X), with_kernel)
    assert torch.equal(orthogonalize(X.mT), with_kernel.mT)  # 600x256: the small side counts
    monkeypatch.setattr(ortho, "SYMMETRIC_MIN_SIZE", 257)
    assert torch.equal(orthogonalize(X), without)
    # fp32 NS always runs by torch (the kernel is bf16/fp16 only).
    monkeypatch.setattr(ortho, "SYMMETRIC_MIN_SIZE", 0)
    assert torch.equal(orthogonalize(X, dtype="fp32"), orthogonalize(X, dtype="fp32",
                                                                      kernel="torch"))


# ---------------------------------------------------------------- everywhere (CPU in CI)


def test_cpu_runs_the_torch_path(monkeypatch):
    monkeypatch.setattr(ortho, "SYMMETRIC_MIN_SIZE", 0)  # even where the size would qualify
    X = torch.randn(3, 40, 90)
    for method in ("standard", "gram"):
        for dtype in ("bf16", "fp32"):
            assert torch.equal(orthogonalize(X, dtype=dtype, method=method),
                               orthogonalize(X, dtype=dtype, method=method, kernel="torch"))


def test_bad_kernel_choice_is_refused():
    assert KERNELS == ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="kernel='cuda' is not valid"):
        orthogonalize(torch.randn(4, 8), kernel="cuda")
    with pytest.raises(ValueError, match="kernel='cuda' is not valid"):
        orthogonalize(torch.randn(4, 8), "svd", kernel="cuda")
    with pytest.raises(ValueError, match="kernel='triton' needs CUDA"):
        orthogonalize(torch.randn(4, 8), kernel="triton")
    assert not symmetric_kernel_available("cpu")


class _Broken:
    """A kernel module whose kernel fails, as one that does not compile would."""

    calls = 0

    @classmethod
    def symmetric_matmul(cls, A, B, **kw):
        cls.calls += 1
        raise RuntimeError("PTX assembly aborted")


def test_a_failing_kernel_falls_back_to_torch_once(monkeypatch, caplog):
    monkeypatch.setattr(_Broken, "calls", 0)
    monkeypatch.setattr(ortho, "_symmetric_module", lambda: _Broken)
    monkeypatch.setattr(ortho, "_kernel_failure", None)
    A = torch.randn(2, 8, 16)
    with caplog.at_level("WARNING", logger="distributed_muon.orthogonalize"):
        assert torch.equal(ortho._kernel_or_torch(A, A.mT), torch.bmm(A, A.mT))
        S = torch.bmm(A, A.mT)
        want = torch.baddbmm(S, S, S, beta=0.5, alpha=2.0)
        want.diagonal(dim1=-2, dim2=-1).add_(3.0)
        got = ortho._kernel_or_torch(S, S, alpha=2.0, beta=0.5, D=S, diag=3.0)
        assert torch.equal(got, want)
    assert _Broken.calls == 1  # not tried again in this process
    assert "PTX assembly aborted" in ortho._kernel_failure
    assert "PTX assembly aborted" in caplog.text and len(caplog.records) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_survives_a_failing_kernel(monkeypatch):
    monkeypatch.setattr(ortho, "_symmetric_module", lambda: _Broken)
    monkeypatch.setattr(ortho, "_kernel_failure", None)
    monkeypatch.setattr(ortho, "SYMMETRIC_MIN_SIZE", 0)
    X = torch.randn(64, 200, device="cuda")
    for method in ("standard", "gram"):
        assert torch.equal(orthogonalize(X, method=method),
                           orthogonalize(X, method=method, kernel="torch"))
    assert ortho._kernel_failure is not None
