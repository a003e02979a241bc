"""Every surface that sets optimizer options lists them as `distributed_muon.options.OPTIONS`
does: the same names, the table's defaults (or its own, with the reason recorded), the table's
help and choices; and the table's checks are the ones that run."""

from __future__ import annotations

import dataclasses
import inspect

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
    with pytest.raises(ValueError, match="--owner-strategy best: use one of"):
        BenchConfig(owner_strategy="best", device="cpu").resolved()


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


def test_deepspeed_json_takes_every_option_a_json_can_hold():
    ds = pytest.importorskip("distributed_muon.integrations.deepspeed")
    from distributed_muon.options import OPTIMIZER_WIDE

    keywords = inspect.signature(ds.DeepSpeedMuon.__init__).parameters
    wide = [n for n in keywords if n not in ("self", "params", "options")]
    assert set(wide) == set(ds._OPTIMIZER_WIDE)
    option_of = {json: option for option, json in ds.JSON_WIDE_NAMES.items()}
    for name in wide:
        assert keywords[name].default == OPTIONS[option_of.get(name, name)].default, name
    in_json = {option_of.get(n, n) for n in ds._OPTIMIZER_WIDE}
    assert in_json | set(ds.NOT_IN_JSON) == {*OPTIMIZER_WIDE, "per_head"}
    assert set(ds.JSON_NAMES.values()) <= set(GROUP_OPTIONS)


def test_distributed_muon_keywords_are_the_table():
    from distributed_muon import DistributedMuon
    from distributed_muon.options import GROUP_ONLY, OPTIMIZER_WIDE

    keywords = inspect.signature(DistributedMuon.__init__).parameters
    options = {n: p.default for n, p in keywords.items() if n not in ("self", "params", "unknown")}
    assert set(options) == (set(GROUP_OPTIONS) - set(GROUP_ONLY)) | set(OPTIMIZER_WIDE)
    assert options == {n: OPTIONS[n].default for n in options}
    assert DistributedMuon([torch.zeros(4, 4)]).defaults == GROUP_OPTIONS


def test_megatron_flags_are_options_with_their_reasons():
    mo = pytest.importorskip("distributed_muon.integrations.megatron_optimizer")

    for flag, (kind, default, text) in mo.FLAGS.items():
        if flag == "adamw":  # Megatron's own: which parameters get Muon
            continue
        spec = OPTIONS[mo.FLAG_OPTIONS[flag]]
        assert kind is spec.flag_type and text.startswith(spec.help), flag
        if flag in mo.FLAG_DEFAULTS:
            assert mo.FLAG_DEFAULTS[flag] == (default, text.split("; default: ")[1]), flag
        else:
            assert default == spec.default, flag


def test_per_head_reaches_every_training_surface():
    """The ``groups``-scope option (how param groups are built) is a key or flag of every
    surface that builds groups: the DeepSpeed JSON, ``dmuon train`` (every backend) and
    Megatron's ``--dmuon-per-head``."""
    from distributed_muon.launch.backends import BACKENDS

    grouping = [n for n, o in OPTIONS.items() if o.scope == "groups"]
    assert grouping == ["per_head"]
    train = {f.metadata.get("option") for f in dataclasses.fields(TrainConfig)}
    assert "per_head" in train
    assert all(BACKENDS[name].supports_per_head for name in BACKENDS)
    ds = pytest.importorskip("distributed_muon.integrations.deepspeed")
    assert ds.JSON_WIDE_NAMES["per_head"] == "per_head_muon"
    mo = pytest.importorskip("distributed_muon.integrations.megatron_optimizer")
    assert mo.FLAG_OPTIONS["per_head"] == "per_head"


def test_a_renamed_option_keeps_working_under_its_former_name_on_every_surface(capsys):
    """``plan`` (now ``owner_strategy``) on each surface: it still sets the option, with a
    warning (a line on stderr for flags) that names the new name and the release that drops
    the old one; both names at once is an error."""
    import argparse

    from distributed_muon.launch.flags import add_flags, from_args

    from distributed_muon import DistributedMuon, muon_param_groups
    from distributed_muon.options import RENAMED_OPTIONS

    assert RENAMED_OPTIONS["plan"] == ("owner_strategy", "0.2.0")
    w = torch.nn.Parameter(torch.randn(8, 4))
    with pytest.warns(DeprecationWarning, match="plan is deprecated .* 0.2.0: use owner_str"):
        assert DistributedMuon([w], plan="round_robin")._owner_strategy == "round_robin"
    with pytest.raises(TypeError, match="pass owner_strategy only"):
        DistributedMuon([w], plan="lpt", owner_strategy="round_robin")

    parser = argparse.ArgumentParser(prog="dmuon bench")
    add_flags(parser, BenchConfig)
    assert from_args(BenchConfig, parser.parse_args(["--plan", "round_robin"])) \
        .owner_strategy == "round_robin"
    assert "--plan is deprecated and goes away in 0.2.0: use --owner-strategy" in \
        capsys.readouterr().err
    assert from_args(BenchConfig, parser.parse_args(["--owner-strategy", "round_robin"])) \
        .owner_strategy == "round_robin"
    assert capsys.readouterr().err == ""

    ds = pytest.importorskip("distributed_muon.integrations.deepspeed")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with pytest.warns(FutureWarning, match="DeepSpeed JSON: plan is deprecated"):
        opt = ds.DeepSpeedMuon(muon_param_groups(model), plan="round_robin")
    assert opt.owner_strategy == "round_robin"
    with pytest.raises(TypeError, match="pass owner_strategy only"):
        ds.DeepSpeedMuon(muon_param_groups(model), plan="lpt", owner_strategy="round_robin")

    mo = pytest.importorskip("distributed_muon.integrations.megatron_optimizer")
    from megatron.core.optimizer import OptimizerConfig

    parser = argparse.ArgumentParser(prog="pretrain_gpt.py")
    mo.add_dmuon_arguments(parser)
    assert parser.parse_args(["--dmuon-plan", "round_robin"]).dmuon_owner_strategy \
        == "round_robin"
    assert "--dmuon-plan is deprecated and goes away in 0.2.0: use --dmuon-owner-strategy" in \
        capsys.readouterr().err
    config = OptimizerConfig(optimizer="dmuon", lr=1e-3)
    config.dmuon_plan = "round_robin"
    with pytest.warns(FutureWarning, match="config.dmuon_plan: plan is deprecated"):
        assert mo.dmuon_options(config)["owner_strategy"] == "round_robin"
