"""`--optimizer dmuon` registration and flag mapping, with the real megatron-core of this machine.

Megatron's wrappers (fp32 main params, the distributed optimizer) need CUDA: their end-to-end
runs are in tests/test_gpu.py. The distributed optimizer's flat shards are tested on CPU in
tests/test_megatron.py (`test_distributed_optimizer_flat_shards_inside_tp_blocks`).
"""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("megatron.core")

from distributed_muon.integrations import megatron_optimizer as mo  # noqa: E402
from distributed_muon.integrations.megatron_parity import MEGATRON_COEFFICIENTS  # noqa: E402
from megatron.core import optimizer as core_optimizer  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402

from distributed_muon import DistributedMuon  # noqa: E402


def test_import_patches_get_megatron_optimizer_once():
    patched = core_optimizer.get_megatron_optimizer
    assert getattr(patched, "dmuon", False)
    mo.register()  # idempotent: no wrapper around the wrapper
    assert core_optimizer.get_megatron_optimizer is patched
    assert not getattr(patched.__wrapped__, "dmuon", False)


def test_a_get_megatron_optimizer_bound_before_the_import_builds_dmuon(monkeypatch):
    # megatron-core >= 0.19 sends dmuon to its emerging-optimizer builder; 0.16 has none.
    if not hasattr(core_optimizer, "_get_megatron_emerging_optimizer"):
        pytest.skip("megatron-core < 0.19: no emerging-optimizer builder to route from")
    seen = []
    monkeypatch.setattr(mo, "get_dmuon_optimizer",
                        lambda config, chunks, **kw: seen.append((config, chunks, kw)) or "built")
    early = core_optimizer.get_megatron_optimizer.__wrapped__  # as `from ... import` saw it
    config = OptimizerConfig(optimizer="dmuon", lr=1e-3)
    chunks = [torch.nn.Linear(2, 2)]
    assert early(config, chunks) == "built"
    assert seen[0][0] is config and seen[0][1] is chunks
    with pytest.raises((ValueError, ImportError)):  # Megatron's own refusal, untouched
        early(OptimizerConfig(optimizer="no_such", lr=1e-3), chunks)


def test_other_optimizers_reach_megatron_untouched():
    seen = []
    wrapper = mo._patched_get_optimizer(lambda config, chunks, *a, **k: seen.append(config))
    config = OptimizerConfig(optimizer="adam", lr=1e-3)
    wrapper(config, [])
    assert seen == [config]


def test_megatron_defaults_map_to_the_same_update():
    opts = mo.dmuon_options(OptimizerConfig(optimizer="dmuon", lr=2e-3, weight_decay=0.1))
    # Megatron's default scale mode "spectral" is sqrt(max(m, n)) = 5 x Moonlight's.
    assert (opts["scale"], opts["scale_factor"]) == ("match_rms_adamw", 5.0)
    # Megatron's default "quintic" is five tuned polynomials, one per step (not Jordan's).
    assert opts["ns_schedule"] == MEGATRON_COEFFICIENTS["quintic"] and opts["ns_steps"] == 5
    assert opts["lr"] == 2e-3 and opts["weight_decay"] == 0.1
    assert opts["split_qkv"] is True and opts["ns_dtype"] == "bf16"  # fp32_matmul_prec medium
    assert (opts["ns_method"], opts["comm_dtype"], opts["owner_strategy"]) == (
        "standard", "bf16", "lpt")
    assert opts["per_head"] is False


@pytest.mark.parametrize("mode, factor, want", [
    ("spectral", 0.2, ("match_rms_adamw", 1.0)),
    ("shape_scaling", 1.0, ("original", 1.0)),
    ("unit_rms_norm", 2.0, ("spectral", 2.0)),
])
def test_scale_modes(mode, factor, want):
    config = OptimizerConfig(optimizer="dmuon", muon_scale_mode=mode,
                             muon_extra_scale_factor=factor)
    opts = mo.dmuon_options(config)
    assert (opts["scale"], pytest.approx(opts["scale_factor"])) == want


def test_dmuon_flags_override():
    config = OptimizerConfig(optimizer="dmuon")
    config.dmuon_scale, config.dmuon_ns_method = "original", "gram"
    config.dmuon_ns_dtype = "fp16"
    opts = mo.dmuon_options(config)
    assert (opts["scale"], opts["scale_factor"], opts["ns_method"]) == ("original", 1.0, "gram")
    assert DistributedMuon([torch.zeros(4, 8)], ns_dtype=opts["ns_dtype"]).param_groups[0][
        "ns_dtype"] == "fp16"


@pytest.mark.parametrize("field, value, words", [
    ("fp16", True, "use --bf16"),
    ("optimizer_cpu_offload", True, "--optimizer-cpu-offload"),
    ("muon_coefficient_type", "custom", "--muon-coefficient-type custom"),
    ("decoupled_weight_decay", False, "decoupled_weight_decay=False"),
    ("muon_scalar_optimizer", "lion", "--muon-scalar-optimizer lion"),
])
def test_unsupported_settings_fail_before_building(field, value, words):
    config = OptimizerConfig(optimizer="dmuon")
    setattr(config, field, value)  # muon_coefficient_type is not a field of 0.16's config
    with pytest.raises(ValueError, match=words):
        mo.check_supported(config)
        mo.dmuon_options(config)


def test_argument_parser_gets_dmuon_and_its_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "muon"])
    mo.add_dmuon_arguments(parser)
    args = parser.parse_args(["--optimizer", "dmuon", "--dmuon-ns-method", "gram"])
    assert (args.optimizer, args.dmuon_ns_method, args.dmuon_owner_strategy) == (
        "dmuon", "gram", "lpt")
    assert args.dmuon_per_head is False
    assert parser.parse_args(["--dmuon-owner-strategy", "round_robin"]).dmuon_owner_strategy \
        == "round_robin"
    assert parser.parse_args(["--dmuon-per-head"]).dmuon_per_head is True  # a switch
    assert not any(a.dest.startswith("dist_") for a in parser._actions)


def test_whole_3d_parameter_is_described_in_the_cores_view(tmp_path):
    """A plain module's 3-D expert tensor (no TP, no EP) under MegatronSharding, e.g. a model
    wrapped in Megatron's DDP: the same update as without the adapter."""
    import torch
    import torch.distributed as dist
    from distributed_muon.integrations.megatron import MegatronSharding

    from distributed_muon import DistributedMuon

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        module = torch.nn.Module()
        module.experts = torch.nn.Parameter(torch.randn(4, 6, 5))
        start = module.experts.detach().clone()
        plain = torch.nn.Parameter(start.clone())
        grad = torch.randn(4, 6, 5)
        group = dist.group.WORLD
        opts = dict(lr=0.1, ns_dtype="fp32", ns_method="standard", comm_dtype="fp32")
        a = DistributedMuon([module.experts], sharding=MegatronSharding(
            module, group=group, tp_group=group), **opts)
        b = DistributedMuon([plain], **opts)
        module.experts.grad, plain.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
        assert torch.allclose(module.experts, plain, atol=1e-6)
        assert (plain - start).abs().max() > 1e-3  # it moved
    finally:
        dist.destroy_process_group()
