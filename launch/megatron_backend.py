"""`dmuon train --backend megatron`: the tiny MoE under Megatron's DDP and optimizers.

The model is wrapped in Megatron's ``DistributedDataParallel`` with its distributed optimizer
(flat per-bucket shards of every parameter over the data-parallel ranks), and the optimizer is
what ``get_megatron_optimizer`` builds: ``--optimizer dmuon`` through
`distributed_muon.integrations.megatron_optimizer`, or Megatron's Adam for ``--optimizer
adamw``. Data parallel only (the tiny MoE has no tensor-parallel layers). Megatron's DDP and
optimizers allocate on CUDA: GPUs only. Checkpoints are Megatron's ``torch_dist`` format.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from distributed_muon.launch.backends import Backend
from torch import nn

if TYPE_CHECKING:
    from distributed_muon.launch.train_config import TrainConfig


def megatron_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``OptimizerConfig`` attributes from a model's `param_groups_spec` (``adamw`` globs,
    ``row_blocks``), so ``--optimizer dmuon`` splits it as the other backends'
    `muon_param_groups` do. Megatron's DDP holds the model as ``module``: the names the adapter
    sees start with ``module.``."""
    return {"dmuon_adamw": ",".join(f"module.{glob}" for glob in spec.get("adamw", ())),
            "dmuon_row_blocks": {f"module.{glob}": tuple(blocks)
                                 for glob, blocks in spec.get("row_blocks", {}).items()}}


class Megatron(Backend):
    name = "megatron"
    checkpoint_format = "megatron_torch_dist"
    supports_per_head = True  # as --dmuon-per-head

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        super().check(cfg)
        if cfg.device == "cpu":
            raise ValueError("--backend megatron runs on GPUs only (Megatron's DDP and "
                             "optimizers allocate on CUDA): use --device cuda on a GPU machine")
        if cfg.qk_clip is not None:
            raise ValueError("--qk-clip is not supported with --backend megatron yet")

    @classmethod
    def check_here(cls, cfg: TrainConfig) -> None:
        if not torch.cuda.is_available():
            raise ValueError("--backend megatron runs on GPUs only (Megatron's DDP and "
                             "optimizers allocate on CUDA): use --device cuda on a GPU machine")
        try:
            found = importlib.util.find_spec("megatron.core") is not None
        except ModuleNotFoundError:  # no "megatron" package at all
            found = False
        if not found:
            raise ValueError("--backend megatron needs megatron-core: pip install "
                             "'distributed-muon[megatron]'")

    def build(self, model: nn.Module) -> nn.Module:
        import distributed_muon.integrations.megatron_optimizer  # noqa: F401  (registers dmuon)
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig

        cfg = self.cfg
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(1, 1)
        heads = model.blocks[0].attn.heads
        config = TransformerConfig(num_layers=len(model.blocks), hidden_size=cfg.model.d,
                                   num_attention_heads=heads)
        self.model = DistributedDataParallel(
            config=config, module=model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     use_distributed_optimizer=True))
        muon = cfg.optimizer == "muon"
        opt_config = OptimizerConfig(
            optimizer="dmuon" if muon else "adam", lr=cfg.peak_lr,
            weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
            use_distributed_optimizer=True, clip_grad=0.0, muon_momentum=0.95)
        # The other backends' shape scale, asked for by name (`--dmuon-scale`), in place of
        # Megatron's --muon-scale-mode (its "spectral" default is 5x match_rms_adamw).
        opt_config.dmuon_scale = "match_rms_adamw"
        opt_config.dmuon_per_head = cfg.per_head  # the tiny MoE's qkv, by the core's name rule
        for attr, value in megatron_spec(model.param_groups_spec()).items():
            setattr(opt_config, attr, value)
        # Nesterov, as the other backends: the field is muon_use_nesterov in 0.16,
        # muon_nesterov in 0.19. Jordan's fixed quintic ("simple"), the other backends'
        # schedule (Megatron's default "quintic" is a different, per-step one).
        opt_config.muon_nesterov = opt_config.muon_use_nesterov = True
        opt_config.muon_coefficient_type = "simple"
        self.opt = get_megatron_optimizer(opt_config, [self.model])
        self.steps_done = 0
        self._lr = cfg.peak_lr * self.lr_factor(0)
        self.model.zero_grad_buffer()
        return self.model

    def close(self) -> None:
        # As Megatron's own tests end: drain the GPU, meet, then drop its groups.
        from megatron.core import parallel_state as ps

        torch.cuda.synchronize()
        dist.barrier()
        ps.destroy_model_parallel()

    def _set_lr(self) -> None:
        lr = self.cfg.peak_lr * self.lr_factor(self.steps_done)
        for group in self.opt.param_groups:  # Megatron's scheduler would do this
            group["lr"] = lr
            group["weight_decay"] = self.cfg.weight_decay * group.get("wd_mult", 1.0)
        self._lr = lr

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.model.finish_grad_sync()
        self._set_lr()
        ok, _, _ = self.opt.step()
        if not ok:
            raise RuntimeError("Megatron's optimizer skipped a step (non-finite gradients)")
        self.steps_done += 1
        self.model.zero_grad_buffer()
        self.opt.zero_grad()

    def last_lr(self) -> float:
        return self._lr

    def _sharded_state(self, train_state: dict[str, int | float] | None) -> dict:
        from megatron.core.dist_checkpointing import ShardedTensor

        rank = dist.get_rank()
        model = {name: ShardedTensor.from_rank_offsets(f"model.{name}", p, replica_id=(0, 0, rank))
                 for name, p in self.model.module.named_parameters()}
        # Megatron's Adam: its reshardable format (its default one needs flat-range tensors,
        # which megatron-core 0.19 no longer supports); dmuon saves in model space anyway.
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        state = {"model": model,
                 "optimizer": self.opt.sharded_state_dict(
                     model, is_loading=train_state is None, metadata=metadata)}
        if train_state is not None:
            state["train"] = dict(train_state)
        return state

    def save(self, folder: Path, train_state: dict[str, int | float]) -> None:
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(self._sharded_state(train_state), str(folder))

    def load(self, folder: Path) -> dict[str, int | float]:
        from megatron.core import dist_checkpointing

        state = self._sharded_state(None)
        state["train"] = {"step": 0, "elapsed": 0.0}
        loaded = dist_checkpointing.load(state, str(folder))
        with torch.no_grad():
            for name, p in self.model.module.named_parameters():
                p.copy_(loaded["model"][name])
        self.opt.load_state_dict(loaded["optimizer"])
        train = loaded["train"]
        self.steps_done = int(train["step"])
        return {"step": int(train["step"]), "elapsed": float(train["elapsed"])}
