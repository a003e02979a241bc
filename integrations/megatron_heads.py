"""Per-head Newton-Schulz under Megatron (``--dmuon-per-head``): one logical matrix per head.

Megatron's attention weights whose rows are heads, with their widths from the layer's
``TransformerConfig``:

- the fused ``linear_qkv``: per query group its query heads, [their output-gate heads,] one key
  and one value head, every one ``kv_channels`` rows, so the blocks are ``kv_channels`` rows
  each whatever the interleaving (storage order is kept);
- multi-latent attention's query projection (``linear_q_proj``, or ``linear_q_up_proj`` with a
  query LoRA: ``qk_head_dim + qk_pos_emb_head_dim`` rows per head) and key-value up-projection
  (``linear_kv_up_proj``: ``qk_head_dim + v_head_dim``).

The blocks are of the full matrix: a TP shard (whole query groups, or a part of one when there
are fewer groups than TP ranks) and a distributed-optimizer range (which may cut a head) are
pieces of them like any other. A stage without Megatron attention (a plain torch model inside
Megatron's DDP) is split by the core's name rule (`distributed_muon.heads`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from distributed_muon.heads import attention_row_blocks, head_row_blocks

if TYPE_CHECKING:
    from distributed_muon.integrations.megatron import MegatronSharding

# A Megatron attention weight's heads: (rows per head, heads or None: as many as the rows
# hold, where they were checked already), and the config fields giving the width.
HeadGeometry = tuple[int, int | None, str]

# MLA weights whose rows are heads -> the config fields summing to one head's rows.
MLA_HEAD_FIELDS = {
    "linear_q_proj": ("qk_head_dim", "qk_pos_emb_head_dim"),
    "linear_q_up_proj": ("qk_head_dim", "qk_pos_emb_head_dim"),
    "linear_kv_up_proj": ("qk_head_dim", "v_head_dim"),
}


def head_geometry(name: str, mod: nn.Module, qkv: tuple[int, ...] | None) -> HeadGeometry | None:
    """The heads of a Megatron attention weight (`HeadGeometry`), None for any other parameter.
    ``qkv``: the rows of one query group's sections of a fused QKV (its last is a value head),
    already checked against the config."""
    if qkv is not None:
        return qkv[-1], None, "kv_channels"
    parts = name.split(".")
    fields = MLA_HEAD_FIELDS.get(parts[-2]) if len(parts) > 1 and parts[-1] == "weight" else None
    config = getattr(mod, "config", None)
    if fields is None or config is None:
        return None
    widths = [getattr(config, f, None) for f in fields]
    if not all(isinstance(w, int) for w in widths):  # not an MLA config: not MLA's weight
        return None
    return sum(widths), config.num_attention_heads, " + ".join(fields)


def geometry_row_blocks(name: str, rows: int, geometry: HeadGeometry) -> tuple[int, ...]:
    """One block per head of a weight of ``rows`` full rows; ValueError naming the config
    fields when the rows are not the config's heads."""
    width, heads, fields = geometry
    if heads is not None and rows != heads * width:
        raise ValueError(f"per-head: {name} has {rows} rows, not num_attention_heads={heads} "
                         f"heads of {fields} = {width} rows: fix the layer's config, or leave "
                         "--dmuon-per-head off")
    return head_row_blocks(rows, width, name)


def per_head_blocks(chunks: Sequence[nn.Module], sharding: MegatronSharding,
                    is_muon: Callable[[torch.Tensor], bool]) -> dict[int, tuple[int, ...]]:
    """``{id(param): row blocks}`` of per-head NS for the Muon parameters (``is_muon``) of a
    pipeline stage's model ``chunks``: Megatron's attention weights where the stage has any,
    else the core's rule on each chunk. Raises ValueError, naming the fix, when nothing
    splits or a weight's rows are not whole heads."""
    muon = [p for c in chunks for p in c.parameters() if p.requires_grad and is_muon(p)]
    out = {id(p): b for p in muon if (b := sharding.head_row_blocks(p)) is not None}
    if out:
        return out
    ids = {id(p) for p in muon}
    for chunk in chunks:
        named = {n: p for n, p in chunk.named_parameters() if id(p) in ids}
        if not named:
            continue
        for name, blocks in attention_row_blocks(chunk, names=set(named)).items():
            info = sharding.info(named[name])
            if info.dim is not None and info.tp_size > 1:
                # The core's rule reads local shapes; a TP shard's are not the matrix's.
                raise ValueError(f"per-head: {name} is tensor-parallel but not a Megatron "
                                 "attention weight (linear_qkv, MLA up-projections) whose "
                                 "heads the adapter knows: leave --dmuon-per-head off")
            out[id(named[name])] = blocks
    if not out:
        raise ValueError("per-head NS is on but this pipeline stage has no attention weight "
                         "to split (Megatron's linear_qkv, linear_q_proj, linear_q_up_proj, "
                         "linear_kv_up_proj): turn --dmuon-per-head off")
    return out
