"""DeepSpeed checkpoints <-> the topology-free form of `distributed_muon.checkpoint`.

DeepSpeed stores each rank's flat partitions (fp32 weights and optimizer state) in its own
``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` and can re-partition Adam state only. Here
`convert_checkpoint` rebuilds whole tensors per parameter from those files, using the fragment
map (`fragment_map`) `DeepSpeedMuon` adds to its state dict, and writes them with
``torch.distributed.checkpoint``: ``model/<name>`` (fp32 weights) and
``dmuon/<name>/<state>@0`` (momentum, AdamW moments).
`load_topology_free` puts such a checkpoint into a running engine at any data-parallel size
and ZeRO stage.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from distributed_muon.integrations.deepspeed_internals import partition

from distributed_muon.checkpoint import _FORMAT, _META, _PREFIX, WeightsOnlyLoadPlanner

if TYPE_CHECKING:
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# The state dict entry that holds `fragment_map`; without it a file cannot be converted.
FRAGMENTS_KEY = "dmuon_fragments"
# One flat partition read back: the flat fp32 tensor, its optimizer state, and its fragments
# (name, shape, start, length, offset) as `fragment_map` wrote them.
_Fragment = tuple[str, tuple[int, ...], int, int, int]
_Flat = tuple[torch.Tensor, dict[str, torch.Tensor], list[_Fragment]]


def fragment_map(opt: DeepSpeedMuon) -> dict[int, dict[str, Any]]:
    """What each flat partition of ``opt`` holds, saved in its state dict so that
    `convert_checkpoint` needs none of DeepSpeed's layout rules.

    For every flat partition, by its index in torch's ``state`` (its position among all
    groups' ``params``): ``{"flat": k, "params": [(name, shape, start, length, offset), ...]}``,
    ``k`` its index in the rank file's list of flat fp32 tensors (its param group, or its
    ZeRO-3 sub-group), one tuple per parameter it holds a fragment of. Without ZeRO a group
    holds whole tensors, which DeepSpeed's checkpoint already saves whole: no entry."""
    fragments: dict[int, dict[str, Any]] = {}
    index = 0
    for gi, group in enumerate(opt.param_groups):
        params = opt.group_params[gi]
        names = dict(zip(params, opt.group_names[gi], strict=True))
        for flat in group["params"]:
            if opt.is_partitioned(gi):
                part = partition(flat, params)
                fragments[index] = {
                    "flat": gi if part.sub_group is None else part.sub_group,
                    "params": [(names[p], tuple(part.shapes[p]), *fragment)
                               for p, fragment in part.fragments.items()],
                }
            index += 1
    return fragments


def _read_rank_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed optimizer file, loaded with ``weights_only=True`` plus the three plain
    DeepSpeed classes it pickles (no code runs)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]


def _read_fragments(path: Path) -> tuple[int, list[dict[str, Any]], list[_Flat]]:
    """One rank's file: its ZeRO stage, its param groups' options, and for every flat
    partition in its fragment map the flat fp32 tensor, its state and its fragments."""
    sd = _read_rank_file(path)
    if "fp32_flat_groups" in sd:  # ZeRO-3
        inner, fp32 = sd["optimizer_state_dict"], sd["fp32_flat_groups"]
    else:  # ZeRO-1/2 and BF16_Optimizer (whose files carry no zero_stage)
        inner, fp32 = sd["base_optimizer_state"], sd["single_partition_of_fp32_groups"]
    if not isinstance(inner, dict) or FRAGMENTS_KEY not in inner:
        raise ValueError(f"{path} was not saved by DistributedMuon's DeepSpeed optimizer "
                         "(no fragment map): only its checkpoints can be converted")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    flats = [(fp32[info["flat"]].float(), inner["state"].get(index, {}), info["params"])
             for index, info in inner[FRAGMENTS_KEY].items()]
    return int(sd.get("zero_stage", 1)), groups, flats


def _rank_files(src: Path) -> list[Path]:
    found = sorted((int(m.group(1)), f) for f in src.iterdir()
                   if (m := _RANK_FILE.search(f.name)))
    if not found:
        raise FileNotFoundError(f"{src} holds no DeepSpeed ZeRO optimizer files "
                                "(*zero_pp_rank_*_mp_rank_00_optim_states.pt): pass the tag's "
                                "folder, e.g. checkpoints/global_step100")
    if [r for r, _ in found] != list(range(len(found))):
        raise ValueError(f"{src}: optimizer files of ranks {[r for r, _ in found]}, expected "
                         f"0..{len(found) - 1}: the checkpoint is incomplete")
    return [f for _, f in found]


def convert_checkpoint(src: str | Path, dst: str | Path,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert the DeepSpeed checkpoint folder ``src`` (one tag) into a topology-free DCP
    checkpoint at ``dst``. Returns a summary (parameters, ranks, stage). Collects whole
    tensors in this process's memory (fp32 weights plus state: about 12-16 bytes/param)."""
    src, dst = Path(src), Path(dst)
    files = _rank_files(src)
    weights: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    covered: dict[str, int] = {}
    groups: list[dict[str, Any]] = []
    stage = None
    for rank, path in enumerate(files):
        if progress:
            progress(f"reading rank {rank + 1}/{len(files)}: {path.name}")
        stage, groups, flats = _read_fragments(path)
        for flat, state, params in flats:
            for name, shape, start, length, offset in params:
                numel = math.prod(shape)
                shapes[name] = tuple(shape)
                whole = weights.setdefault(name, torch.zeros(numel))
                whole.narrow(0, start, length).copy_(flat.narrow(0, offset, length))
                covered[name] = covered.get(name, 0) + length
                mine = states.setdefault(name, {})
                for key, value in state.items():
                    if value.ndim == 0:
                        mine[key] = value.clone()
                        continue
                    whole_state = mine.setdefault(key, torch.zeros(numel))
                    whole_state.narrow(0, start, length).copy_(value.narrow(0, offset, length))
    holes = [n for n, w in weights.items() if covered[n] != w.numel()]
    if holes:
        raise ValueError(f"{src}: parameters {holes[:5]} are not covered exactly once by the "
                         "ranks' fragments: the checkpoint is inconsistent")
    meta = {
        "format": _FORMAT,
        "params": {n: {"shape": list(shapes[n]), "state": sorted(states[n])} for n in weights},
        "param_groups": groups,
        "skipped_steps": 0,
        "source": {"deepspeed_zero_stage": stage, "ranks": len(files)},
    }
    payload: dict[str, Any] = {}
    for name, whole in weights.items():
        payload[f"model/{name}"] = whole
        for key, value in states[name].items():
            suffix = "" if value.ndim == 0 else "@0"
            payload[f"{_PREFIX}{name}/{key}{suffix}"] = value
    buf = io.BytesIO()
    torch.save(meta, buf)
    payload[_META] = buf.getvalue()
    if progress:
        progress(f"writing {len(weights)} parameters to {dst}")
    dcp.save(payload, checkpoint_id=str(dst), no_dist=True)
    return {"parameters": len(weights), "ranks": len(files), "zero_stage": stage}


def load_topology_free(engine: Any, path: str | Path) -> None:
    """Load a topology-free checkpoint (from `convert_checkpoint`) into a DeepSpeed engine
    whose optimizer is ``"type": "DistributedMuon"``: fp32 weights, the model's weights and
    optimizer state, at this engine's data-parallel size and ZeRO stage. Every rank reads the
    whole tensors; call it on every rank, before the next step."""
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

    opt = engine.optimizer
    while not isinstance(opt, DeepSpeedMuon):
        if not hasattr(opt, "optimizer"):
            raise TypeError("the engine's optimizer is not DistributedMuon: set "
                            "\"type\": \"DistributedMuon\" in the DeepSpeed config")
        opt = opt.optimizer
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if _META not in metadata:
        raise ValueError(f"{path} holds no DistributedMuon state (no {_META!r} entry)")
    head: dict[str, Any] = {_META: b""}
    dcp.load(head, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    meta = torch.load(io.BytesIO(head[_META]), weights_only=True)
    request: dict[str, Any] = {}
    for name, info in meta["params"].items():
        numel = math.prod(info["shape"])
        request[f"model/{name}"] = torch.empty(numel)
        for key in info["state"]:
            scalar = f"{_PREFIX}{name}/{key}"
            request[scalar if scalar in metadata else f"{scalar}@0"] = (
                torch.empty(()) if scalar in metadata else torch.empty(numel))
    dcp.load(request, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    weights = {n: request[f"model/{n}"] for n in meta["params"]}
    states = {
        n: {k: request.get(f"{_PREFIX}{n}/{k}", request.get(f"{_PREFIX}{n}/{k}@0"))
            for k in info["state"]}
        for n, info in meta["params"].items()
    }
    opt.load_full_state(weights, states)
