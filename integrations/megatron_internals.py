"""Everything the Megatron adapter reads of Megatron's private structures or patches, in one module.

``--optimizer dmuon`` plugs into Megatron where it has no public hook: its own optimizer
builder, param groups, distributed-optimizer shard map and argument parser. Those are private
and change between releases (``SUPPORTED`` in `megatron.py` pins the tested range); this
module is the only one that touches them, so a Megatron upgrade is checked against this file
alone. Every function says why it must, and the megatron-core releases it was checked
against: 0.16.1 (CPU tests) and 0.19.2 (CPU and GPU tests, Megatron-LM's
``pretrain_gpt.py``; docs/megatron.md).

- building: `param_groups`, `optimizer_instances`, `distributed_wrapper`, `local_wrapper`,
  `main_shards`;
- checkpoints: `replace_checkpoint_methods`;
- registration: `route_dmuon`, `patch_get_megatron_optimizer`, `patch_emerging_optimizer`,
  `patch_arguments`, `patch_validate_args`, `training_args`, `add_optimizer_choice`.

A patched function carries ``dmuon = True``, so patching again is a no-op.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

Span = tuple[int, int]

# ---------------------------------------------------------------------------- building


def param_groups(model_chunks: list[nn.Module], config: Any,
                 config_overrides: dict | None) -> list[dict[str, Any]]:
    """Megatron's param groups (``wd_mult``, ``max_lr``, ``is_expert_parallel``, ...), as
    Adam gets them. Why private: only ``_get_param_groups`` makes them, and the scheduler
    drives the fields it sets. Checked: 0.16.1, 0.19.2."""
    from megatron.core.optimizer import _get_param_groups, get_standard_config_overrides

    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config)
    return _get_param_groups(model_chunks, config, config_overrides)


def optimizer_instances(model_chunks: list[nn.Module]) -> int:
    """``--num-distributed-optimizer-instances``, which only the model's DDP config holds
    (``get_megatron_optimizer`` reads it there too). Checked: 0.16.1, 0.19.2."""
    return getattr(model_chunks[0].ddp_config, "num_distributed_optimizer_instances", 1)


def distributed_wrapper(inner: Optimizer, config: Any, model_chunks: list[nn.Module],
                        expert: bool, init_state: Callable) -> tuple[Any, dist.ProcessGroup]:
    """Megatron's ``DistributedOptimizer`` around ``inner`` for the dense or expert params,
    and the data-parallel group it shards over. Why private: ``get_megatron_optimizer`` builds
    it only around Megatron's own inner optimizers, so its constructor (the DDP's grad buffers,
    the group index) is called here as that builder calls it, with one instance.
    Checked: 0.16.1 (source), 0.19.2 (GPU tests)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    dp = (ps.get_expert_data_parallel_group() if expert
          else ps.get_data_parallel_group(with_context_parallel=True))
    buffers = {i: getattr(chunk, "expert_parallel_buffers" if expert else "buffers")
               for i, chunk in enumerate(model_chunks)}
    wrapper = DistributedOptimizer(
        inner, config, None, init_state, model_chunks=model_chunks,
        per_model_buffers=buffers, data_parallel_group=dp, data_parallel_group_gloo=None,
        data_parallel_group_idx=dist.get_rank(ps.get_model_parallel_group()),
        distributed_optimizer_instance_id=0)
    _set_groups(wrapper, dp)
    return wrapper, dp


def local_wrapper(inner: Optimizer, config: Any, expert: bool, init_state: Callable) -> Any:
    """Megatron's ``Float16OptimizerWithFloat16Params`` (bf16) or ``FP32Optimizer`` around
    ``inner``, as ``get_megatron_optimizer`` builds them (their constructors differ by one
    argument). Checked: 0.16.1 (source), 0.19.2 (GPU tests)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    if config.bf16:
        wrapper = Float16OptimizerWithFloat16Params(inner, config, None, init_state)
    else:
        wrapper = FP32Optimizer(inner, config, init_state)
    stats = (ps.get_expert_tensor_model_pipeline_parallel_group() if expert
             else ps.get_model_parallel_group())
    _set_groups(wrapper, stats)
    return wrapper


def _set_groups(wrapper: Any, stats: dist.ProcessGroup) -> None:
    """The groups of the logged grad norm and the TP group, which ``get_megatron_optimizer``
    sets on each wrapper after building it (its constructors take neither)."""
    from megatron.core import parallel_state as ps

    wrapper.grad_stats_parallel_group = stats
    wrapper.tp_group = ps.get_tensor_model_parallel_group()


def main_shards(wrapper: Any) -> dict[int, tuple[torch.Tensor, Span]]:
    """``{id(model param): (main shard, (start, stop))}``: each model param's fp32 main shard
    on this rank under the distributed optimizer and its flat range in the param's local
    storage. Why private: the wrapper keeps the map from its main shards to the model params
    only in its group lists and ``_get_model_param_range_map``.
    Checked: 0.16.1 (source), 0.19.2 (GPU tests)."""
    shards = {}
    for models, mains in ((wrapper.model_float16_groups, wrapper.shard_fp32_from_float16_groups),
                          (wrapper.model_fp32_groups, wrapper.shard_fp32_groups)):
        for mg, sg in zip(models, mains, strict=True):
            for model, main in zip(mg, sg, strict=True):
                span = wrapper._get_model_param_range_map(model)["param"]
                shards[id(model)] = (main, (span.start, span.end))
    return shards


# ---------------------------------------------------------------------------- checkpoints

# The distributed-optimizer wrapper's checkpoint methods that save or load Adam's state in
# its own flat layouts (`replace_checkpoint_methods` refuses them).
ADAM_FORMATS = ("state_dict", "save_parameter_state", "load_parameter_state")


def replace_checkpoint_methods(wrapper: Any, sharded_state_dict: Callable,
                               load_state_dict: Callable, refuse: Callable) -> None:
    """Replace the checkpoint methods of one distributed-optimizer wrapper instance. Why: its
    formats assume Adam's state on every parameter and it takes no state-format hook, so
    `megatron_checkpoint`'s model-space format goes in as instance methods (Megatron's
    ``save_checkpoint`` calls ``sharded_state_dict`` and ``load_state_dict``).
    Checked: 0.16.1 (source), 0.19.2 (GPU tests)."""
    wrapper.sharded_state_dict = sharded_state_dict
    wrapper.load_state_dict = load_state_dict
    for name in ADAM_FORMATS:
        setattr(wrapper, name, refuse)


# ---------------------------------------------------------------------------- registration


def route_dmuon(original: Callable, build: Callable[..., Any]) -> Callable:
    """``get_megatron_optimizer`` that calls ``build(config, model_chunks, **kwargs)`` for
    ``config.optimizer == "dmuon"`` and ``original`` otherwise. Why: Megatron has no
    optimizer registry; its builder is replaced where it is bound. Its positional arguments
    after ``model_chunks`` are named as 0.16.1 and 0.19.2 name them."""

    @functools.wraps(original)
    def get_megatron_optimizer(config: Any, model_chunks: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "optimizer", None) != "dmuon":
            return original(config, model_chunks, *args, **kwargs)
        names = ("config_overrides", "use_gloo_process_groups", "pg_collection")
        kwargs.update(zip(names, args, strict=False))
        return build(config, model_chunks, **kwargs)

    get_megatron_optimizer.dmuon = True
    return get_megatron_optimizer


def patch_get_megatron_optimizer(wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``get_megatron_optimizer`` by ``wrap(it)`` in ``megatron.core.optimizer`` and,
    when loaded, in ``megatron.training.training``, which binds its own name at import.
    Checked: 0.16.1, 0.19.2."""
    import megatron.core.optimizer as core_optimizer

    for module in (core_optimizer, sys.modules.get("megatron.training.training")):
        fn = getattr(module, "get_megatron_optimizer", None)
        if fn is not None and not getattr(fn, "dmuon", False):
            module.get_megatron_optimizer = wrap(fn)


def patch_emerging_optimizer() -> None:
    """megatron-core >= 0.19 sends every optimizer but adam/sgd to its private
    ``_get_megatron_emerging_optimizer``: route dmuon from there to the patched
    ``get_megatron_optimizer``, for a ``get_megatron_optimizer`` bound (``from ... import``)
    before the adapter patched it. Absent in 0.16.1 (nothing to do); checked: 0.19.2."""
    import megatron.core.optimizer as core_optimizer

    emerging = getattr(core_optimizer, "_get_megatron_emerging_optimizer", None)
    if emerging is None or getattr(emerging, "dmuon", False):
        return

    @functools.wraps(emerging)
    def build(*args: Any, **kwargs: Any) -> Any:
        config = kwargs["config"] if "config" in kwargs else args[0]
        if getattr(config, "optimizer", None) != "dmuon":
            return emerging(*args, **kwargs)
        names = ("config", "model_chunks", "config_overrides", "pg_collection")
        kwargs.update(zip(names, args, strict=False))
        return core_optimizer.get_megatron_optimizer(**kwargs)

    build.dmuon = True
    core_optimizer._get_megatron_emerging_optimizer = build


def patch_arguments(add_arguments: Callable[[Any], Any]) -> bool:
    """Make ``megatron.training.arguments.add_megatron_arguments`` also call
    ``add_arguments(parser)``. Why: Megatron's parser takes extra arguments only through
    ``extra_args_provider``, which the training script owns. False without
    ``megatron.training`` (megatron-core 0.16.1 ships none); checked: 0.19.2."""
    try:
        from megatron.training import arguments
    except ImportError:
        return False
    if not getattr(arguments.add_megatron_arguments, "dmuon", False):
        original = arguments.add_megatron_arguments

        def add_megatron_arguments(parser: Any) -> Any:
            return add_arguments(original(parser) or parser)

        add_megatron_arguments.dmuon = True
        arguments.add_megatron_arguments = add_megatron_arguments
    return True


def patch_validate_args() -> None:
    """Make ``megatron.training.arguments.validate_args`` treat dmuon as adam. Why: it turns
    ``--use-distributed-optimizer`` into its layer-wise optimizer for any optimizer but
    adam/sgd, and dmuon uses the flat distributed optimizer as adam does. Checked: 0.19.2 (call
    after `patch_arguments` returned True)."""
    from megatron.training import arguments

    original = arguments.validate_args
    if getattr(original, "dmuon", False):
        return

    @functools.wraps(original)
    def validate_args(args: Any, *rest: Any, **kwargs: Any) -> Any:
        if getattr(args, "optimizer", None) != "dmuon":
            return original(args, *rest, **kwargs)
        args.optimizer = "adam"
        try:
            return original(args, *rest, **kwargs)
        finally:
            args.optimizer = "dmuon"

    validate_args.dmuon = True
    arguments.validate_args = validate_args


def training_args() -> Any:
    """Megatron-LM's parsed arguments, or None when no training script parsed them. Why: the
    ``--dmuon-*`` flags reach ``get_megatron_optimizer`` only there (``OptimizerConfig`` is
    built from known fields); read through ``sys.modules`` so that nothing is imported.
    Checked: 0.19.2 (0.16.1 has no ``megatron.training``)."""
    module = sys.modules.get("megatron.training.global_vars")
    if module is None:
        return None
    try:
        return module.get_args()
    except AssertionError:  # Megatron's "args is not initialized"
        return None


def add_optimizer_choice(parser: Any, name: str) -> None:
    """Add ``name`` to the choices of the parser's ``--optimizer``. Why private: argparse
    offers no way to extend an argument's choices but its ``_actions``. Megatron's
    ``--optimizer`` checked: 0.19.2."""
    for action in parser._actions:
        if "--optimizer" in action.option_strings and action.choices is not None:
            if name not in action.choices:
                action.choices = [*action.choices, name]
