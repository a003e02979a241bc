"""`dmuon train`'s gradient-noise probe: each rank's local gradient vs the averaged one.

On a logging step every rank adds up ``|g_local|^2`` as the framework hands the local
gradient over, before it averages it, and ``|g_avg|^2`` of the averaged gradient after
backward; one ``all_reduce`` of those few sums then gives the two-batch estimate of
``B_simple`` (`distributed_muon.noise_scale`), with the small batch = one rank's sequences
and the big batch = the global batch. Steps that do not log do nothing and add no collective.

Where each framework shows the local gradient:

- DDP: a hook on every parameter sees its local gradient before DDP's all-reduce; the
  averaged one is ``p.grad``. Per parameter (matrices) and the whole model.
- FSDP2: the local gradient exists only inside FSDP's reduce-scatter, so a custom
  reduce-scatter (``FSDPModule.set_custom_reduce_scatter``, public API) measures its input
  before running the usual ``reduce_scatter_tensor``: per FSDP module (each block, and the
  root's own parameters) and the whole model, not per parameter. Gradients reduced in
  fp32/bf16 (no pre-division; our default): fp16 reduction would pre-scale the input.
- DeepSpeed: hooks see the local gradients as under DDP, but the averaged gradient lives in
  ZeRO's flat partitions; the engine's public ``get_global_grad_norm()`` gives its norm for
  the whole model only, so DeepSpeed estimates ``B_simple`` for the whole model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from distributed_muon.noise_scale import NoiseScale

MODEL = "model"  # the key of the whole-model estimate


class NoiseProbe:
    """Sums per key on one rank; ``keys`` ends with `MODEL`.

    ``local_batch`` and ``global_batch`` are the two batch sizes (sequences); ``every`` the
    logging period in steps; ``beta`` the smoothing per logging step (`NoiseScale`), by
    default ``0.95 ** every``: the same time constant (about 20 training steps) whatever the
    period, short enough to follow the noise scale as it grows during training.
    """

    def __init__(self, keys: list[str], local_batch: int, global_batch: int, every: int,
                 device: torch.device, beta: float | None = None) -> None:
        self.keys, self.index = keys, {k: i for i, k in enumerate(keys)}
        self.small, self.big, self.every = local_batch, global_batch, every
        self.device = device
        self.scale = NoiseScale(keys, 0.95 ** max(every, 1) if beta is None else beta)
        self.active = False
        self.seconds = 0.0  # the probe's own time on this logging step
        self._local = torch.zeros(len(keys), dtype=torch.float64, device=device)
        self._avg = torch.zeros(len(keys), dtype=torch.float64, device=device)

    def begin(self, step: int) -> None:
        """Arm for step ``step`` (1-based) when it logs."""
        self.active = self.every > 0 and step % self.every == 0
        if self.active:
            self._local.zero_()
            self._avg.zero_()
            self.seconds = 0.0

    def add_local(self, key: str, sq: torch.Tensor) -> None:
        """``sq``: a squared norm of this rank's local gradient, added to ``key`` and
        `MODEL` (a parameter or group counted once in each)."""
        self._local[self.index[key]] += sq
        if key != MODEL:
            self._local[-1] += sq

    def add_averaged(self, key: str, sq: torch.Tensor) -> None:
        """The same for the averaged gradient (a shard's part of it, if sharded)."""
        self._avg[self.index[key]] += sq
        if key != MODEL:
            self._avg[-1] += sq

    def finish(self, averaged_is_sharded: bool) -> dict[str, float]:
        """One ``all_reduce``; returns ``noise/<key>/...`` scalars (see `NoiseScale.update`)
        plus ``noise/seconds``, this rank's time in the probe. ``averaged_is_sharded``: the
        ranks hold disjoint parts of the averaged gradient (summed), else each holds all of
        it (averaged over ranks: the same value)."""
        start = time.perf_counter()
        world = dist.get_world_size()
        both = torch.cat([self._local, self._avg])
        dist.all_reduce(both)
        local_mean = both[: len(self.keys)] / world
        avg = both[len(self.keys):] / (1 if averaged_is_sharded else world)
        out = self.scale.update(local_mean, avg, self.small, self.big)
        self.seconds += time.perf_counter() - start
        self.active = False
        return {"noise/" + k: v for k, v in out.items()} | {"noise/seconds": self.seconds}


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2).sum().double()


def hook_local_gradients(probe: NoiseProbe, named: Iterable[tuple[str, nn.Parameter]],
                         key_of: dict[str, str]) -> list:
    """A hook on each parameter that adds its local gradient's squared norm to its key
    (``key_of[name]``, default: only `MODEL`) on active steps. Returns the handles."""
    handles = []
    for name, p in named:
        if not p.requires_grad:
            continue
        key = key_of.get(name, MODEL)

        def hook(grad: torch.Tensor, key: str = key) -> None:
            if probe.active:
                start = time.perf_counter()
                probe.add_local(key, _sq(grad))
                probe.seconds += time.perf_counter() - start

        handles.append(p.register_hook(hook))
    return handles


def add_averaged_grads(probe: NoiseProbe, named: Iterable[tuple[str, nn.Parameter]],
                       key_of: dict[str, str]) -> None:
    """After backward: each parameter's averaged gradient (its local shard for DTensors)."""
    start = time.perf_counter()
    for name, p in named:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g
        probe.add_averaged(key_of.get(name, MODEL), _sq(g))
    probe.seconds += time.perf_counter() - start


def fsdp2_module_keys(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the FSDP module that reduces it (``"root"`` for the model's own)."""
    from torch.distributed.fsdp import FSDPModule

    owners = {}
    for mname, module in model.named_modules():
        if mname and isinstance(module, FSDPModule):
            for pname, _ in module.named_parameters():
                owners[f"{mname}.{pname}"] = mname
    return {name: owners.get(name, "root") for name, _ in model.named_parameters()}


def hook_fsdp2_reduce_scatter(probe: NoiseProbe, model: nn.Module) -> None:
    """Measure each FSDP module's reduce-scatter input (its local gradients, padded with
    zeros) on active steps."""
    from torch.distributed.fsdp import FSDPModule

    for mname, module in model.named_modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(_MeasuredReduceScatter(probe, mname or "root"))


class _MeasuredReduceScatter:
    """FSDP2's default reduce-scatter, measuring the input on the probe's active steps (the
    `ReduceScatter` interface of ``set_custom_reduce_scatter``: ``allocate`` and a call)."""

    def __init__(self, probe: NoiseProbe, key: str) -> None:
        self.probe, self.key = probe, key

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op, async_op: bool = False):
        if self.probe.active:
            start = time.perf_counter()
            self.probe.add_local(self.key, _sq(input_tensor))
            self.probe.seconds += time.perf_counter() - start
        if hasattr(dist, "reduce_scatter_single"):  # torch >= 2.13 (the old name warns)
            return dist.reduce_scatter_single(output=output_tensor, input=input_tensor, op=op,
                                              group=group, async_op=async_op)
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                          async_op=async_op)


def attach(backend: str, model: nn.Module, global_batch: int, every: int,
           device: torch.device) -> NoiseProbe | None:
    """The probe for `dmuon train`'s ``backend`` ("fsdp2", "ddp" or "deepspeed") on ``model``
    (the unwrapped module; FSDP2's is sharded in place), or None with one rank or ``every``
    0. Keys: FSDP modules (fsdp2), matrix parameters (ddp), the whole model only (deepspeed).
    """
    world = dist.get_world_size()
    if every <= 0 or world < 2:
        return None
    if backend == "fsdp2":
        key_of = fsdp2_module_keys(model)
    elif backend == "ddp":
        key_of = {n: n for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad}
    else:
        key_of = {}
    keys = sorted(set(key_of.values()), key=list(key_of.values()).index) + [MODEL]
    probe = NoiseProbe(keys, global_batch // world, global_batch, every, device)
    if backend == "fsdp2":
        hook_fsdp2_reduce_scatter(probe, model)
    else:
        hook_local_gradients(probe, model.named_parameters(), key_of)
    probe.model, probe.key_of = model, key_of
    return probe


def measure_averaged_and_finish(probe: NoiseProbe | None, sharded: bool) -> dict[str, float]:
    """After backward (FSDP2, DDP): the averaged gradients, then `NoiseProbe.finish`;
    {} when the probe is off or this step does not log."""
    if probe is None or not probe.active:
        return {}
    add_averaged_grads(probe, probe.model.named_parameters(), probe.key_of)
    return probe.finish(averaged_is_sharded=sharded)


def finish_with_norm(probe: NoiseProbe | None, norm: float | None) -> dict[str, float]:
    """After DeepSpeed's step: its global norm of the averaged gradient is the big batch's
    (None: DeepSpeed computed none, nothing logged, alike on every rank)."""
    if probe is None or not probe.active or norm is None:
        if probe is not None:
            probe.active = False
        return {}
    probe.add_averaged(MODEL, torch.tensor(float(norm) ** 2, dtype=torch.float64))
    return probe.finish(averaged_is_sharded=False)
