"""Which parameters are Muon matrices, and how each splits into logical matrices.

A Muon parameter is seen as a 2-D view ``[E * m, n]``: ``E`` expert matrices of ``m x n``
stacked along rows (``E = 1`` for a plain weight). A fused weight may declare row blocks
(``row_blocks=(q, k, v)``), each orthogonalized on its own; per-head NS is row blocks of one
head each (`distributed_muon.heads`). Everything else goes to AdamW.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from distributed_muon.heads import AttentionHeads, attention_row_blocks, refine

MATRIX_VIEWS = ("experts", "flatten")


@dataclass(frozen=True)
class MatrixSpec:
    """Logical matrices of one parameter of global shape ``shape``.

    ``view="experts"``: 2-D ``[m, n]`` is one matrix, 3-D ``[E, m, n]`` is E matrices, 4-D+
    (conv) is ``(out, -1)``. ``view="flatten"``: any ndim >= 2 is ``(shape[0], -1)`` (Conv1d).
    """

    shape: tuple[int, ...]
    experts: int
    rows: int
    cols: int
    row_blocks: tuple[int, ...]

    @classmethod
    def of(
        cls,
        shape: Sequence[int],
        row_blocks: Sequence[int] | None = None,
        view: str = "experts",
        name: str = "parameter",
    ) -> MatrixSpec:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(
                f"{name} of shape {shape} cannot be a Muon matrix (ndim < 2): put it in a param "
                "group with use_muon=False"
            )
        if view not in MATRIX_VIEWS:
            raise ValueError(f"matrix_view={view!r} is not valid: use one of {list(MATRIX_VIEWS)}")
        if len(shape) == 3 and view == "experts":
            experts, rows, cols = shape
        else:
            experts, rows, cols = 1, shape[0], math.prod(shape[1:])
        blocks = tuple(int(b) for b in row_blocks) if row_blocks else (rows,)
        if sum(blocks) != rows or any(b <= 0 for b in blocks):
            raise ValueError(
                f"row_blocks={tuple(blocks)} of {name} must be positive and sum to its "
                f"{rows} rows (shape {shape})"
            )
        return cls(shape, experts, rows, cols, blocks)

    @classmethod
    def storage(cls, shape: Sequence[int]) -> MatrixSpec:
        """Any parameter as ``(shape[0], -1)`` (1 x 1 for a scalar): how a non-Muon parameter's
        regions are described, for checkpoints."""
        shape = tuple(int(s) for s in shape)
        rows = shape[0] if shape else 1
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        return cls(shape, 1, rows, cols, (rows,))

    def matrices(self) -> list[tuple[int, int, int]]:
        """``(first row in the [E*m, n] view, m, n)`` of every logical matrix, in order."""
        out = []
        for e in range(self.experts):
            start = e * self.rows
            for b in self.row_blocks:
                out.append((start, b, self.cols))
                start += b
        return out


# Wrapper prefixes that frameworks insert into parameter names.
_WRAPPERS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_HEAD_PARTS = {"lm_head", "wte", "wpe", "output_layer", "embed_out"}


def is_embedding_or_head_name(name: str) -> bool:
    """True for names of embeddings and output heads, which Muon should not orthogonalize.

    Matches a name part containing ``embed``, a part equal to ``lm_head``/``wte``/``wpe``/
    ``output_layer``, or a top-level module called ``output`` (torchtitan's head). An inner
    ``attention.output.dense`` is not a head.
    """
    parts = [p for p in name.split(".") if p not in _WRAPPERS]
    if any("embed" in p for p in parts) or any(p in _HEAD_PARTS for p in parts):
        return True
    return bool(parts) and parts[0] == "output"


def default_use_muon(shape: Sequence[int], name: str | None) -> bool:
    """The rule for a parameter of (global) ``shape`` whose group does not set ``use_muon``."""
    if len(shape) < 2:
        return False
    return name is None or not is_embedding_or_head_name(name)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def muon_param_groups(
    model: nn.Module,
    *,
    adamw: Iterable[str] = (),
    row_blocks: Mapping[str, Sequence[int]] | None = None,
    per_head: bool | Sequence[str] = False,
    heads: AttentionHeads | None = None,
    adamw_options: Mapping[str, Any] | None = None,
    **muon_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for `DistributedMuon` from a model, named so checkpoints can use names.

    - Muon: every parameter with ndim >= 2 except embeddings (``nn.Embedding`` weights and any
      weight tied to one), output heads (see `is_embedding_or_head_name`) and names matching
      an ``adamw`` glob (``fnmatch``, e.g. ``"*.router.weight"``).
    - ``row_blocks={"*.qkv.weight": (q, k, v)}`` splits fused weights into blocks of rows.
    - ``per_head=True`` orthogonalizes every attention Q, K, V (separate or fused) and latent
      up-projection per head: one row block per head, head counts read from the model (see
      `distributed_muon.heads`; ``heads=AttentionHeads(...)`` overrides them). A list of
      globs splits only those weights. Explicit ``row_blocks`` of the same weight must fall
      on head boundaries (a fused QKV's ``(q, k, v)``) and are refined into heads.
    - ``nn.Conv1d`` weights are flattened to ``(out, in * k)`` rather than read as experts.
    - ``muon_options`` / ``adamw_options`` are extra group options (e.g. ``lr``).
    """
    row_blocks = dict(row_blocks or {})
    adamw = tuple(adamw)
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }
    conv1d_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv1d)}
    # Tied weights appear under several names; a weight tied to an embedding is an embedding.
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params[id(p)] = p

    groups: dict[tuple, dict[str, Any]] = {}

    def add(key: tuple, options: dict[str, Any], name: str, p: nn.Parameter) -> None:
        group = groups.setdefault(key, {"params": [], **options})
        group["params"].append((name, p))

    used_patterns: set[str] = set()
    muon: list[tuple[str, nn.Parameter, tuple[int, ...] | None, str]] = []
    for pid, p in params.items():
        if not p.requires_grad:
            continue
        names = names_of[pid]
        name = names[0]
        forced_adamw = _matches(name, adamw)
        if forced_adamw:
            used_patterns.add(forced_adamw)
        if (
            forced_adamw
            or p.ndim < 2
            or pid in embedding_params
            or any(is_embedding_or_head_name(n) for n in names)
        ):
            add(("adamw",), {"use_muon": False, **(adamw_options or {})}, name, p)
            continue
        blocks_pat = _matches(name, row_blocks)
        blocks = tuple(row_blocks[blocks_pat]) if blocks_pat else None
        if blocks_pat:
            used_patterns.add(blocks_pat)
        muon.append((name, p, blocks, "flatten" if pid in conv1d_params else "experts"))

    unused = [pat for pat in (*adamw, *row_blocks) if pat not in used_patterns]
    if unused:
        raise ValueError(f"patterns {unused} match no trainable parameter of the model")
    per_head_blocks = (attention_row_blocks(model, per_head, heads, {n for n, *_ in muon})
                       if per_head else {})
    for name, p, blocks, view in muon:
        if name in per_head_blocks:
            blocks = refine(blocks, per_head_blocks[name], name)
        options = {"use_muon": True, "row_blocks": blocks, "matrix_view": view, **muon_options}
        add(("muon", blocks, view), options, name, p)
    # Muon groups first, AdamW last: a stable order for checkpoints.
    return sorted(groups.values(), key=lambda g: not g["use_muon"])
