"""Run a function on N gloo ranks in fresh processes and collect every rank's result.

Each rank's return value (tensors, lists, dicts, numbers) comes back through a pipe. A rank
that raises fails the test with its traceback; ranks that hang past ``timeout`` are killed and
fail it too, so a mismatched collective shows up as a failure, never as a stuck suite.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import tempfile
import traceback

import torch


def _entry(fn, rank, world, init_file, args, conn, backend):
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(result, buf)
        conn.send(("ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_ranks(world: int, fn, *args, timeout: float = 120.0, backend: str = "gloo") -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own process
    (``backend="nccl"``: rank r on GPU r)."""
    ctx = mp.get_context("spawn")
    fd, init_file = tempfile.mkstemp(prefix="dmuon-pg-")
    os.close(fd)
    os.unlink(init_file)
    procs, conns = [], []
    try:
        for rank in range(world):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_entry, args=(fn, rank, world, init_file, args, child,
                                                       backend))
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        results = []
        for rank, conn in enumerate(conns):
            if not conn.poll(timeout):
                raise TimeoutError(f"rank {rank} of {world} gave no result in {timeout:.0f} s "
                                   "(a hang: mismatched collectives?)")
            status, payload = conn.recv()
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world} failed:\n{payload}")
            results.append(torch.load(io.BytesIO(payload), weights_only=False))
        return results
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)
