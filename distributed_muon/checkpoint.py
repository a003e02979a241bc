"""Topology-free checkpoints of `DistributedMuon` with ``torch.distributed.checkpoint``.

Each state tensor (momentum, AdamW moments) is saved as the runs of the parameter's global
row-major storage that a rank holds: key ``dmuon/<param>/<state>@<global offset>``. Replicas
write the same keys, which DCP stores once. Loading reads the checkpoint's metadata, fetches
only the runs that overlap what this rank now holds, and copies the overlaps: a checkpoint
saved at N ranks under one layout (DDP, FSDP2, HSDP) loads at M ranks under another.

Parameters are named by the optimizer's ``param_names`` when it has them (built from
``named_parameters`` or `muon_param_groups`), else ``<group>.<index>``. Loading checks names
and shapes, and never unpickles code (DCP reads tensors and plain objects).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem

from distributed_muon.dtypes import dtype_name
from distributed_muon.optimizer import (
    FORMER_DEFAULTS,
    GROUP_OPTIONS,
    STRUCTURAL_OPTIONS,
    DistributedMuon,
)
from distributed_muon.params import MatrixSpec

_PREFIX = "dmuon/"
_META = _PREFIX + "meta"
_RUN = re.compile(r"^dmuon/(?P<param>.+)/(?P<state>[^/@]+)@(?P<offset>\d+)$")
_FORMAT = 1


class WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with ``weights_only=False``; this one
    refuses anything but plain data."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _entries(opt: DistributedMuon) -> list[tuple[str, torch.Tensor, MatrixSpec]]:
    """(name, parameter, spec of its [rows, cols] view) for every parameter, in group order."""
    muon_specs = {id(p): s for p, s in zip(opt.muon_params, opt.layout.specs, strict=True)}
    out = []
    for gi, group in enumerate(opt.param_groups):
        names = group.get("param_names") or [f"{gi}.{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"], strict=True):
            out.append((name, p, muon_specs.get(id(p)) or MatrixSpec.storage(p.shape)))
    return out


def _runs(opt: DistributedMuon, p: torch.Tensor, spec: MatrixSpec) -> list[tuple[int, int, int]]:
    """(global offset, length, local offset) of this rank's storage of ``p``."""
    return [run for reg in opt.sharding.regions(p, spec) for run in reg.intervals(spec.cols)]


def _group_options(opt: DistributedMuon) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k not in ("params", "param_names")}
            for g in opt.param_groups]


def state_dict(opt: DistributedMuon) -> dict[str, Any]:
    """This rank's part of the topology-free state, ready for ``dcp.save``. Collective when the
    optimizer's parameters changed since its last step (its layout is rebuilt first)."""
    opt.sync_layout()
    out: dict[str, Any] = {}
    params_meta = {}
    for name, p, spec in _entries(opt):
        state = opt.state.get(p, {})
        params_meta[name] = {"shape": list(p.shape), "state": sorted(state)}
        runs = _runs(opt, p, spec)
        for key, value in state.items():
            if value.ndim == 0:  # AdamW's step count: identical on every holder
                out[f"{_PREFIX}{name}/{key}"] = value
                continue
            flat = value.reshape(-1)
            for offset, length, local in runs:
                out[f"{_PREFIX}{name}/{key}@{offset}"] = flat.narrow(0, local, length)
    meta = {
        "format": _FORMAT,
        "params": params_meta,
        "param_groups": _group_options(opt),
        "skipped_steps": opt.skipped_steps,
    }
    # One opaque bytes entry (DCP would flatten a dict into many); read back weights_only.
    buf = io.BytesIO()
    torch.save(meta, buf)
    out[_META] = buf.getvalue()
    return out


def save(opt: DistributedMuon, checkpoint_id: str, extra: Mapping[str, Any] | None = None) -> None:
    """Save the optimizer (and ``extra``, e.g. a model state dict) with DCP. Collective over
    the optimizer's process group."""
    payload = dict(extra or {})
    payload.update(state_dict(opt))
    dcp.save(payload, checkpoint_id=checkpoint_id, process_group=opt.sharding.group,
             no_dist=_no_dist(opt))


def load(opt: DistributedMuon, checkpoint_id: str, extra: dict[str, Any] | None = None) -> None:
    """Load state saved by `save`, at any world size and layout, into ``opt`` (and ``extra``
    in place, as ``dcp.load`` does). Collective over the optimizer's process group."""
    opt.sync_layout()
    group = opt.sharding.group
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    if _META not in metadata:
        raise ValueError(f"{checkpoint_id} holds no DistributedMuon state (no {_META!r} entry)")
    head: dict[str, Any] = {_META: b""}
    dcp.load(head, checkpoint_id=checkpoint_id, process_group=group,
             planner=WeightsOnlyLoadPlanner(), no_dist=_no_dist(opt))
    meta = torch.load(io.BytesIO(head[_META]), weights_only=True)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{checkpoint_id}: unknown DistributedMuon checkpoint format "
                         f"{meta.get('format')!r}")
    entries = _entries(opt)
    _check_same_model(checkpoint_id, meta["params"], entries)
    for gi, (options, saved) in enumerate(
        zip(opt.param_groups, meta["param_groups"], strict=True)
    ):
        if isinstance(saved.get("ns_dtype"), torch.dtype):  # written before dtypes were strings
            saved["ns_dtype"] = dtype_name(saved["ns_dtype"])
        for key in STRUCTURAL_OPTIONS:
            # Options added after a checkpoint was written had their default of then there.
            saved.setdefault(key, FORMER_DEFAULTS.get(key, GROUP_OPTIONS[key]))
            if options[key] != saved[key]:
                raise ValueError(
                    f"{checkpoint_id} was saved with {key}={saved[key]!r} in param group {gi}, "
                    f"this optimizer has {options[key]!r}: build it with the checkpoint's options"
                    " (the Newton-Schulz defaults changed on 2026-12-05: docs/changelog.md)"
                )

    saved_runs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for key, md in metadata.items():
        match = _RUN.match(key)
        if match:
            saved_runs.setdefault((match["param"], match["state"]), []).append(
                (int(match["offset"]), int(md.size[0]))
            )

    request: dict[str, Any] = dict(extra or {})
    fills = []  # (state tensor (flat), local offset, saved key, start within saved run, length)
    new_state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for name, p, spec in entries:
        names = meta["params"][name]["state"]
        if not names:
            continue
        local = opt.sharding.local(p)
        state: dict[str, torch.Tensor] = {}
        for key in names:
            if (name, key) not in saved_runs:  # a scalar (step)
                state[key] = torch.zeros((), dtype=torch.float32)
                request[f"{_PREFIX}{name}/{key}"] = state[key]
                continue
            state[key] = torch.zeros_like(local)
            flat = state[key].reshape(-1)
            for offset, length, loc in _runs(opt, p, spec):
                for s_off, s_len in saved_runs[(name, key)]:
                    lo, hi = max(offset, s_off), min(offset + length, s_off + s_len)
                    if lo >= hi:
                        continue
                    skey = f"{_PREFIX}{name}/{key}@{s_off}"
                    if skey not in request:
                        request[skey] = torch.empty(s_len, dtype=local.dtype, device=local.device)
                    fills.append((flat, loc + lo - offset, skey, lo - s_off, hi - lo))
        new_state[p] = state
    dcp.load(request, checkpoint_id=checkpoint_id, process_group=group,
             planner=WeightsOnlyLoadPlanner(), no_dist=_no_dist(opt))
    for flat, loc, skey, start, length in fills:
        flat.narrow(0, loc, length).copy_(request[skey].narrow(0, start, length))
    if extra is not None:
        for k in extra:
            extra[k] = request[k]

    # Only now, with everything read, replace the optimizer's state: a failed load leaves it.
    opt.state.clear()
    for p, state in new_state.items():
        opt.state[p] = state
    for options, saved in zip(opt.param_groups, meta["param_groups"], strict=True):
        options.update(saved)
    opt.skipped_steps = meta["skipped_steps"]


def _no_dist(opt: DistributedMuon) -> bool:
    return opt.sharding.group is None and not dist.is_initialized()


def _check_same_model(checkpoint_id: str, saved: dict[str, Any], entries: list) -> None:
    now = {name: list(p.shape) for name, p, _ in entries}
    mine = {name: info["shape"] for name, info in saved.items()}
    if now != mine:
        missing = sorted(set(mine) - set(now))[:5]
        added = sorted(set(now) - set(mine))[:5]
        reshaped = sorted(k for k in set(now) & set(mine) if now[k] != mine[k])[:5]
        raise ValueError(
            f"{checkpoint_id} was saved for a different model: parameters only in the "
            f"checkpoint {missing}, only in the optimizer {added}, with other shapes {reshaped}"
        )
