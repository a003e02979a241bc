"""Shape scale: the per-matrix update multiplier of DESIGN 1.5."""

from __future__ import annotations

import math

SCALE_MODES = ("match_rms_adamw", "original", "spectral", "none")


def shape_scale(mode: str, m: int, n: int) -> float:
    """Update multiplier ``s(m, n)`` of DESIGN 1.5 for an ``m x n`` matrix (m rows = fan-out).

    - ``match_rms_adamw``: ``0.2 * sqrt(max(m, n))`` (Moonlight): update RMS ~0.2, like AdamW.
    - ``original``: ``sqrt(max(1, m / n))`` (Keller Jordan, DeepSpeed).
    - ``spectral``: ``sqrt(m / n)`` (RMS->RMS operator norm / muP).
    - ``none``: 1.
    """
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "original":
        return math.sqrt(max(1.0, m / n))
    if mode == "spectral":
        return math.sqrt(m / n)
    if mode == "none":
        return 1.0
    raise ValueError(f"unknown scale {mode!r}: use one of {list(SCALE_MODES)}")
