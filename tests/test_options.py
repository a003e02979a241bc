"""Every surface that sets optimizer options lists them as `distributed_muon.options.OPTIONS`
does: the same names, the table's defaults (or its own, with the reason recorded), the table's
help and choices; and the table's checks are the ones that run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from distributed_muon.launch.bench import BenchConfig
from distributed_muon.launch.train_config import RECIPE_FIELDS, TrainConfig

from distributed_muon.options import GROUP_OPTIONS, OPTIONS, check_group, group_defaults


@pytest.mark.parametrize("config", [BenchConfig, TrainConfig])
def test_launch_flags_follow_the_table(config):
    declared = 0
    for f in dataclasses.fields(config):
        name = f.metadata.get("option")
        if name is None:
            # A field named like an option must be declared as one (or be the recipe's).
            assert f.name not in OPTIONS or f.name in RECIPE_FIELDS, f.name
            continue
        declared += 1
        spec = OPTIONS[name]
        assert f.default == spec.default or f.metadata["why"], f.name
        assert f.metadata["help"].startswith(spec.help), f.name
        assert f.metadata["choices"] == spec.choices, f.name
    assert declared >= 4


def test_a_surface_default_needs_its_reason():
    from distributed_muon.launch.flags import optimizer_option

    with pytest.raises(ValueError, match="needs its reason"):
        optimizer_option("ns_method", default="standard")
    assert optimizer_option("ns_method").default == OPTIONS["ns_method"].default


def test_launch_flags_are_checked_by_the_table():
    with pytest.raises(ValueError, match="--exchange-chunks 0: must be an integer >= 1"):
        BenchConfig(exchange_chunks=0, device="cpu").resolved()
    with pytest.raises(ValueError, match="--plan best: use one of"):
        BenchConfig(plan="best", device="cpu").resolved()


def test_group_checks_normalize_and_name_the_option():
    group = group_defaults(ns_dtype=torch.float32, adamw_betas=[0.9, 0.99])
    check_group(group)
    assert group["ns_dtype"] == "fp32" and group["adamw_betas"] == (0.9, 0.99)
    for bad, message in (({"momentum": 1.5}, "momentum=1.5 is not valid"),
                         ({"ns_steps": 0}, "ns_steps=0 is not valid"),
                         ({"ns_method": "exact"}, "ns_method='exact' is not valid"),
                         ({"nesterov": 1}, "nesterov=1 is not valid"),
                         ({"use_muon": "yes"}, "use_muon='yes' is not valid")):
        with pytest.raises(ValueError, match=message):
            check_group(group_defaults(**bad))
    with pytest.raises(ValueError, match="optimizer-wide"):
        check_group({**GROUP_OPTIONS, "comm_dtype": "bf16"})
