"""Replicated parameters (DDP, or plain tensors identical on every rank of a group).

Each rank holds every parameter whole: one region per rank covering it, as its own replica.
The owner of a matrix computes from its own copy (no inbound traffic) and sends the update to
every other rank (like an all-gather of updates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from distributed_muon.cluster import Rect, flat_rect, region
from distributed_muon.layout import Region
from distributed_muon.params import MatrixSpec
from distributed_muon.sharding import PRIORITY_FALLBACK


def whole_rect(spec: MatrixSpec) -> Rect:
    """The region of a rank holding the whole parameter of ``spec`` (its own replica), as
    `ReplicatedSharding` reports it and `dmuon plan` predicts it."""
    return flat_rect(spec, 0, spec.experts * spec.rows * spec.cols)


class ReplicatedSharding:
    """Every rank of ``group`` holds a full copy of each parameter (``group=None``: one rank).

    The gradients must already be averaged over the group, as DDP does.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0

    def shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape

    def local(self, param: torch.Tensor) -> torch.Tensor:
        return param

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        return param.grad

    def regions(self, param: torch.Tensor, spec: MatrixSpec) -> list[Region]:
        return [region(self.rank, self.rank, whole_rect(spec))]


def recognize(
    params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None
) -> ReplicatedSharding:
    """The fallback recognizer: any parameters, replicated over ``process_group`` (default:
    the world when torch.distributed is initialized), as under DDP."""
    if process_group is None and dist.is_available() and dist.is_initialized():
        process_group = dist.group.WORLD
    if process_group is not None and dist.get_world_size(process_group) == 1:
        process_group = None
    return ReplicatedSharding(process_group)


recognize.priority = PRIORITY_FALLBACK  # claims everything: asked after every other adapter
