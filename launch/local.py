"""Start ranks: read torchrun/SLURM environment, or spawn local processes ourselves.

`init_process_group_from_env` is what every entry point calls in a rank: it takes rank and
world size from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``) or from SLURM
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), picks NCCL on GPUs and gloo on CPUs, and
binds the local GPU. `spawn` runs a function on N local ranks when nothing launched us.

Ending a rank (measured with torch 2.13, gloo on CPU): a process that exits while its process
group is alive aborts now and then during interpreter teardown (``terminate called without
an active exception``, SIGABRT, no Python frame on the stack): a C++ thread of the group is
destroyed unjoined. `end_process_group` destroys the group first; spawned ranks then leave
with ``os._exit`` once their result is reported, so nothing that belongs to a finished run
depends on the interpreter's teardown. Helper processes a rank started (a library's
multiprocessing Manager) are ended first: ``os._exit`` skips their cleanup.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """A spawned rank raised or died: ``rank``, a one-line ``reason`` and its ``traceback``
    (empty when the process died without raising)."""

    def __init__(self, rank: int, reason: str, traceback_text: str = "") -> None:
        super().__init__(f"rank {rank}: {reason}")
        self.rank, self.reason, self.traceback = rank, reason, traceback_text


def launched_externally() -> bool:
    """True under torchrun, the deepspeed launcher or srun (the environment names our rank)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def leads_job() -> bool:
    """True in the process that should print job-level notes: a local launcher, or rank 0
    of a torchrun/srun job."""
    if not launched_externally():
        return True
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID")) == "0"


def env_world_size() -> int | None:
    """The job's world size from torchrun/SLURM variables, or None when not launched."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None


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


def end_process_group() -> None:
    """Destroy the default process group (and every subgroup) if one is alive."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type unless a ValueError
    (our own checks raise ValueError with a message that already names the fix)."""
    text = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, ValueError) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _end_children(grace_s: float = 5.0) -> None:
    """Stop the helper processes this rank started and did not stop (megatron-core's checkpoint
    writer leaves a multiprocessing Manager running). ``os._exit`` skips multiprocessing's own
    cleanup, and such a child keeps the rank's stdout open: a caller reading it to the end
    (``dmuon train | tee``, ``subprocess.run``) would wait forever."""
    children = mp.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.exitcode is None:
            child.kill()
            child.join(1.0)


def _spawned(local_rank: int, world: int, port: int, fn: Callable, args: tuple,
             conn: multiprocessing.connection.Connection) -> None:
    status: tuple = ("ok",)
    try:
        os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(local_rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - every failure goes to the parent
        status = ("error", one_line(err), traceback.format_exc(), time.time())
    try:
        # Report before ending the group: the peers' "connection closed" errors that follow
        # must not arrive first.
        conn.send(status)
        conn.close()
        end_process_group()
    finally:
        _end_children()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the interpreter's teardown (see the module docstring): everything the rank
        # produced is written and reported by now.
        os._exit(0 if status[0] == "ok" else 1)


def spawn(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run ``fn(*args)`` on ``nproc`` local ranks (each sets RANK etc. and may call
    `init_process_group_from_env`; its process group is destroyed after ``fn`` returns).

    Raises `RankFailed` for the first rank that raises (or dies) and stops the others, which
    may be waiting in a collective for it.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: start at least one rank")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    finished = False
    # The ranks inherit an ignored SIGINT: a Ctrl-C reaches this process alone, which stops
    # them (no traceback from every rank, no rank left waiting in a collective).
    handler = _set_sigint(signal.SIG_IGN)
    try:
        for rank in range(nproc):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_spawned, args=(rank, nproc, port, fn, args, child),
                               name=f"dmuon-rank-{rank}")
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        _set_sigint(handler)
        pending = dict(enumerate(conns))
        failures: list[tuple[float, RankFailed]] = []  # (when it raised, 0: died)
        deadline = None
        while pending and (deadline is None or time.monotonic() < deadline):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait(
                list(pending.values()) + [p.sentinel for p in procs if p.exitcode is None],
                timeout)
            for rank, conn in list(pending.items()):
                if conn not in ready and procs[rank].exitcode is None:
                    continue
                del pending[rank]
                try:
                    status = conn.recv()
                except EOFError:  # died without a word: a signal, or os._exit elsewhere
                    procs[rank].join(timeout=5)
                    status = ("error", _death(procs[rank].exitcode), "", 0.0)
                if status[0] != "ok":
                    failures.append((status[3], RankFailed(rank, status[1], status[2])))
            if failures and deadline is None:
                # Peers of a failed rank fail soon after it ("connection closed"): wait a
                # moment so the report names the cause: a rank that died, else the first
                # to raise.
                deadline = time.monotonic() + 2.0
        if failures:
            raise min(failures, key=lambda f: (f[0], f[1].rank))[1]
        finished = True
    except KeyboardInterrupt:
        _set_sigint(signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        raise
    finally:
        for proc in procs:
            # After a failure the others may wait forever in a collective: stop them now.
            proc.join(timeout=10 if finished else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        _set_sigint(handler)


def _set_sigint(handler: Any) -> Any:
    """Set SIGINT's handler where Python allows it (the main thread); returns the old one."""
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name}"
    return f"the process exited with code {code} without reporting a result"
