"""Start ranks: read torchrun/SLURM environment, or spawn local processes ourselves.

`init_process_group_from_env` is what every entry point calls in a rank: it takes rank and
world size from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``) or from SLURM
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), picks NCCL on GPUs and gloo on CPUs, and
binds the local GPU. `spawn` runs a function on N local ranks when nothing launched us.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def launched_externally() -> bool:
    """True under torchrun, the deepspeed launcher or srun (the environment names our rank)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _env_rank() -> tuple[int, int, int]:
    if "RANK" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", 0)))
    return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
            int(os.environ.get("SLURM_LOCALID", 0)))


def init_process_group_from_env(device: str = "auto") -> torch.device:
    """Join the job's process group; returns this rank's device.

    ``device``: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``. A multi-node SLURM job
    must export ``MASTER_ADDR`` (the first host of ``SLURM_JOB_NODELIST``; `dmuon slurm`
    scripts do): without it this raises rather than hang.
    """
    rank, world, local_rank = _env_rank()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if "MASTER_ADDR" not in os.environ and int(os.environ.get("SLURM_NNODES", "1")) > 1:
        # Defaulting to localhost here would leave every node waiting on its own rendezvous.
        raise RuntimeError(
            "MASTER_ADDR is not set in a multi-node Slurm job: export it in the job script, "
            'e.g. MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
            "(scripts rendered by `dmuon slurm` do)"
        )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
    return dev


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn(*args)


def spawn(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run ``fn(*args)`` on ``nproc`` local ranks (each sets RANK etc. and may call
    `init_process_group_from_env`). Raises if any rank fails."""
    mp.start_processes(_spawned, args=(nproc, free_port(), fn, args), nprocs=nproc,
                       start_method="spawn", join=True)
