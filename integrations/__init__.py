"""Framework adapters: each turns one framework's sharding into a `Sharding` for the core."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from distributed_muon.integrations.replicated import ReplicatedSharding

from distributed_muon.layout import Sharding


def infer_sharding(
    params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None = None
) -> Sharding:
    """The adapter for these parameters.

    DTensor parameters (FSDP2, HSDP) get `DTensorSharding`; plain tensors are replicated over
    ``process_group`` (default: the world when torch.distributed is initialized), as under DDP.
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        from distributed_muon.integrations.fsdp2 import DTensorSharding

        return DTensorSharding(params, process_group)
    if process_group is None and dist.is_available() and dist.is_initialized():
        process_group = dist.group.WORLD
    if process_group is not None and dist.get_world_size(process_group) == 1:
        process_group = None
    return ReplicatedSharding(process_group)
