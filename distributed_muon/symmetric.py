"""Symmetric matrix products on CUDA by a Triton kernel that computes half of the tiles.

Newton-Schulz spends most of its FLOPs on products whose result is symmetric: ``X X^T``,
``A A`` for a symmetric ``A`` and, in Gram Newton-Schulz, products of commuting symmetric
matrices (all polynomials in the same Gram matrix). `symmetric_matmul` computes the tiles
``(i, j)`` with ``i <= j`` of such a result, each from its own row block of ``A`` and column
block of ``B``, and writes every off-diagonal tile twice (as itself and transposed): about half
the matmul FLOPs of the full product.

This module imports Triton at import time: `distributed_muon.orthogonalize` imports it only on
CUDA and only when Triton is installed (`available`), and uses it where it is faster
(``SYMMETRIC_MIN_SIZE`` there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16)

# Square output tiles (BLOCK x BLOCK) and the reduction step; autotuned per (M, K) once per
# process. Hopper/Ampere tensor-core friendly sizes; the wide ones win on large outputs, the
# 64-wide ones keep more programs in flight on small ones. Each compiles for sm_90 with
# Triton 3.9 to pipelined cp.async + wgmma code using at most 128 KiB of shared memory.
_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]


@triton.autotune(configs=_CONFIGS, key=["M", "K", "HAS_D", "HAS_DIAG"])
@triton.jit
def _upper_tiles_kernel(
    a_ptr, b_ptr, d_ptr, c_ptr, M, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_db, s_dm, s_dn, s_cb, s_cm, s_cn,
    alpha, beta, diag,
    HAS_D: tl.constexpr, HAS_DIAG: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program p of a batch handles the p-th tile of the upper triangle. Number the pairs
    # (lo, hi), lo <= hi, as p = hi*(hi+1)/2 + lo: hi is the largest integer with
    # hi*(hi+1)/2 <= p (the float square root is corrected by one either way).
    p = tl.program_id(0)
    hi = ((tl.sqrt(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    hi = tl.where(hi * (hi + 1) // 2 > p, hi - 1, hi)
    hi = tl.where((hi + 1) * (hi + 2) // 2 <= p, hi + 1, hi)
    lo = p - hi * (hi + 1) // 2
    batch = tl.program_id(1).to(tl.int64)

    rows = lo * BLOCK + tl.arange(0, BLOCK)  # of C: row block lo, column block hi
    cols = hi * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * s_ab + rows[:, None] * s_am + ks[None, :] * s_ak
    b_ptrs = b_ptr + batch * s_bb + ks[:, None] * s_bk + cols[None, :] * s_bn
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (cols[None, :] < M), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    # Epilogue in fp32, rounded once, as cuBLAS's baddbmm does.
    acc = acc * alpha
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_D:
        d = tl.load(d_ptr + batch * s_db + rows[:, None] * s_dm + cols[None, :] * s_dn,
                    mask=inside, other=0.0)
        acc += beta * d.to(tl.float32)
    if HAS_DIAG:
        acc += tl.where(rows[:, None] == cols[None, :], diag, 0.0)
    out = acc.to(c_ptr.dtype.element_ty)
    c_batch = c_ptr + batch * s_cb
    tl.store(c_batch + rows[:, None] * s_cm + cols[None, :] * s_cn, out, mask=inside)
    if lo != hi:  # the mirror tile (hi, lo), stored row-major like the first
        tl.store(c_batch + cols[:, None] * s_cm + rows[None, :] * s_cn, tl.trans(out),
                 mask=(cols[:, None] < M) & (rows[None, :] < M))


def symmetric_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    D: torch.Tensor | None = None,
    diag: float = 0.0,
) -> torch.Tensor:
    """``alpha * A @ B + beta * D + diag * I`` for ``A[..., m, k]``, ``B[..., k, m]``, where the
    caller guarantees the result is symmetric (``D`` too, if given, ``[..., m, m]``).

    Only the upper-triangular tiles are computed; the lower ones are their transposes, so the
    result is exactly symmetric outside the diagonal tiles. Inputs may be strided views (pass
    ``X.mT`` for ``X X^T``); CUDA, bf16 or fp16, products accumulated in fp32. Returns a new
    contiguous ``[..., m, m]`` tensor in ``A``'s dtype.
    """
    if A.ndim < 2 or A.shape[:-2] != B.shape[:-2] or A.shape[-1] != B.shape[-2] \
            or A.shape[-2] != B.shape[-1]:
        raise ValueError(f"symmetric_matmul needs A[..., m, k] and B[..., k, m], got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if A.dtype not in DTYPES or B.dtype != A.dtype or not A.is_cuda or B.device != A.device:
        raise ValueError(f"symmetric_matmul runs on CUDA in bf16/fp16, got {A.dtype} on "
                         f"{A.device} and {B.dtype} on {B.device}")
    m, k = A.shape[-2:]
    batch_shape = A.shape[:-2]
    if D is not None and D.shape != (*batch_shape, m, m):
        raise ValueError(f"symmetric_matmul: D must be {(*batch_shape, m, m)}, got "
                         f"{tuple(D.shape)}")
    C = _launch(A.reshape(-1, m, k), B.reshape(-1, k, m),
                None if D is None else D.reshape(-1, m, m), alpha, beta, diag)
    return C.reshape(*batch_shape, m, m)


def _launch(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor | None, alpha: float,
            beta: float, diag: float) -> torch.Tensor:
    """The kernel on checked 3-D operands ``a[B, m, k]``, ``b[B, k, m]``, ``d[B, m, m]``."""
    nb, m, k = a.shape
    C = torch.empty((nb, m, m), dtype=a.dtype, device=a.device)
    if C.numel() == 0:
        return C

    def grid(meta: dict) -> tuple[int, int]:
        t = triton.cdiv(m, meta["BLOCK"])
        return (t * (t + 1) // 2, nb)

    dd = C if d is None else d  # C stands in for an absent D: never read (HAS_D is off)
    _upper_tiles_kernel[grid](
        a, b, dd, C, m, k,
        *a.stride(), *b.stride(), *dd.stride(), *C.stride(),
        float(alpha), float(beta), float(diag),
        HAS_D=d is not None, HAS_DIAG=diag != 0.0,
    )
    return C


def gram(X: torch.Tensor) -> torch.Tensor:
    """``X X^T`` of ``X[..., m, n]`` by `symmetric_matmul`."""
    return symmetric_matmul(X, X.mT)
