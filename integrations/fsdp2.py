"""FSDP2 (``fully_shard``) and other DTensor parameters.

Placements per mesh dimension: ``Shard(0)`` (FSDP2's default), ``Shard(1)`` (a column block of
a 2-D weight, or a row block inside every expert of a 3-D expert tensor) and ``Replicate()``
(HSDP's outer dimension). Shards follow ``torch.chunk``: ``ceil(size / k)`` per rank, so the
last ranks may hold fewer rows or none. Replicate coordinates become replica ids, so an HSDP
mesh ``(Replicate, Shard(0))`` still orthogonalizes each matrix once in the whole job, and
plain (non-DTensor) parameters among them are replicated over the same group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from distributed_muon.integrations.fsdp2_regions import chunk_range, shard_rects
from distributed_muon.integrations.replicated import whole_rect
from torch.distributed.tensor import DTensor, Replicate, Shard

from distributed_muon.cluster import region
from distributed_muon.layout import Region
from distributed_muon.params import MatrixSpec


class DTensorSharding:
    """Adapter for DTensor parameters on one device mesh (FSDP2, HSDP).

    The exchange runs over all ranks of the mesh: ``process_group`` if given, else the world
    when the mesh spans it, else the mesh's own group (1-D meshes).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None = None
    ) -> None:
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        if len(meshes) != 1:
            raise ValueError(
                f"DistributedMuon found DTensor parameters on {len(meshes)} device meshes: "
                "shard all parameters given to one optimizer on the same mesh (or build one "
                "optimizer per mesh)"
            )
        self.mesh = meshes.pop()
        if process_group is None:
            if self.mesh.size() == dist.get_world_size():
                process_group = dist.group.WORLD
            elif self.mesh.ndim == 1:
                process_group = self.mesh.get_group()
            else:
                raise ValueError(
                    f"the {self.mesh.ndim}-D device mesh {self.mesh.mesh_dim_names} covers "
                    f"{self.mesh.size()} of {dist.get_world_size()} ranks: pass "
                    "process_group= a group holding exactly the mesh's ranks"
                )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        if dist.get_world_size(process_group) != self.mesh.size():
            raise ValueError(
                f"process_group has {dist.get_world_size(process_group)} ranks but the device "
                f"mesh has {self.mesh.size()}: they must be the same ranks"
            )
        self.coords = self.mesh.get_coordinate()
        for p in params:
            if isinstance(p, DTensor):
                self._check(p)

    def _check(self, p: DTensor) -> None:
        for placement in p.placements:
            if not isinstance(placement, (Shard, Replicate)) or (
                isinstance(placement, Shard) and placement.dim not in (0, 1)
            ):
                raise ValueError(
                    f"DTensor placement {placement} of a parameter of shape {tuple(p.shape)} is "
                    "not supported: use Shard(0), Shard(1) or Replicate()"
                )
        sharded = [pl for pl in p.placements if isinstance(pl, Shard)]
        if len(sharded) > 1:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is sharded on {len(sharded)} mesh "
                "dimensions; DistributedMuon supports one sharded dimension (FSDP or HSDP)"
            )
        if sharded and sharded[0].dim == 1 and p.ndim not in (2, 3):
            raise ValueError(
                f"Shard(1) is supported for 2-D weights and 3-D expert tensors, not shape "
                f"{tuple(p.shape)}"
            )

    def shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape

    def local(self, param: torch.Tensor) -> torch.Tensor:
        return param.to_local() if isinstance(param, DTensor) else param

    def local_grad(self, param: torch.Tensor) -> torch.Tensor | None:
        g = param.grad
        return g.to_local() if isinstance(g, DTensor) else g

    def regions(self, param: torch.Tensor, spec: MatrixSpec) -> list[Region]:
        """The rules of `fsdp2_regions` (what `dmuon plan` predicts), at this rank's mesh
        coordinates; the local shard's shape is checked against them."""
        if not isinstance(param, DTensor):  # replicated over the whole group
            return [region(self.rank, self.rank, whole_rect(spec))]
        replica, shard = 0, None
        for dim, placement in enumerate(param.placements):
            size, coord = self.mesh.size(dim), self.coords[dim]
            if isinstance(placement, Replicate):
                replica = replica * size + coord
            else:
                shard = (placement.dim, size, coord)
        if shard is None:
            return [region(self.rank, replica, whole_rect(spec))]
        dim, parts, index = shard
        start, stop = chunk_range(param.shape[dim], parts, index)
        expected = list(param.shape)
        expected[dim] = stop - start
        local_shape = tuple(param.to_local().shape)
        if tuple(expected) != local_shape:
            raise ValueError(
                f"local shard {local_shape} of a {tuple(param.shape)} parameter is not the "
                f"torch.chunk shard {tuple(expected)} DistributedMuon expects"
            )
        return [region(self.rank, replica, r)
                for r in shard_rects(tuple(param.shape), spec, dim, start, stop)]


def recognize(
    params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None
) -> DTensorSharding | None:
    """`DTensorSharding` when any parameter is a DTensor (FSDP2, HSDP), else None."""
    if any(isinstance(p, DTensor) for p in params):
        return DTensorSharding(params, process_group)
    return None
