"""Dtypes as options spell them: ``torch.bfloat16``, ``"bf16"``, ``"bfloat16"``, ...

Below every other module (Newton-Schulz, the exchange and the option schema all parse dtypes),
so it imports nothing of the package.
"""

from __future__ import annotations

import torch

DTypeLike = torch.dtype | str

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}
# fp16 (max 65504) only where values are bounded: Newton-Schulz runs on Frobenius-normalized
# matrices; the momenta exchanged between ranks carry the gradients' unbounded scale.
COMM_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def parse_dtype(value: DTypeLike, option: str,
                allowed: tuple[torch.dtype, ...] = COMM_DTYPES) -> torch.dtype:
    """A torch dtype from a dtype or its JSON spelling ("bf16", "float32", ...), one of
    ``allowed``."""
    key = value.lower().removeprefix("torch.") if isinstance(value, str) else None
    dtype = _DTYPES.get(key) if key is not None else value
    if dtype not in allowed:
        names = [n for n, d in _DTYPES.items() if d in allowed]
        what = "is not a dtype" if key is not None and key not in _DTYPES else "is not supported"
        raise ValueError(f"{option}={value!r} {what}: use one of {names}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The short JSON spelling of a dtype ("bf16", "fp16", "fp32", "fp64"): how dtypes are
    stored in param groups, which must hold plain data (torch DCP, JSON configs)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}[dtype]
