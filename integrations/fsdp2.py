"""FSDP2 (``fully_shard``) and other DTensor parameters.

Placements per mesh dimension: ``Shard(0)`` (FSDP2's default), ``Shard(1)`` (a column block of
a 2-D weight, or a row block inside every expert of a 3-D expert tensor) and ``Replicate()``
(HSDP's outer dimension). Shards follow ``torch.chunk``: ``ceil(size / k)`` per rank, so the
last ranks may hold fewer rows or none. Replicate coordinates become replica ids, so an HSDP
mesh ``(Replicate, Shard(0))`` still orthogonalizes each matrix once in the whole job, and
plain (non-DTensor) parameters among them are replicated over the same group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from distributed_muon.cluster import chunk as _chunk  # the one torch.chunk rule (dmuon plan too)
from distributed_muon.layout import Block, Region
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
        if not isinstance(param, DTensor):  # replicated over the whole group
            return [Region.flat(rank=self.rank, replica=self.rank, spec=spec, start=0,
                                stop=param.numel())]
        replica, shard = 0, None
        for dim, placement in enumerate(param.placements):
            size, coord = self.mesh.size(dim), self.coords[dim]
            if isinstance(placement, Replicate):
                replica = replica * size + coord
            else:
                shard = (placement.dim, size, coord)
        local_shape = tuple(param.to_local().shape)
        if shard is None:
            return [Region.flat(rank=self.rank, replica=replica, spec=spec, start=0,
                                stop=param.numel())]
        dim, parts, index = shard
        start, stop = _chunk(param.shape[dim], parts, index)
        expected = list(param.shape)
        expected[dim] = stop - start
        if tuple(expected) != local_shape:
            raise ValueError(
                f"local shard {local_shape} of a {tuple(param.shape)} parameter is not the "
                f"torch.chunk shard {tuple(expected)} DistributedMuon expects"
            )
        if dim == 0:
            inner = math.prod(param.shape[1:])
            return [Region.flat(rank=self.rank, replica=replica, spec=spec, start=start * inner,
                                stop=stop * inner)]
        if param.ndim == 2:  # a column block [start, stop) of the whole matrix
            block = Block(row0=0, row1=spec.rows, col0=start, col1=stop, start=0,
                          stop=spec.rows * (stop - start))
            return [Region(rank=self.rank, replica=replica, block=block)]
        if spec.experts != param.shape[0]:
            raise ValueError("Shard(1) of a 3-D parameter needs matrix_view='experts'")
        # [E, m, n] with Shard(1): rows [start, stop) of every expert, experts back to back.
        n = param.shape[2]
        per_expert = (stop - start) * n
        return [
            Region(rank=self.rank, replica=replica, offset=e * per_expert,
                   block=Block(row0=e * spec.rows + start, row1=e * spec.rows + stop, col0=0,
                               col1=n, start=0, stop=per_expert))
            for e in range(param.shape[0])
        ]


def recognize(
    params: Sequence[torch.Tensor], process_group: dist.ProcessGroup | None
) -> DTensorSharding | None:
    """`DTensorSharding` when any parameter is a DTensor (FSDP2, HSDP), else None."""
    if any(isinstance(p, DTensor) for p in params):
        return DTensorSharding(params, process_group)
    return None
