"""Megatron's local GPT layer spec (no Transformer Engine, no apex) with sequence parallelism.

Megatron requires sequence parallelism for MoE layers under tensor parallelism, but the local
spec's norm (`WrappedTorchNorm`) refuses ``sequence_parallel``, and its alternatives are
Transformer Engine's and apex's fused norms. `SequenceParallelNorm` is the plain torch norm with
its parameters marked ``sequence_parallel``, as those fused norms mark theirs: each TP rank
normalizes its own slice of the sequence, and Megatron's ``finalize_model_grads`` sums the
parameters' gradients over the TP group. Used by the multi-GPU Megatron test and benchmark
(GPU machines without Transformer Engine).
"""

from __future__ import annotations

from typing import Any

import torch


class SequenceParallelNorm:
    """``torch.nn.LayerNorm`` or ``RMSNorm`` (by ``config.normalization``) whose weight and
    bias carry ``sequence_parallel = config.sequence_parallel``. Built by Megatron as a norm
    module class: ``SequenceParallelNorm(config=..., hidden_size=..., eps=...)``."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        kind = kinds.get(config.normalization)
        if kind is None:
            raise ValueError(f"normalization {config.normalization!r} is not supported by "
                             f"SequenceParallelNorm: use one of {sorted(kinds)}")
        norm = kind(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def local_gpt_block_spec(num_layers: int, num_experts: int | None = None, **kwargs: Any) -> Any:
    """Megatron's ``get_gpt_layer_local_spec(num_experts, **kwargs)`` for every one of
    ``num_layers`` layers (one pipeline stage), its input, pre-MLP and final norms
    `SequenceParallelNorm`: pass it to ``GPTModel(transformer_layer_spec=...)``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = get_gpt_layer_local_spec(num_experts=num_experts, **kwargs)
    layer.submodules.input_layernorm = SequenceParallelNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=SequenceParallelNorm)


__all__ = ["SequenceParallelNorm", "local_gpt_block_spec"]
