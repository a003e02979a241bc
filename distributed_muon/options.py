"""Option parsing shared by the optimizer, the CLI and framework configs (JSON-friendly)."""

from __future__ import annotations

import math

import torch

DTypeLike = torch.dtype | str

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}
_ALLOWED = (torch.bfloat16, torch.float32, torch.float64)


def parse_dtype(value: DTypeLike, option: str) -> torch.dtype:
    """A torch dtype from a dtype or its JSON spelling ("bf16", "float32", ...)."""
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(
                f"{option}={value!r} is not a dtype: use 'bfloat16'/'bf16' or 'float32'/'fp32'"
            )
        return _DTYPES[key]
    if value not in _ALLOWED:
        raise ValueError(f"{option}={value} is not supported: use torch.bfloat16 or torch.float32")
    return value


MOMENTUM_FORMS = ("ema", "sum")


def check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid: use one of {list(choices)}")


def check_range(option: str, value: float, low: float, high: float = math.inf) -> None:
    if not isinstance(value, (int, float)) or not (low <= value <= high) or math.isnan(value):
        bound = f"[{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{option}={value!r} is not valid: must be a number {bound}")
