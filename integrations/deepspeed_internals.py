"""Everything the DeepSpeed adapter reads of DeepSpeed's private structures, in one module.

DeepSpeed gives its inner optimizer flat fp32 partitions and no public map from them to the
model's parameters. The maps exist as private attributes that change between releases (the
``deepspeed`` extra pins the tested minor release); this module is the only one that reads
them, so a DeepSpeed upgrade is checked against this file alone. One function per flavour:

- ZeRO-1/2 and ``BF16_Optimizer``: `hp_mapping_partition`, from each parameter's
  ``_hp_mapping``;
- ZeRO-3: `zero3_partition`, from the stage-3 optimizer's sub-groups and ``grad_position``;
- no ZeRO (stage 0): `zero0_group`, the data-parallel group whole tensors are replicated over.

Plus the helpers the adapter needs around them (`logical_shape`, `is_partitioned`,
`flats_of_group`, `write_low_precision`) and the two places where DeepSpeed passes nothing
and the call stack is read instead (`calling_engine`, `is_state_setup_step`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from distributed_muon.integrations.zero_regions import Fragment, zero3_range


@dataclass(frozen=True, eq=False)
class Partition:
    """What one flat tensor holds on this rank.

    ``fragments[p]``: this rank holds values ``[start, start + length)`` of parameter ``p``'s
    row-major storage at ``flat[offset:]``; a parameter it holds nothing of is absent.
    ``shapes[p]``: the logical shape of every parameter the flat tensor is cut from.
    ``group``: the process group the flat tensor is split over (None for one rank).
    ``sub_group``: its index among ZeRO-3's sub-groups (None under ZeRO-1/2: the flat is its
    param group's).
    """

    fragments: dict[torch.Tensor, Fragment]
    shapes: dict[torch.Tensor, torch.Size]
    group: dist.ProcessGroup | None
    sub_group: int | None = None


def logical_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape as its layer sees it (a ZeRO-3 parameter is an empty placeholder
    that keeps its shape in ``ds_shape``)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def is_partitioned(param: torch.Tensor) -> bool:
    """True under ZeRO-1/2/3 and ``BF16_Optimizer``, which tag every parameter with its
    partition map; False without ZeRO, where a param group holds whole tensors (the
    parameters, or DeepSpeed's fp32 copies of them in order)."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")


def partition(flat: torch.Tensor, group_params: list[torch.Tensor]) -> Partition:
    """What ``flat``, a flat partition of the param group of ``group_params``, holds."""
    if getattr(group_params[0], "_z3_optimizer", None) is not None:
        return zero3_partition(flat, group_params)
    return hp_mapping_partition(flat, group_params)


def hp_mapping_partition(flat: torch.Tensor, group_params: list[torch.Tensor]) -> Partition:
    """ZeRO-1/2 and ``BF16_Optimizer``: the group's parameters, flattened in order, are cut
    into one flat range per rank of the data-parallel group (``_dp_group``, the
    expert-data-parallel one for MoE groups). Each parameter's ``_hp_mapping`` says which of
    its values (``lp_fragment_address``) sit where in its rank's flat tensor
    (``hp_fragment``, ``hp_fragment_address``)."""
    fragments: dict[torch.Tensor, Fragment] = {}
    group = None
    for p in group_params:
        group = getattr(p, "_dp_group", group)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or mapping.hp_fragment.data_ptr() != (
            flat.data_ptr() + mapping.hp_fragment_address.start * flat.element_size()
        ):
            continue  # not on this rank, or in another flat tensor
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        fragments[p] = (lp.start, lp.numel, hp.start)
    return Partition(fragments, {p: logical_shape(p) for p in group_params}, _several(group))


def zero3_partition(flat: torch.Tensor, group_params: list[torch.Tensor]) -> Partition:
    """ZeRO-3: a param group is cut into sub-groups (``fp16_groups``), each with its flat fp32
    tensor (``fp32_partitioned_groups_flat``); every parameter of a sub-group is split evenly,
    padded, over the sub-group's process group, and ``grad_position`` says where this rank's
    part of it sits in the flat tensor."""
    z3 = group_params[0]._z3_optimizer
    sub = next(i for i, t in enumerate(z3.fp32_partitioned_groups_flat) if t is flat)
    group = z3._get_sub_group_process_group(sub)
    rank = dist.get_rank(group)
    fragments: dict[torch.Tensor, Fragment] = {}
    for p in z3.fp16_groups[sub]:
        _, offset, part = z3.grad_position[z3.get_param_id(p)]
        start, stop = zero3_range(rank, part, p.ds_numel)
        if start < stop:
            fragments[p] = (start, stop - start, offset)
    shapes = {p: logical_shape(p) for p in z3.fp16_groups[sub]}
    return Partition(fragments, shapes, _several(group), sub)


def zero0_group(group: dict[str, Any]) -> dist.ProcessGroup | None:
    """No ZeRO: the process group the engine all-reduces param group ``group``'s gradients
    over: data parallel, or the group's expert-data-parallel group for MoE groups."""
    from deepspeed.utils import groups

    if group.get("moe"):
        return _several(groups._get_expert_data_parallel_group(group["name"]))
    return _several(groups._get_data_parallel_group())


def flats_of_group(group_index: int, group_params: list[torch.Tensor],
                   tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The flat tensors that hold param group ``group_index``'s values on this rank, for
    loading: at ZeRO-3 all its sub-groups' (``step()`` sees one sub-group at a time), at
    ZeRO-1/2 its current ``tensors`` (its flat partitions); none without ZeRO."""
    if not is_partitioned(group_params[0]):
        return []
    z3 = getattr(group_params[0], "_z3_optimizer", None)
    if z3 is None:
        return list(tensors)
    return [f for s, f in enumerate(z3.fp32_partitioned_groups_flat)
            if z3.sub_group_to_group_id[s] == group_index]


def write_low_precision(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set the model's own copy of ``param`` (bf16 or fp32, what forward reads) from its whole
    value ``full``; at ZeRO-3 only this rank's part of it (``ds_tensor``)."""
    full = full.reshape(-1)
    z3 = getattr(param, "_z3_optimizer", None)
    if z3 is None:
        param.data.copy_(full.view(param.shape))
        return
    part = param.ds_tensor.numel()
    rank = dist.get_rank(z3._get_param_partition_group(param))
    start, stop = zero3_range(rank, part, param.ds_numel)
    if start < stop:
        param.ds_tensor.data.narrow(0, 0, stop - start).copy_(full.narrow(0, start, stop - start))


def _several(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group`` when it has several ranks; None otherwise (nothing to exchange)."""
    return group if group is not None and dist.get_world_size(group) > 1 else None


def calling_engine() -> Any:
    """The ``DeepSpeedEngine`` building the optimizer from its config, or None.

    Stack walk, because DeepSpeed gives no other way: it builds a config-named optimizer as
    ``cls(model_parameters, **params)``, passing neither the engine, nor its module (for
    parameter names), nor its fp16 and offload settings; the engine is a caller's ``self``.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DeepSpeedEngine):
            return candidate
        frame = frame.f_back
    return None


def is_state_setup_step() -> bool:
    """True when ``step()`` is DeepSpeed's setup call: without ZeRO in bf16, its unfused
    wrapper (``FP16_UnfusedOptimizer.initialize_optimizer_states``) steps once with zero
    gradients to create state.

    Stack walk, because DeepSpeed gives no other way: the call passes no flag and looks like
    a training step from inside the optimizer.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "initialize_optimizer_states" and \
                type(frame.f_locals.get("self")).__name__ == "FP16_UnfusedOptimizer":
            return True
        frame = frame.f_back
    return False
