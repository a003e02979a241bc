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
from collections.abc import Iterable
from itertools import chain, cycle, islice, repeat

import torch

from distributed_muon.params import is_embedding_or_head_name

Coefficients = tuple[float, float, float]

# Per-step (a, b, c) of X <- a X + b (X X^T) X + c (X X^T)^2 X, as megatron-core 0.19's Muon
# uses them (emerging-optimizers 0.3), rounded as there (4 decimals).
MEGATRON_COEFFICIENTS: dict[str, tuple[Coefficients, ...]] = {
    # Keller Jordan's quintic, every step (our "jordan").
    "simple": ((3.4445, -4.7750, 2.0315),),
    # Tuned per step for 5 steps (Jordan's modded-nanogpt medium speedrun, after You Jiacheng).
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    # Polar Express (Amsel et al. 2025), the 1.01 safety factor folded in.
    "polar_express": (
        (8.2051, -22.9019, 16.4607),
        (4.0664, -2.8612, 0.5184),
        (3.9096, -2.8234, 0.5250),
        (3.2856, -2.4153, 0.4853),
        (2.2779, -1.6198, 0.3985),
        (1.8726, -1.2307, 0.3585),
        (1.8564, -1.2132, 0.3568),
        (1.8750, -1.2500, 0.3750),
    ),
    # CANS (Grishina et al. 2025).
    "cans": (
        (8.4703, -25.1081, 18.6293),
        (4.1828, -3.1087, 0.5806),
        (3.9619, -2.9541, 0.5630),
        (3.2866, -2.4647, 0.5074),
        (2.2737, -1.6447, 0.4162),
    ),
    # AOL-preconditioned Newton-Schulz (Boissin et al. 2025).
    "aol": (
        (4.0098, -7.0585, 2.4635),
        (3.4585, -5.5479, 2.5959),
        (2.7573, -3.2939, 1.4254),
        (2.7215, -3.0494, 1.3169),
    ),
    # DeepSeek-V4: Jordan's quintic for 8 steps, then (2, -1.5, 0.5) for 2.
    "deepseekv4": ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2,
}
# Types whose list is repeated from its start when steps > len; the others repeat their last.
CYCLING = frozenset({"simple", "quintic", "aol"})

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
