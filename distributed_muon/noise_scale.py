"""The gradient noise scale ``B_simple`` from two batch sizes (McCandlish et al. 2018, app. A).

Let ``G`` be the true gradient and ``Sigma`` the per-sample gradient covariance. The mean
gradient of ``B`` independent samples has ``E|g_B|^2 = |G|^2 + tr(Sigma) / B``. From the
squared norms at a small batch ``b`` (each data-parallel rank's local gradient, before the
average) and at the big batch ``B`` (the averaged gradient), unbiased estimates are

    |G|^2     ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)

and ``B_simple = tr(Sigma) / |G|^2``, in the unit of ``b`` and ``B`` (samples, or tokens if
they are counted in tokens). For an ``m x n`` matrix with per-entry variance ``sigma^2`` this
is ``m n sigma^2 / ||G||_F^2``, the ``B_simple`` of the learning-rate rule
``eta*(B) ~ eta_max / sqrt(1 + B_simple / B)``. One step's estimates are noisy (the
``|G|^2`` one can be negative), so both are smoothed by an exponential moving average
before the ratio is taken, as the paper does.
"""

from __future__ import annotations

import math

import torch


def two_batch_estimates(small_sq: torch.Tensor, big_sq: torch.Tensor, small: float,
                        big: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``|G|^2``, ``tr(Sigma)``) estimates, elementwise over the tensors' entries (one entry
    per matrix or group). ``small_sq``: mean over the small batches of ``|g_b|^2``; ``big_sq``:
    ``|g_B|^2``; ``small < big`` are the batch sizes."""
    if not 0 < small < big:
        raise ValueError(f"two_batch_estimates needs 0 < small < big, got {small}, {big}")
    g2 = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
    return g2, trace


class NoiseScale:
    """``B_simple`` per named entry, smoothed over updates.

    ``beta`` is the EMA factor of each update (0: no smoothing); the averages are
    bias-corrected, so the first update gives that step's own estimate.
    """

    def __init__(self, names: list[str], beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r} is not valid: must be in [0, 1)")
        self.names, self.beta = list(names), beta
        self._g2 = torch.zeros(len(names), dtype=torch.float64)
        self._trace = torch.zeros(len(names), dtype=torch.float64)
        self.updates = 0

    def update(self, small_sq: torch.Tensor, big_sq: torch.Tensor, small: float,
               big: float) -> dict[str, float]:
        """Add one step's squared norms (``[len(names)]``); returns the smoothed scalars:
        ``<name>/b_simple``, ``<name>/grad_sq`` (``|G|^2``), ``<name>/trace_cov``
        (``tr(Sigma)``), and this step's own ``<name>/b_simple_step``, ``<name>/grad_sq_step``
        and ``<name>/trace_cov_step`` (to average over any window later)."""
        g2, trace = two_batch_estimates(small_sq.double().cpu(), big_sq.double().cpu(),
                                        small, big)
        self._g2.mul_(self.beta).add_(g2, alpha=1 - self.beta)
        self._trace.mul_(self.beta).add_(trace, alpha=1 - self.beta)
        self.updates += 1
        correction = 1 - self.beta**self.updates
        out: dict[str, float] = {}
        for i, name in enumerate(self.names):
            g2_avg = float(self._g2[i]) / correction
            trace_avg = float(self._trace[i]) / correction
            out[f"{name}/b_simple"] = trace_avg / g2_avg if g2_avg > 0 else math.nan
            out[f"{name}/grad_sq"] = g2_avg
            out[f"{name}/trace_cov"] = trace_avg
            out[f"{name}/b_simple_step"] = (float(trace[i] / g2[i]) if float(g2[i]) > 0
                                            else math.nan)
            out[f"{name}/grad_sq_step"] = float(g2[i])
            out[f"{name}/trace_cov_step"] = float(trace[i])
        return out
