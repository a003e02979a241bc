"""Per-head Newton-Schulz: which attention matrices split into one row block per head.

With per-head NS, a query, key or value projection ``[heads * head_dim, n]`` is
``heads`` matrices ``head_dim x n``, each orthogonalized (and shape-scaled) on its own; a
fused QKV weight is ``q heads + k heads + v heads`` such blocks. The split is expressed as
``row_blocks``, so the layout, the plan and every sharding (FSDP2 row and column shards, ZeRO
flat ranges that cut heads, tensor parallelism) treat each head as a logical matrix.

Which matrices split (the rule DeepSpeed's ``per_head_muon`` and torchtitan's Kimi recipes
follow): the projections whose *rows* are heads, i.e. Q, K, V (separate or fused) and the
multi-head latent attention up-projections (``q_b_proj``/``wq_b``: ``nope + rope`` rows per
head, ``kv_b_proj``/``wkv_b``: ``nope + v`` rows per head). The output projection stays
whole (its heads are columns, and both references keep it whole), as do the latent
down-projections and everything that is not attention. A matrix is recognized by the name of
the module that holds it (`LEAF_KINDS`); head counts come from the attention module's
attributes, then from the model's config (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ...), or from an explicit `AttentionHeads`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

QUERY, KEY, VALUE, QKV, LATENT_KV = "query", "key", "value", "qkv", "latent_kv"

# Module name (the last part before ".weight") -> what its rows are. Exact names, so that
# `o_proj`, `dense` or `c_proj` never match by a shared prefix.
LEAF_KINDS: dict[str, str] = {
    **dict.fromkeys(("q_proj", "query", "wq", "q", "to_q", "linear_q", "q_b_proj", "wq_b",
                     "linear_q_up_proj"), QUERY),
    **dict.fromkeys(("k_proj", "key", "wk", "k", "to_k", "linear_k"), KEY),
    **dict.fromkeys(("v_proj", "value", "wv", "v", "to_v", "linear_v"), VALUE),
    **dict.fromkeys(("qkv_proj", "qkv", "wqkv", "query_key_value", "linear_qkv", "in_proj"),
                    QKV),
    **dict.fromkeys(("kv_b_proj", "wkv_b", "linear_kv_up_proj"), LATENT_KV),
}
# nn.MultiheadAttention holds its projections as parameters of its own.
_MHA_PARAMS = {"in_proj_weight": QKV, "q_proj_weight": QUERY, "k_proj_weight": KEY,
               "v_proj_weight": VALUE}

# Attribute names, on the attention module or a config, in the order they are tried.
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads",
             "num_query_groups")
_HEAD_DIM = ("head_dim", "head_size", "d_head", "dim_head", "attention_head_size", "kv_channels")
_MLA = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class AttentionHeads:
    """Head geometry of attention layers. ``kv_heads``: key/value heads (GQA/MQA; None: as many
    as ``heads``); ``head_dim``: rows per head of Q, K and V (None: rows / heads); the
    ``qk_nope``/``qk_rope``/``v`` widths of multi-head latent attention when it is one."""

    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    source: str = "given"

    def __post_init__(self) -> None:
        for key in ("heads", "kv_heads", "head_dim", *_MLA):
            value = getattr(self, key)
            if value is not None and (not _is_count(value)):
                raise ValueError(f"AttentionHeads: {key}={value!r} must be a positive integer")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"AttentionHeads: heads={self.heads} is not a multiple of "
                             f"kv_heads={self.kv_heads}")

    @property
    def latent(self) -> bool:
        return self.qk_nope_head_dim is not None


def head_row_blocks(rows: int, head_dim: int, name: str = "parameter") -> tuple[int, ...]:
    """``rows`` cut into blocks of ``head_dim`` rows: the row blocks of per-head NS for any
    projection whose rows are whole heads of one width, in any order (separate Q, K or V;
    fused ``[q | k | v]``; Megatron's ``linear_qkv`` interleaved per query group)."""
    if not _is_count(head_dim) or rows % head_dim:
        raise ValueError(f"per-head: {name} has {rows} rows, not a whole number of heads of "
                         f"{head_dim} rows")
    return (head_dim,) * (rows // head_dim)


def fused_qkv_row_blocks(heads: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Row blocks of a fused QKV weight of ``heads`` query and ``kv_heads`` key/value heads."""
    return (head_dim,) * (heads + 2 * kv_heads)


def refine(blocks: Sequence[int] | None, heads: Sequence[int], name: str) -> tuple[int, ...]:
    """The per-head ``heads`` blocks of a parameter that also has explicit ``blocks`` (a fused
    weight's Q, K, V): every explicit boundary must be a head boundary."""
    heads = tuple(heads)
    if not blocks:
        return heads
    if set(_cuts(blocks)) - set(_cuts(heads)) or sum(blocks) != sum(heads):
        raise ValueError(f"per-head: row_blocks={tuple(blocks)} of {name} cut through a head "
                         f"(heads of {heads[0]} rows): drop its row_blocks or fix them")
    return heads


def attention_row_blocks(
    model: nn.Module,
    select: bool | Sequence[str] = True,
    heads: AttentionHeads | None = None,
    names: Collection[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """``{parameter name: row blocks}`` of per-head NS for ``model``.

    ``select``: True for every attention projection, or globs (``fnmatch``) of the parameter
    names to split (each must name one). ``heads`` overrides the geometry read from the model.
    ``names``: only these parameters are considered (the Muon ones). Raises ValueError, one
    line naming the parameter, where a projection's rows do not split into its heads, where
    no head count is found, or where nothing splits at all.
    """
    patterns = None if select is True else tuple(select)
    modules = dict(model.named_modules())
    out: dict[str, tuple[int, ...]] = {}
    matched: set[str] = set()
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        if patterns is not None:
            pat = next((pt for pt in patterns if fnmatch.fnmatchcase(name, pt)), None)
            if pat is None:
                continue
            matched.add(pat)
        kind, attention = _kind(name, modules)
        if kind is None:
            if patterns is not None:
                raise ValueError(f"per-head: {name} is not a Q, K, V, fused QKV or latent "
                                 f"up-projection weight (known module names: "
                                 f"{', '.join(sorted(LEAF_KINDS))})")
            continue
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3: the layer's shape
        if len(shape) != 2:
            raise ValueError(f"per-head: {name} of shape {shape} is not a 2-D projection")
        geometry = heads or _geometry(attention, model, name)
        out[name] = head_row_blocks(shape[0], _width(kind, shape[0], geometry, name,
                                                     _sibling_q_rows(attention)), name)
    unused = [pt for pt in patterns or () if pt not in matched]
    if unused:
        raise ValueError(f"per-head: patterns {unused} match no Muon parameter of the model")
    if not out:
        raise ValueError(
            "per-head NS is on but the model has no attention projection to split (looked for "
            "weights of modules named q_proj/k_proj/v_proj, qkv, query_key_value, wq/wk/wv, "
            "nn.MultiheadAttention, ...; a transposed fused weight such as GPT-2's Conv1D "
            "c_attn is not split): turn per-head off for this model")
    return out


def _kind(name: str, modules: dict[str, nn.Module]) -> tuple[str | None, nn.Module | None]:
    """What a parameter's rows are and the attention module it belongs to."""
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if isinstance(module, nn.MultiheadAttention) and leaf in _MHA_PARAMS:
        return _MHA_PARAMS[leaf], module
    if leaf != "weight":
        return None, None
    parent, _, last = owner.rpartition(".")
    kind = LEAF_KINDS.get(last.lower())
    return (kind, modules.get(parent)) if kind else (None, None)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _first(obj: object, keys: Iterable[str]) -> int | None:
    for key in keys:
        value = getattr(obj, key, None)
        if _is_count(value):
            return value
    return None


def _configs(attention: nn.Module | None, model: nn.Module) -> list[tuple[object, str]]:
    """Configs to read, nearest first: the attention module's own (Hugging Face attention
    modules carry one), then the model's and its ``text_config`` (multimodal wrappers)."""
    out = []
    for label, cfg in (("attention config", getattr(attention, "config", None)),
                       ("model.config", getattr(model, "config", None))):
        if cfg is not None:
            out.append((getattr(cfg, "text_config", None) or cfg, label))
    return out


def _geometry(attention: nn.Module | None, model: nn.Module, name: str) -> AttentionHeads:
    """Head geometry of the attention module holding ``name``: its attributes first (what the
    module was built with), then configs."""
    sources: list[tuple[object, str]] = []
    if attention is not None:
        sources.append((attention, f"{type(attention).__name__} attributes"))
    sources += _configs(attention, model)
    for obj, label in sources:
        heads = _first(obj, _HEADS)
        if heads is None:
            continue
        kv = _first(obj, _KV_HEADS)
        groups = getattr(obj, "num_key_value_groups", None)  # Hugging Face: heads / kv heads
        if kv is None and _is_count(groups) and heads % groups == 0:
            kv = heads // groups
        # A config's kv_channels or head_dim is the model's; read the rest from the same
        # place as the head count, so one source gives one consistent geometry.
        mla = {k: _first(obj, (k,)) for k in _MLA}
        return AttentionHeads(heads, kv, _first(obj, _HEAD_DIM),
                              mla["qk_nope_head_dim"], mla["qk_rope_head_dim"],
                              mla["v_head_dim"], source=label)
    raise ValueError(
        f"per-head: no head count found for {name} (looked for {'/'.join(_HEADS)} on its "
        "attention module and in model.config): set one there, or pass "
        "heads=AttentionHeads(heads=..., kv_heads=...)")


def _sibling_q_rows(attention: nn.Module | None) -> int | None:
    """Rows of the query projection next to a K or V projection (its head width)."""
    if attention is None:
        return None
    for child_name, child in attention.named_children():
        weight = getattr(child, "weight", None)
        if LEAF_KINDS.get(child_name.lower()) == QUERY and weight is not None:
            return int((getattr(weight, "ds_shape", None) or weight.shape)[0])
    weight = getattr(attention, "q_proj_weight", None)  # nn.MultiheadAttention, kdim != E
    return int(weight.shape[0]) if weight is not None else None


def _width(kind: str, rows: int, g: AttentionHeads, name: str, q_rows: int | None) -> int:
    """Rows per head of a ``kind`` projection with ``rows`` rows under geometry ``g``."""
    where = f"{name} ({rows} rows; {g.source}: heads={g.heads}, kv_heads={g.kv_heads}, " \
            f"head_dim={g.head_dim})"
    if g.latent and kind in (QUERY, LATENT_KV):
        other = g.qk_rope_head_dim if kind == QUERY else g.v_head_dim
        if other is None:
            raise ValueError(f"per-head: {where} is latent attention without "
                             f"{'qk_rope_head_dim' if kind == QUERY else 'v_head_dim'}")
        width, count = g.qk_nope_head_dim + other, g.heads
    elif kind in (QUERY, LATENT_KV):
        width, count = g.head_dim or rows // g.heads, g.heads
    elif kind in (KEY, VALUE):
        # Rows are kv heads; their width is head_dim, else the query's, else (MHA) rows/heads.
        width = g.head_dim or (q_rows // g.heads if q_rows else rows // (g.kv_heads or g.heads))
        count = g.kv_heads or rows // max(width, 1)
    else:  # fused QKV: q heads + k heads + v heads, one width; kv heads = heads if not given
        count = g.heads + 2 * (g.kv_heads or g.heads)
        width = g.head_dim or rows // count
    if width < 1 or count * width != rows:
        raise ValueError(f"per-head: {where} does not split into {count} heads of {width} rows;"
                         " pass heads=AttentionHeads(...) with the right geometry, or leave "
                         "this weight whole by listing the others in per_head=[globs]")
    return width


def _cuts(blocks: Sequence[int]) -> list[int]:
    out, at = [], 0
    for b in blocks:
        at += b
        out.append(at)
    return out
