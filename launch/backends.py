"""`dmuon train`'s backends: how the model is sharded, stepped and checkpointed.

Each backend is one object with the same few methods, so the training loop never asks which
one it runs: `build` wraps the model and makes the optimizer and LR schedule, `step` takes a
loss through backward and the optimizer, `save`/`load` write and read one checkpoint folder.
Add a backend by writing a class and naming it in `BACKENDS` (by ``"module:Class"`` when it
lives in a module of its own).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_muon.launch import grad_noise
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distributed_muon import DistributedMuon, checkpoint, muon_param_groups
from distributed_muon.qk_clip import MaxLogitRecorder

if TYPE_CHECKING:
    from distributed_muon.launch.train_config import TrainConfig

LrFactor = Callable[[int], float]


def _ns_options(cfg: TrainConfig, device: torch.device) -> dict[str, str]:
    """``ns_method``/``ns_dtype`` as asked, else the optimizer's defaults, except that
    Newton-Schulz runs in fp32 on CPUs, where half-precision matmuls are slow."""
    out = {"ns_method": cfg.ns_method} if cfg.ns_method else {}
    if cfg.ns_dtype or device.type != "cuda":
        out["ns_dtype"] = cfg.ns_dtype or "fp32"
    return out


class Backend:
    """The interface; ``checkpoint_format`` names what `save` writes (a resume checks it)."""

    name: ClassVar[str]
    checkpoint_format: ClassVar[str]
    supports_per_head: ClassVar[bool] = False  # whether it passes --per-head to the optimizer

    def __init__(self, cfg: TrainConfig, device: torch.device, lr_factor: LrFactor) -> None:
        self.cfg, self.device, self.lr_factor = cfg, device, lr_factor
        self.noise: grad_noise.NoiseProbe | None = None  # set by `build`
        self._fresh: dict[str, float] = {}  # diagnostics measured in the last step

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Refuse flag values this backend cannot run (before any rank starts, also when
        `dmuon slurm` writes a job for other machines)."""
        if cfg.zero_stage is not None:
            raise ValueError("--zero-stage applies to --backend deepspeed only")

    @classmethod
    def check_here(cls, cfg: TrainConfig) -> None:
        """Refuse what this machine lacks for the backend (a package, CUDA)."""

    def build(self, model: nn.Module) -> nn.Module:
        """Shard ``model``, make the optimizer and schedule; returns the module to call."""
        raise NotImplementedError

    def step(self, loss: torch.Tensor) -> None:
        """Backward, optimizer step, zero the gradients, advance the LR schedule."""
        raise NotImplementedError

    def last_lr(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """After a successful run, before the process group is destroyed: release what the
        framework holds on it (may run collectives; not called after a failure)."""

    def qk_stats(self) -> dict[str, float | int]:
        """What QK-clip did in the last step (``qk_clipped`` heads, ``max_logit``); {} off."""
        return {}

    def begin_step(self, step: int) -> None:
        """Before step ``step``'s forward (1-based): arm the noise probe if it logs."""
        if self.noise is not None:
            self.noise.begin(step)

    def diagnostics(self) -> dict[str, float]:
        """What the last step measured (``noise/...``, ``muon/...``); {} on other steps."""
        fresh, self._fresh = self._fresh, {}
        return fresh

    def _collect(self, opt: torch.optim.Optimizer, noise: dict[str, float]) -> None:
        self._fresh.update(noise)
        diag = opt.diagnostics() if isinstance(opt, DistributedMuon) else {}
        if diag and diag["step"] != getattr(self, "_diag_step", None):
            self._diag_step = diag["step"]
            self._fresh.update({"muon/" + k: v for k, v in diag.items() if k != "step"})

    def save(self, folder: Path, train_state: dict[str, int | float]) -> None:
        """Every rank writes its part of a checkpoint into ``folder`` (which exists)."""
        raise NotImplementedError

    def load(self, folder: Path) -> dict[str, int | float]:
        """Restore model, optimizer and schedule from ``folder``; returns the train state."""
        raise NotImplementedError


class _TorchBackend(Backend):
    """FSDP2 and DDP: our optimizer (or torch's AdamW), torch's schedule, DCP checkpoints."""

    checkpoint_format = "dcp"
    supports_per_head = True

    def wrap(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def build(self, model: nn.Module) -> nn.Module:
        self.model = self.wrap(model)
        cfg = self.cfg
        if cfg.optimizer == "muon":
            groups = muon_param_groups(model, per_head=cfg.per_head,
                                       **model.param_groups_spec())
            self.opt: torch.optim.Optimizer = DistributedMuon(
                groups, lr=cfg.peak_lr, weight_decay=cfg.weight_decay,
                **_ns_options(cfg, self.device), qk_clip_tau=cfg.qk_clip,
                diagnostics_every=cfg.diagnostics_every)
            _register_attention(model, self.opt, cfg)
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.95),
                                         weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        self.noise = grad_noise.attach(self.name, model, cfg.batch, cfg.diagnostics_every,
                                       self.device)
        return self.model

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        noise = grad_noise.measure_averaged_and_finish(self.noise, sharded=self.name == "fsdp2")
        self.opt.step()
        self._collect(self.opt, noise)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    def last_lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def qk_stats(self) -> dict[str, float | int]:
        return _qk_stats(self.opt)

    def _state(self, train_state: dict[str, int | float]) -> dict:
        state = {"model": get_model_state_dict(self.model),
                 "train": {k: torch.tensor(v) for k, v in train_state.items()}}
        if not isinstance(self.opt, DistributedMuon):
            state["optim"] = get_optimizer_state_dict(self.model, self.opt)
        return state

    def save(self, folder: Path, train_state: dict[str, int | float]) -> None:
        state = self._state(train_state)
        if isinstance(self.opt, DistributedMuon):
            checkpoint.save(self.opt, str(folder), extra=state)
        else:
            dcp.save(state, checkpoint_id=str(folder))

    def load(self, folder: Path) -> dict[str, int | float]:
        state = self._state({"step": 0, "elapsed": 0.0})
        if isinstance(self.opt, DistributedMuon):
            checkpoint.load(self.opt, str(folder), extra=state)
        else:
            dcp.load(state, checkpoint_id=str(folder),
                     planner=checkpoint.WeightsOnlyLoadPlanner())
            set_optimizer_state_dict(self.model, self.opt, state["optim"])
        set_model_state_dict(self.model, state["model"])
        train = {"step": int(state["train"]["step"]),
                 "elapsed": float(state["train"]["elapsed"])}
        self.sched.last_epoch = train["step"] - 1
        with warnings.catch_warnings():  # stepping a scheduler before the optimizer: intended
            warnings.simplefilter("ignore")
            self.sched.step()  # the LR of the resumed step
        return train


class FSDP2(_TorchBackend):
    name = "fsdp2"

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # An explicit mesh: FSDP2's default one is on CUDA whenever CUDA exists, even for a
        # --device cpu run (rank 1 of a one-GPU machine then fails: invalid device ordinal).
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model


class DDP(_TorchBackend):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(model)


class DeepSpeed(Backend):
    """A DeepSpeed engine from a JSON-style config, as a DeepSpeed user writes it."""

    name = "deepspeed"
    checkpoint_format = "deepspeed"
    supports_per_head = True

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        pass  # --zero-stage is its own flag

    @classmethod
    def check_here(cls, cfg: TrainConfig) -> None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ValueError("--backend deepspeed needs DeepSpeed: pip install "
                             f"'distributed-muon[deepspeed]' ({err})") from None

    def build(self, model: nn.Module) -> nn.Module:
        import deepspeed
        import distributed_muon.integrations.deepspeed  # noqa: F401  (registers the type)

        cfg, world = self.cfg, dist.get_world_size()
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        if cfg.optimizer == "muon":
            params = muon_param_groups(model, **model.param_groups_spec())
            block = {"type": "DistributedMuon", "params": {
                "lr": cfg.peak_lr, "weight_decay": cfg.weight_decay,
                **_ns_options(cfg, self.device), "qk_clip_tau": cfg.qk_clip,
                # DeepSpeed's own key: the qkv's (q, k, v) row blocks refined into heads.
                "per_head_muon": cfg.per_head}}
        else:
            params = model.parameters()
            block = {"type": "AdamW", "params": {
                "lr": cfg.peak_lr, "betas": [0.9, 0.95], "weight_decay": cfg.weight_decay,
                "torch_adam": True}}
        config = {
            "train_batch_size": cfg.batch,
            "train_micro_batch_size_per_gpu": cfg.batch // world,
            "gradient_accumulation_steps": 1,
            "optimizer": block,
            "zero_optimization": {"stage": 2 if cfg.zero_stage is None else cfg.zero_stage},
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model, model_parameters=params, config=config,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, self.lr_factor))
        if cfg.optimizer == "muon":
            _register_attention(model, self.engine.basic_optimizer, cfg)
        self.noise = grad_noise.attach(self.name, model, cfg.batch, cfg.diagnostics_every,
                                       self.device)
        return self.engine

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # optimizer, zero_grad and LR schedule
        self._collect(self.engine.basic_optimizer, grad_noise.finish_with_norm(
            self.noise, self.engine.get_global_grad_norm()))

    def last_lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def qk_stats(self) -> dict[str, float | int]:
        return _qk_stats(self.engine.basic_optimizer)

    def save(self, folder: Path, train_state: dict[str, int | float]) -> None:
        # DeepSpeed's own format; `latest` is ours (same content as DeepSpeed's own file).
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name,
                                    client_state=dict(train_state), save_latest=False)

    def load(self, folder: Path) -> dict[str, int | float]:
        _, client = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        return {"step": client["step"], "elapsed": client["elapsed"]}


def _register_attention(model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """With ``--qk-clip``: every attention layer of the tiny MoE reports its max logits to a
    recorder that ``opt`` (DistributedMuon or DeepSpeedMuon) clips by."""
    if cfg.qk_clip is None:
        return
    for block in model.blocks:
        attn = block.attn
        attn.recorder = MaxLogitRecorder(attn.heads)
        opt.register_qk(attn.recorder, attn.qkv.weight, head_dim=cfg.model.d // attn.heads)


def _qk_stats(opt: torch.optim.Optimizer) -> dict[str, float | int]:
    clip = getattr(opt, "qk_clip", None)
    if clip is None or clip.last_max_logit is None:
        return {}
    return {"qk_clipped": clip.last_clipped, "max_logit": clip.last_max_logit}


class _Registry(Mapping[str, type[Backend]]):
    """Backends by name. One in a module of its own (which imports `Backend` from here) is
    entered as ``"module:Class"`` and imported on first lookup, so that the two modules never
    import each other."""

    def __init__(self, entries: dict[str, type[Backend] | str]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> type[Backend]:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, cls = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), cls)
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


BACKENDS: Mapping[str, type[Backend]] = _Registry({
    **{b.name: b for b in (FSDP2, DDP, DeepSpeed)},
    "megatron": "distributed_muon.launch.megatron_backend:Megatron",
})
