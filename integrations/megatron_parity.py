"""Megatron's ``--muon-*`` settings in DistributedMuon's terms, so ``--optimizer dmuon`` steps
as ``--optimizer muon`` does (megatron-core 0.19 with emerging-optimizers 0.3).

Three things here decide the update and are easy to get wrong:

- the Newton-Schulz coefficients of each ``--muon-coefficient-type``. Megatron's default
  ``quintic`` is *not* Keller Jordan's fixed polynomial (that one is ``simple``): it is five
  different polynomials, one per step (`MEGATRON_COEFFICIENTS`), and some types cycle through
  their list when there are more steps than polynomials while others repeat the last one;
- the precision, ``--muon-fp32-matmul-prec``: ``medium`` (default) runs the iteration in bf16
  after an fp32 normalization, ``high`` and ``highest`` in fp32;
- which parameters get Muon: exactly the 2-D local tensors that Megatron has not marked as
  embedding or output layer, so a learned position embedding and the MoE router get Muon.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from importlib import resources
from itertools import chain, cycle, islice, repeat

import torch

from distributed_muon.params import is_embedding_or_head_name

Coefficients = tuple[float, float, float]

# Per-step (a, b, c) of each --muon-coefficient-type, as megatron-core 0.19's Muon uses them
# (emerging-optimizers 0.3), rounded as there: data, kept verbatim in megatron_coefficients.json.
_TABLE = json.loads(resources.files(__package__).joinpath("megatron_coefficients.json")
                    .read_text())["types"]
MEGATRON_COEFFICIENTS: dict[str, tuple[Coefficients, ...]] = {
    name: tuple(tuple(step) for step in entry["steps"]) for name, entry in _TABLE.items()}
# Types whose list is repeated from its start when steps > len; the others repeat their last.
CYCLING = frozenset(name for name, entry in _TABLE.items() if entry["cycles"])

# --muon-fp32-matmul-prec -> ns_dtype. "medium" is Megatron's bf16 iteration (the momentum is
# normalized in fp32, then cast); "high" (TF32) and "highest" compute in fp32.
FP32_MATMUL_PREC = {"medium": "bf16", "high": "fp32", "highest": "fp32"}


def ns_schedule(coefficient_type: str, steps: int) -> str | tuple[Coefficients, ...]:
    """Our ``ns_schedule`` for Megatron's ``--muon-coefficient-type`` at ``steps`` steps: the
    name ``"jordan"`` for ``simple`` (same numbers), else one triple per step."""
    table = MEGATRON_COEFFICIENTS.get(coefficient_type)
    if table is None:
        raise ValueError(f"--muon-coefficient-type {coefficient_type} is not supported by "
                         f"--optimizer dmuon: use one of {sorted(MEGATRON_COEFFICIENTS)}")
    if coefficient_type == "simple":
        return "jordan"
    source = cycle(table) if coefficient_type in CYCLING else chain(table, repeat(table[-1]))
    return tuple(islice(source, steps))


def ns_dtype(fp32_matmul_prec: str) -> str:
    """Our ``ns_dtype`` for Megatron's ``--muon-fp32-matmul-prec``."""
    if fp32_matmul_prec not in FP32_MATMUL_PREC:
        raise ValueError(f"--muon-fp32-matmul-prec {fp32_matmul_prec}: use one of "
                         f"{sorted(FP32_MATMUL_PREC)}")
    return FP32_MATMUL_PREC[fp32_matmul_prec]


def marks_embeddings(params: Iterable[torch.Tensor]) -> bool:
    """Whether Megatron marked any parameter as embedding or output layer (a Megatron language
    model does; a plain torch model inside Megatron's DDP does not)."""
    return any(getattr(p, "is_embedding_or_output_parameter", False) for p in params)


def uses_muon(param: torch.Tensor, name: str, shape: tuple[int, ...], *, marked: bool,
              adamw: Iterable[str] = ()) -> bool:
    """Whether ``--optimizer dmuon`` gives ``param`` Muon (else AdamW).

    ``marked`` (the model marks its embeddings): Megatron's own rule, a 2-D local tensor without
    the mark, so a learned position embedding and the MoE router get Muon. Unmarked models
    (a plain torch MoE in Megatron's DDP) go by the adapter's global ``shape`` (>= 2-D: 3-D
    expert tensors too) and by name (embeddings and heads to AdamW). ``adamw``: name globs
    forced to AdamW (``--dmuon-adamw``).
    """
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in adamw):
        return False
    if getattr(param, "is_embedding_or_output_parameter", False):
        return False
    if marked:
        return param.ndim == 2
    return len(shape) >= 2 and not is_embedding_or_head_name(name)
