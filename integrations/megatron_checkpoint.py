"""Checkpoints of ``--optimizer dmuon`` under Megatron's distributed optimizer, in model space.

Megatron's distributed-optimizer formats assume Adam's state on every parameter; ours differs
(a Muon matrix keeps a momentum buffer only). Here each parameter's fp32 main value and state
are saved as tensors shaped and sharded like the parameter itself (its entry in the model's
sharded state dict, Megatron's ``torch_dist`` format), so a checkpoint loads at another
data-parallel size. The data-parallel shards of a parameter are assembled with one all-reduce
per parameter (at save, and every rank holds one parameter's full TP-local state at a time;
at load, the full TP-local state of every parameter, briefly). Param groups and the step are
common.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from distributed_muon.integrations import megatron_internals as internals

if TYPE_CHECKING:
    from distributed_muon.integrations.megatron_optimizer import MegatronMuon


class ModelSpaceCheckpoint:
    """The ``sharded_state_dict``/``load_state_dict`` pair of one distributed-optimizer
    wrapper whose inner optimizer is ``inner``, its shards split over ``dp_group``."""

    def __init__(self, inner: MegatronMuon, dp_group: dist.ProcessGroup) -> None:
        self.inner, self.dp_group = inner, dp_group
        self.names: dict[int, list[str]] = {}  # id(model param) -> entry of each state row

    def sharded_state_dict(self, model_sharded_state_dict: Any, is_loading: bool = False,
                           **_: Any) -> dict[str, Any]:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

        inner = self.inner
        inner.init_state()
        tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        by_param = {id(sh.data): sh for sh in nested_values(tensors)}
        mine = {id(p): (main, span) for p, main, span in inner.main_shards()}
        device = next(iter(mine.values()))[0].device if mine else torch.device("cuda")
        self.names.clear()
        state: dict[str, Any] = {}
        for index, (model, keys) in enumerate(inner.state_keys()):  # same order on DP ranks
            sh = by_param.get(id(model))
            if sh is None:
                raise ValueError("a parameter of the optimizer is missing from the model's "
                                 "sharded state dict: build it with keep_vars=True")
            full = torch.zeros(len(keys), model.numel(), device=device)
            if not is_loading:
                self._gather(full, keys, mine.get(id(model)))
            self.names[id(model)] = []
            for row, key in zip(full, keys, strict=True):
                # Layers stacked under one model key differ by offset: index the dict entry.
                fields = dict(key=f"optimizer.state.{key}.{sh.key}", data=row.view(model.shape))
                if not isinstance(sh, ShardedTensorFactory):
                    fields["dtype"] = row.dtype
                state[f"{index}.{key}"] = replace(sh, **fields)
                self.names[id(model)].append(f"{index}.{key}")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        return {"param_state": state, "param_groups": groups, "step": inner.steps}

    def _gather(self, full: torch.Tensor, keys: list[str],
                mine: tuple[torch.Tensor, tuple[int, int]] | None) -> None:
        """Fill ``full`` (``[len(keys), model.numel()]``, zeros) with the parameter's main
        value and state over its whole TP-local storage: this rank's range (``mine``: its main
        shard and span, None if it holds none), then the data-parallel peers'."""
        if mine is not None:
            main, (start, stop) = mine
            full[:, start:stop] = torch.stack(
                [main, *(self.inner.state[main][k] for k in keys[1:])])
        dist.all_reduce(full, group=self.dp_group)  # the DP ranges are disjoint

    @torch.no_grad()  # a main shard of an fp32 parameter is a view of the parameter itself
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = self.inner
        loaded = state_dict["param_state"]
        keys = {id(p): k for p, k in inner.state_keys()}
        for model, main, (start, stop) in inner.main_shards():
            for key, name in zip(keys[id(model)], self.names[id(model)], strict=True):
                target = main if key == "fp32_param" else inner.state[main][key]
                target.copy_(loaded[name].reshape(-1)[start:stop])
        for group, saved in zip(inner.param_groups, state_dict["param_groups"], strict=True):
            group.update(saved)
        inner.set_steps(int(state_dict["step"]))


def refuse(*_: Any, **__: Any) -> Any:
    raise NotImplementedError(
        "--optimizer dmuon with --use-distributed-optimizer saves checkpoints in the "
        "torch_dist format only (--ckpt-format torch_dist): Megatron's other "
        "distributed-optimizer formats hold Adam state (docs/megatron.md)")


def model_space_checkpoints(wrapper: Any, inner: MegatronMuon,
                            dp_group: dist.ProcessGroup) -> None:
    """Make the distributed-optimizer ``wrapper`` save and load in model space (`torch_dist`)
    and refuse its Adam formats."""
    checkpoint = ModelSpaceCheckpoint(inner, dp_group)
    internals.replace_checkpoint_methods(wrapper, checkpoint.sharded_state_dict,
                                         checkpoint.load_state_dict, refuse)
