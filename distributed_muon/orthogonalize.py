"""Newton-Schulz orthogonalization: the one piece of Muon math that needs whole matrices.

`orthogonalize(X)` maps each matrix `X[..., m, n]` to an approximation of its polar factor
`U V^T` (for `X = U S V^T`). The iteration is a fixed odd polynomial applied to the singular
values, so every singular value `sigma` of the Frobenius-normalized input goes through the same
scalar map `p_k(...p_2(p_1(sigma)))`; `schedule_band` evaluates that map to say where the output
singular values land.

Two methods compute the same map. ``"standard"`` iterates on ``X`` itself. ``"gram"`` (Gram
Newton-Schulz, Zhang, Amsel, Chen, Dao 2026) uses that every step multiplies ``X`` by a
polynomial of the Gram matrix: it iterates on ``m x m`` matrices only and touches the ``m x n``
``X`` at the start, at each restart and at the end, which saves FLOPs when ``n > 1.5 m``
(`newton_schulz_flops`); elsewhere it runs the standard iteration.

Both methods spend most of their FLOPs on products whose result is symmetric (``X X^T``,
``A A``, and Gram's products of commuting polynomials in ``X X^T``). On CUDA in bf16/fp16 with
Triton installed, those run by `distributed_muon.symmetric` (half of the tiles) from
``SYMMETRIC_MIN_SIZE`` rows up; everywhere else by torch's batched matmuls.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch

from distributed_muon.dtypes import NS_DTYPES, DTypeLike, parse_dtype

logger = logging.getLogger(__name__)

Coefficients = tuple[float, float, float]

# Keller Jordan's quintic, used for every step.
JORDAN: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),)

# Amsel, Persson, Musco, Gower, "The Polar Express" (arXiv 2505.16932), degree 5, lower bound
# 1e-3. Every polynomial but the last is shrunk by the paper's safety factor 1.01 (a/1.01,
# b/1.01^3, c/1.01^5) for bf16 stability; the last one is the converged map, repeated.
_PE_RAW: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
POLAR_EXPRESS: tuple[Coefficients, ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW
) + ((1.875, -1.25, 0.375),)

SCHEDULES: dict[str, tuple[Coefficients, ...]] = {
    "jordan": JORDAN,
    "polar_express": POLAR_EXPRESS,
}

Schedule = str | Sequence[Sequence[float]]

NS_METHODS = ("standard", "gram")
# Gram Newton-Schulz rebuilds X and its Gram matrix from X every GRAM_RESTART steps (after
# steps 2 and 4 of 5), which bounds the rounding drift of the accumulated m x m products.
# Every 2 steps is the longest interval measured accurate in bf16; longer ones overshoot on
# ill-conditioned inputs and no restart diverges (docs/muon.md, "Gram Newton-Schulz", Restart:
# the measurement and its command, `scripts/bench_ns.py --accuracy`).
GRAM_RESTART = 2
# fp16 rounds 8x finer than bf16 (3 more mantissa bits): restarting every 3 steps (once in 5)
# is measured still more accurate than bf16's standard iteration (docs/muon.md, "fp16
# Newton-Schulz"), and saves one X X^T and one Q X.
GRAM_RESTART_FP16 = 3


def gram_restart(dtype: torch.dtype) -> int:
    """Gram Newton-Schulz's restart interval in compute dtype ``dtype``."""
    return GRAM_RESTART_FP16 if dtype == torch.float16 else GRAM_RESTART


# Gram saves FLOPs exactly when n > GRAM_MIN_ASPECT * m (see `newton_schulz_flops`).
GRAM_MIN_ASPECT = 1.5

# kernel="auto" runs the symmetric products by the Triton kernel on CUDA (bf16/fp16) when the
# m x m result has at least this many rows: the smallest size at which the kernel was measured
# to beat torch's full product on both products (docs/benchmarks.md, "Symmetric-product kernel,
# one H100": the table and its command, `scripts/bench_ns.py --products`). The environment variable
# DMUON_SYMMETRIC_MIN_SIZE overrides it (`symmetric_min_size`; a huge value turns the kernel off).
SYMMETRIC_MIN_SIZE = 8192
KERNELS = ("auto", "torch", "triton")


@dataclass(frozen=True, kw_only=True)
class NSOptions:
    """Everything that decides how a matrix is orthogonalized and scaled: matrices are batched
    into one Newton-Schulz call only when their options are equal (so the value is hashable:
    a custom ``schedule`` is a tuple of ``(a, b, c)`` tuples).

    ``schedule``, ``steps``, ``dtype``, ``eps``, ``method`` and ``restart`` are
    `orthogonalize`'s arguments (``restart=None``: `gram_restart` of ``dtype``); ``scale`` is
    the `distributed_muon.scale.shape_scale` mode the caller multiplies the result by.
    """

    schedule: str | tuple[Coefficients, ...]
    steps: int
    dtype: torch.dtype
    eps: float
    scale: str
    method: str = "standard"
    restart: int | None = None

    def __post_init__(self) -> None:
        if self.restart is None:  # frozen: set once, so equal options batch together
            object.__setattr__(self, "restart", gram_restart(self.dtype))


def resolve_schedule(schedule: Schedule) -> tuple[Coefficients, ...] | None:
    """Coefficient list of a schedule name or custom list; None for ``"svd"``.

    Step ``k`` (0-based) uses entry ``min(k, len - 1)``, so a one-entry list is a fixed
    polynomial and a longer list ends on the polynomial it repeats.
    """
    if isinstance(schedule, str):
        if schedule == "svd":
            return None
        if schedule not in SCHEDULES:
            raise ValueError(
                f"unknown ns_schedule {schedule!r}: use one of "
                f"{sorted([*SCHEDULES, 'svd'])} or a list of (a, b, c) coefficients"
            )
        return SCHEDULES[schedule]
    coeffs = tuple(tuple(float(v) for v in c) for c in schedule)
    if not coeffs or any(len(c) != 3 for c in coeffs):
        raise ValueError(
            f"a custom ns_schedule must be a non-empty list of (a, b, c) triples, got {schedule!r}"
        )
    return coeffs  # type: ignore[return-value]


def check_method(method: str) -> None:
    """Raise the ``ns_method`` error for anything but a name in `NS_METHODS`."""
    if method not in NS_METHODS:
        raise ValueError(
            f"ns_method={method!r} is not valid: use 'standard' (Newton-Schulz on X) or 'gram' "
            "(Gram Newton-Schulz, the same map computed on X X^T; faster for wide matrices)"
        )


def _segments(steps: int, restart: int) -> int:
    """How many times Gram Newton-Schulz forms ``X X^T`` from ``X``: once, plus a restart every
    ``restart`` steps (``restart <= 0``: never)."""
    return 1 if restart <= 0 else -(-steps // restart)


def gram_is_cheaper(m: int, n: int, steps: int, restart: int = GRAM_RESTART) -> bool:
    """Whether Gram Newton-Schulz takes fewer FLOPs than the standard iteration on ``m x n``:
    exactly when ``max(m, n) > 1.5 min(m, n)`` and some segment between restarts is longer
    than one step (see `newton_schulz_flops`)."""
    a, b = min(m, n), max(m, n)
    return 2 * b > 3 * a and _segments(steps, restart) < steps


def newton_schulz_flops(
    m: int, n: int, steps: int, method: str = "standard", restart: int = GRAM_RESTART
) -> float:
    """Matmul FLOPs of `orthogonalize` on one ``m x n`` matrix (``a = min``, ``b = max``).

    Standard, per step: ``A = X X^T`` (``2a^2b``), ``A A`` (``2a^3``), ``B X`` (``2a^2b``):
    ``steps*(4a^2b + 2a^3)``. Gram, per segment of ``L`` steps between restarts: ``X X^T`` and
    the final ``Q X`` (``4a^2b``) plus ``4L - 3`` products of ``a x a`` matrices (``R R``,
    ``P Q``, ``P R``, ``(P R) P`` per step; the first step has ``Q = P``, the last one needs no
    new ``R``): ``S*4a^2b + (4*steps - 3S)*2a^3`` over ``S`` segments. Gram minus standard is
    ``(steps - S)(6a^3 - 4a^2b)``: negative exactly when ``b > 1.5a``, whatever the steps and
    restarts, which is where `orthogonalize` uses Gram; elsewhere this is the standard count.
    """
    a, b = min(m, n), max(m, n)
    if method == "gram" and gram_is_cheaper(m, n, steps, restart):
        segments = _segments(steps, restart)
        return float(segments * 4 * a * a * b + (4 * steps - 3 * segments) * 2 * a**3)
    return float(steps) * (4.0 * a * a * b + 2.0 * a**3)


# A product known to be symmetric: (A, B, alpha=, beta=, D=, diag=) ->
# alpha * A @ B + beta * D + diag * I, batched [B, m, k] @ [B, k, m].
SymmetricProduct = Callable[..., torch.Tensor]


def _torch_symmetric(
    A: torch.Tensor, B: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0,
    D: torch.Tensor | None = None, diag: float = 0.0,
) -> torch.Tensor:
    if D is None:
        C = torch.bmm(A, B)
        if alpha != 1.0:
            C.mul_(alpha)
    else:
        C = torch.baddbmm(D, A, B, beta=beta, alpha=alpha)
    if diag:
        C.diagonal(dim1=-2, dim2=-1).add_(diag)
    return C


@functools.cache
def _symmetric_module() -> ModuleType | None:
    """`distributed_muon.symmetric`, or None where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from distributed_muon import symmetric
    except Exception as e:  # noqa: BLE001 - a Triton this module cannot use: torch then
        logger.warning("the Triton symmetric-product kernel is unavailable (%s: %s)",
                       type(e).__name__, e)
        return None
    return symmetric


def symmetric_kernel_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel for symmetric products can run on ``device``."""
    return torch.device(device).type == "cuda" and _symmetric_module() is not None


def symmetric_min_size() -> int:
    """Rows from which ``kernel="auto"`` runs the symmetric products by the Triton kernel:
    the environment variable ``DMUON_SYMMETRIC_MIN_SIZE`` when set, else `SYMMETRIC_MIN_SIZE`.
    Read at each call (not at import), so a launcher or test that sets it later is obeyed."""
    value = os.environ.get("DMUON_SYMMETRIC_MIN_SIZE")
    return int(value) if value is not None else SYMMETRIC_MIN_SIZE


def _symmetric_product(Y: torch.Tensor, kernel: str) -> SymmetricProduct:
    """How `orthogonalize` computes the symmetric products of the batch ``Y[B, m, n]``."""
    if kernel == "torch":
        return _torch_symmetric
    fits = Y.is_cuda and Y.dtype in (torch.bfloat16, torch.float16)
    if kernel == "triton":
        module = _symmetric_module()
        if not fits or module is None:
            raise ValueError(f"kernel='triton' needs CUDA, Triton and a bf16/fp16 ns_dtype, got "
                             f"{Y.dtype} on {Y.device} (Triton installed: {module is not None})")
        return module.symmetric_matmul
    if fits and Y.shape[-2] >= symmetric_min_size() and _kernel_failure is None \
            and _symmetric_module() is not None:
        return _kernel_or_torch
    return _torch_symmetric


# Why the kernel failed in this process (kernel="auto" then runs torch from there on), or None.
_kernel_failure: str | None = None


def _kernel_or_torch(A: torch.Tensor, B: torch.Tensor, **kw: object) -> torch.Tensor:
    """The kernel, or torch where it fails (an optional kernel that does not compile on this
    GPU or Triton version must not stop training): logged once, then torch for the process."""
    global _kernel_failure
    if _kernel_failure is None:
        try:
            return _symmetric_module().symmetric_matmul(A, B, **kw)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the optional kernel
            _kernel_failure = f"{type(e).__name__}: {e}"
            logger.warning("the Triton symmetric-product kernel failed (%s); Newton-Schulz "
                           "uses torch's matmuls from now on in this process", _kernel_failure)
    return _torch_symmetric(A, B, **kw)


def _step_coefficients(coeffs: tuple[Coefficients, ...], steps: int) -> list[Coefficients]:
    return [coeffs[min(k, len(coeffs) - 1)] for k in range(steps)]


def orthogonalize(
    X: torch.Tensor,
    schedule: Schedule | NSOptions = "jordan",
    steps: int = 5,
    dtype: DTypeLike = torch.bfloat16,
    eps: float = 1e-7,
    method: str = "standard",
    restart: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Approximate polar factor of every matrix in ``X[..., m, n]``.

    Newton-Schulz: ``X <- X / (||X||_F + eps)`` (transposed when ``m > n`` so the Gram matrix is
    the small side), then per step ``A = X X^T; X = a X + (b A + c A A) X``, computed in
    ``dtype``. ``schedule="svd"`` returns the exact ``U V^T`` instead, in float32 (float64 for
    float64 input) whatever ``dtype`` says; singular directions with zero singular value map to
    zero, so a zero matrix gives zeros under every schedule.

    ``method="gram"`` computes the same polynomial map by Gram Newton-Schulz (`_gram_iterate`),
    restarting from ``X`` every ``restart`` steps (``<= 0``: never; None: `gram_restart` of
    ``dtype``, 2 steps, 3 in fp16), where it saves FLOPs
    (`gram_is_cheaper`: ``max(m, n) > 1.5 min(m, n)``); other shapes run the standard iteration.
    The normalization is fp32 for both methods.

    ``kernel`` says how the symmetric products run: ``"auto"`` by the Triton kernel on CUDA in
    bf16/fp16 for ``min(m, n) >= symmetric_min_size()`` (torch elsewhere), ``"torch"`` always by
    torch, ``"triton"`` always by the kernel (an error where it cannot run). The torch path is
    bit for bit the same computation on every device.

    ``schedule`` may instead be an `NSOptions`, which then gives ``schedule``, ``steps``,
    ``dtype``, ``eps``, ``method`` and ``restart`` (its ``scale`` is the caller's to apply).

    Returns a tensor of ``X``'s shape in the compute dtype (``dtype``, or the SVD dtype).
    """
    if isinstance(schedule, NSOptions):
        opts = schedule
        schedule, steps, dtype, eps = opts.schedule, opts.steps, opts.dtype, opts.eps
        method, restart = opts.method, opts.restart
    if X.ndim < 2:
        raise ValueError(f"orthogonalize needs [..., m, n], got shape {tuple(X.shape)}")
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    check_method(method)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not valid: use one of {KERNELS}")
    coeffs = resolve_schedule(schedule)
    if coeffs is None:
        return _polar_factor_svd(X)
    dtype = parse_dtype(dtype, "ns_dtype", NS_DTYPES)
    if restart is None:
        restart = gram_restart(dtype)
    m, n = X.shape[-2:]
    batch = X.reshape(-1, m, n)
    if m > n:
        batch = batch.mT
    norm = torch.linalg.matrix_norm(batch.float(), keepdim=True)
    Y = (batch.float() / (norm + eps)).to(dtype)
    step_coeffs = _step_coefficients(coeffs, steps)
    sym = _symmetric_product(Y, kernel)
    if method == "gram" and gram_is_cheaper(m, n, steps, restart):
        Y = _gram_iterate(Y, step_coeffs, restart, sym)
    else:
        for a, b, c in step_coeffs:
            A = sym(Y, Y.mT)
            B = sym(A, A, alpha=c, beta=b, D=A)  # b A + c A A
            Y = torch.baddbmm(Y, B, Y, beta=a)
    if m > n:
        Y = Y.mT
    return Y.reshape(X.shape)


def _gram_iterate(
    Y: torch.Tensor, step_coeffs: list[Coefficients], restart: int,
    sym: SymmetricProduct = _torch_symmetric,
) -> torch.Tensor:
    """Gram Newton-Schulz on a batch ``Y[B, m, n]``, ``m < n``, already normalized.

    A standard step is ``Y <- p(Y Y^T) Y`` with ``p(t) = a + b t + c t^2``, so after any number
    of steps ``Y = Q Y0`` for an ``m x m`` matrix ``Q`` that, like the current Gram matrix
    ``R = Y Y^T``, is a polynomial in ``Y0 Y0^T``: all of them commute. Each step is therefore
    ``P = p(R); Q <- P Q; R <- P R P`` on ``m x m`` matrices, and ``Y`` is formed once at the
    end of each segment of ``restart`` steps (``Y = Q Y0``), from which the next segment starts
    afresh (``R = Y Y^T``, ``Q = I``), so the rounding of ``Q`` and ``R`` never compounds for
    more than ``restart`` steps. Every ``m x m`` product here is symmetric (polynomials in one
    matrix commute), so all of them go through ``sym``.
    """
    size = len(step_coeffs) if restart <= 0 else restart
    for start in range(0, len(step_coeffs), size):
        segment = step_coeffs[start:start + size]
        R = sym(Y, Y.mT)
        Q: torch.Tensor | None = None
        for k, (a, b, c) in enumerate(segment):
            P = sym(R, R, alpha=c, beta=b, D=R, diag=a)  # a I + b R + c R R
            Q = P if Q is None else sym(P, Q)
            if k + 1 < len(segment):
                R = sym(sym(P, R), P)
        Y = torch.bmm(Q, Y)
    return Y


def _polar_factor_svd(X: torch.Tensor) -> torch.Tensor:
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(X.to(work), full_matrices=False)
    # Singular values at rounding level carry no direction: treat them as zero, as pinv does.
    tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(work).eps
    keep = (S > tol).to(work)
    return (U * keep.unsqueeze(-2)) @ Vh


def schedule_band(
    schedule: Schedule, steps: int, lower: float, upper: float = 1.0, points: int = 20001
) -> tuple[float, float]:
    """Range ``(min, max)`` of the scalar NS map over singular values in ``[lower, upper]``.

    ``lower``/``upper`` are singular values of the Frobenius-normalized input (so
    ``upper <= 1``). Computed in float64 on a log-spaced grid; this is the band the output
    singular values of `orthogonalize` fall in, before rounding in the compute dtype.
    """
    coeffs = resolve_schedule(schedule)
    if coeffs is None:
        return (1.0, 1.0)
    s = torch.logspace(
        torch.log10(torch.tensor(lower)), torch.log10(torch.tensor(upper)), points,
        dtype=torch.float64,
    )
    for a, b, c in _step_coefficients(coeffs, steps):
        s2 = s * s
        s = s * (a + s2 * (b + c * s2))
    return (float(s.min()), float(s.max()))
