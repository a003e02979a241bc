"""Hugging Face Trainer: ``optimizer_cls_and_kwargs=(muon_optimizer, {"lr": 3e-4, ...})``.

`muon_optimizer` builds a `DistributedMuon` whose Muon/AdamW split is
`distributed_muon.muon_param_groups` of the model (embeddings and ``lm_head`` go to AdamW), with
parameter names, so checkpoints work by name. Handing the Trainer `DistributedMuon` itself would
give it unnamed parameter groups, and the embedding and head would be orthogonalized by shape.

transformers >= 5 treats an ``optimizer_cls`` that is not an ``Optimizer`` subclass as a factory:
``optimizer_cls()(model, **kwargs)`` with the model it is about to train, not yet wrapped or
sharded: under FSDP2, Accelerate's ``prepare`` then swaps the optimizer's parameters for the
shards, which `DistributedMuon` picks up at its first step. Older releases call
``optimizer_cls(grouped_params, **kwargs)``; pass ``"model": model`` in the kwargs there.

This module imports neither transformers nor DeepSpeed: it runs inside the Trainer, which has.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distributed_muon.optimizer import DistributedMuon
from distributed_muon.params import muon_param_groups

# Options of `muon_param_groups` (the split); every other keyword goes to `DistributedMuon`.
_SELECTION = ("adamw", "row_blocks", "per_head")


def muon_optimizer(
    model_or_params: nn.Module | Iterable[Any] | None = None,
    /,
    *,
    model: nn.Module | None = None,
    adamw: Iterable[str] = (),
    row_blocks: Mapping[str, Sequence[int]] | None = None,
    per_head: bool | Sequence[str] = False,
    **options: Any,
) -> DistributedMuon | Callable[..., DistributedMuon]:
    """A `DistributedMuon` over ``model``'s trainable parameters, split by `muon_param_groups`.

    - ``muon_optimizer()`` (no arguments, as the Trainer calls a factory first) returns
      ``muon_optimizer`` itself.
    - ``muon_optimizer(model, **options)``: Muon for the model's matrices; AdamW for
      embeddings, output heads, names matching an ``adamw`` glob, and vectors. As the
      Trainer's default AdamW does, parameters of fewer than 2 dimensions (biases, norms)
      get no weight decay; embeddings and heads get ``adamw_weight_decay`` (default
      ``weight_decay``).
    - ``muon_optimizer(param_groups, model=model, **options)`` (older Trainers): the groups the
      Trainer built (its decay / no-decay split is kept), each split into Muon and AdamW by the
      same rule and named from ``model``.

    ``options`` are `DistributedMuon`'s (``lr``, ``weight_decay``, ``adamw_betas``,
    ``ns_dtype``, ``comm_dtype``, ...); ``row_blocks`` splits fused weights and ``per_head``
    attention projections per head, as in `muon_param_groups`. The Trainer does not pass
    ``TrainingArguments.learning_rate`` to an ``optimizer_cls_and_kwargs`` optimizer: give
    ``lr`` here.
    """
    if model_or_params is None and model is None:
        if options or adamw or row_blocks is not None or per_head:
            raise ValueError("muon_optimizer needs the model: muon_optimizer(model, lr=...)")
        return muon_optimizer  # the Trainer's factory protocol: factory() then factory(model)
    selection = {"adamw": tuple(adamw), "row_blocks": row_blocks, "per_head": per_head}
    if model_or_params is None or isinstance(model_or_params, nn.Module):
        if model is not None and model_or_params is not None and model is not model_or_params:
            raise ValueError(
                "muon_optimizer got two different models (positional and model=): the Trainer "
                "passes the model it trains; drop \"model\" from optimizer_cls_and_kwargs")
        model = model if model_or_params is None else model_or_params
        _refuse_unsupported(model)
        groups = _model_groups(model, selection)
    else:
        if model is None:
            raise ValueError(
                "muon_optimizer got parameters without the model, so embeddings and output "
                "heads cannot be told from matrices: add \"model\": model to the kwargs of "
                "optimizer_cls_and_kwargs")
        _refuse_unsupported(model)
        groups = _split_given_groups(model_or_params, model, selection)
    return DistributedMuon(groups, **options)


def _refuse_unsupported(model: nn.Module) -> None:
    """Setups where a `DistributedMuon` from here would train wrongly, refused in one line."""
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None and hf_deepspeed.deepspeed_config() is not None:
        # DeepSpeed would hand this optimizer flat partitions instead of matrices.
        raise ValueError(
            "muon_optimizer does not build the optimizer under DeepSpeed: put \"optimizer\": "
            "{\"type\": \"DistributedMuon\", \"params\": {\"lr\": \"auto\"}} in the DeepSpeed "
            "config, add `import distributed_muon.integrations.deepspeed` to the script, and "
            "drop optimizer_cls_and_kwargs (docs/trainers.md)")
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp1 is not None and any(isinstance(m, fsdp1.FullyShardedDataParallel)
                                 for m in model.modules()):
        # FSDP1 flattens parameters into 1-D FlatParameters: no matrix left to orthogonalize.
        raise ValueError(
            "muon_optimizer does not support FSDP1 (flattened parameters): use FSDP2, e.g. "
            "TrainingArguments(fsdp=..., fsdp_config={\"fsdp_version\": 2})")


def _model_groups(model: nn.Module, selection: dict[str, Any]) -> list[dict[str, Any]]:
    """`muon_param_groups`, with the AdamW group cut into matrices and vectors (no decay)."""
    groups = []
    for group in muon_param_groups(model, **selection):
        if group["use_muon"]:
            groups.append(group)
            continue
        matrices = [(n, p) for n, p in group["params"] if p.ndim >= 2]
        vectors = [(n, p) for n, p in group["params"] if p.ndim < 2]
        if matrices:
            groups.append({**group, "params": matrices})
        if vectors:
            groups.append({**group, "params": vectors, "weight_decay": 0.0,
                           "adamw_weight_decay": 0.0})
    return groups


def _split_given_groups(params: Iterable[Any], model: nn.Module,
                        selection: dict[str, Any]) -> list[dict[str, Any]]:
    """Each given group split into its Muon and AdamW parameters as `muon_param_groups` splits
    ``model``'s, keeping the group's own options (the Trainer's per-group weight decay)."""
    given = list(params)
    if given and not isinstance(given[0], dict):
        given = [{"params": given}]
    # id(parameter) -> (name, options of its `muon_param_groups` group).
    rule: dict[int, tuple[str, dict[str, Any]]] = {}
    for group in muon_param_groups(model, **selection):
        options = {k: v for k, v in group.items() if k != "params"}
        for name, p in group["params"]:
            rule[id(p)] = (name, options)
    out = []
    for gi, group in enumerate(given):
        extra = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if extra.get("weight_decay") == 0.0:
            extra["adamw_weight_decay"] = 0.0  # the Trainer's no-decay group stays undecayed
        plist = group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        parts: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(plist):
            if isinstance(p, tuple):
                p = p[1]
            if id(p) not in rule:
                raise ValueError(
                    f"muon_optimizer: parameter {i} of group {gi} (shape {tuple(p.shape)}) is "
                    "not a trainable parameter of the model passed as model=")
            name, options = rule[id(p)]
            key = id(options)
            parts.setdefault(key, {**extra, **options, "params": []})["params"].append((name, p))
        out += sorted(parts.values(), key=lambda g: not g["use_muon"])
    return out
