"""Hugging Face Trainer with DistributedMuon: docs/trainers.md's recipes run as written (CPU,
gloo, torchrun), the `muon_optimizer` factory's parameter split, and the DeepSpeed JSON names
that HF's ``"auto"`` fills."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from recipes import HARD_EXIT, launch, recipe, write_recipe

transformers = pytest.importorskip("transformers")
from distributed_muon.integrations.transformers import muon_optimizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from distributed_muon import DistributedMuon  # noqa: E402
from distributed_muon.params import default_use_muon  # noqa: E402

pytestmark = pytest.mark.timeout(600)
HEAD_AND_EMBEDDING = {"model.embed_tokens.weight", "lm_head.weight"}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _losses(state_file) -> list[float]:
    history = json.loads(state_file.read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def _muon_names(opt: DistributedMuon, model: torch.nn.Module) -> set[str]:
    """Names of the parameters the optimizer orthogonalizes, by the groups it was given (a
    group without ``use_muon`` follows the core's rule, by name where it has names)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = set()
    for group in opt.param_groups:
        names = group.get("param_names") or [None] * len(group["params"])
        for p, name in zip(group["params"], names):
            use = group["use_muon"]
            if use is None:
                use = default_use_muon(p.shape, name)
            if use:
                out.add(name_of[id(p)])
    return out


# ------------------------------------------------------------------ DeepSpeed JSON recipe


@pytest.mark.usefixtures("deepspeed_comm_op")
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_deepspeed_resumes_bit_for_bit(stage, tmp_path):
    """docs/trainers.md's Trainer + DeepSpeed recipe: 6 steps straight (checkpoints at 3 and 6)
    against a resume from step 3: the same losses and final weights, bit for bit; and the
    optimizer DeepSpeed built from ``"auto"`` is DistributedMuon with HF's Adam values in the
    AdamW slots and Newton-Schulz's eps untouched."""
    config = f"ds_zero{stage}.json"
    write_recipe(tmp_path, "hf_deepspeed.py", append=HARD_EXIT)
    write_recipe(tmp_path, config)
    launch(tmp_path, "hf_deepspeed.py", config)
    out = tmp_path / "out"
    shutil.move(out / "checkpoint-6", tmp_path / "straight")
    launch(tmp_path, "hf_deepspeed.py", config, "--resume")
    straight, resumed = tmp_path / "straight", out / "checkpoint-6"

    losses = _losses(straight / "trainer_state.json")
    assert len(losses) == 6
    assert _losses(resumed / "trainer_state.json") == losses
    before, a, b = (load_file(d / "model.safetensors")
                    for d in (out / "checkpoint-3", straight, resumed))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(before[n], a[n]) for n in a)  # steps 4-6 moved the weights

    saved = torch.load(straight / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)
    assert saved["ds_config"]["optimizer"]["params"] == {
        "lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8}
    inner = saved["optimizer_state_dict"]
    inner = inner.get("base_optimizer_state", inner.get("optimizer_state_dict"))
    assert "dmuon_fragments" in inner  # DistributedMuon's state dict, not AdamW's
    for group in inner["param_groups"]:
        assert group["adamw_eps"] == 1e-8 and list(group["adamw_betas"]) == [0.9, 0.999]
        assert group["eps"] == 1e-7  # Newton-Schulz's, not adam_epsilon


def test_hf_auto_values_fill_the_adamw_options():
    """HF's ``"auto"`` fill (its own code) then our JSON names: eps/betas reach AdamW."""
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from distributed_muon import muon_param_groups

    hf = HfTrainerDeepSpeedConfig(json.loads(recipe("ds_zero2.json")))
    hf.trainer_config_process(TrainingArguments(
        output_dir="unused", learning_rate=0.01, weight_decay=0.05, adam_beta1=0.8,
        adam_beta2=0.99, adam_epsilon=1e-6, use_cpu=True, report_to="none"))
    params = hf.config["optimizer"]["params"]
    assert params == {"lr": 0.01, "weight_decay": 0.05, "betas": [0.8, 0.99], "eps": 1e-6}
    model = _tiny_llama()
    opt = DeepSpeedMuon(muon_param_groups(model), **params)
    for group in opt.param_groups:
        assert (group["lr"], group["weight_decay"]) == (0.01, 0.05)
        assert (tuple(group["adamw_betas"]), group["adamw_eps"]) == ((0.8, 0.99), 1e-6)
        assert group["eps"] == 1e-7
    ns = DeepSpeedMuon(muon_param_groups(model), eps=1e-6, ns_eps=1e-5)
    assert {(g["adamw_eps"], g["eps"]) for g in ns.param_groups} == {(1e-6, 1e-5)}
    for both in ({"eps": 1e-8, "adamw_eps": 1e-8}, {"betas": [0.9, 0.95],
                                                     "adamw_betas": [0.9, 0.95]}):
        with pytest.raises(ValueError, match="one option under two names"):
            DeepSpeedMuon(muon_param_groups(model), **both)


# ------------------------------------------------------------------ the factory and DDP


def test_trainer_ddp_equals_one_process(tmp_path):
    """docs/trainers.md's Trainer + DDP recipe on 2 ranks (batch 4 each) equals one process
    with batch 8, within fp32 tolerance (the standard Newton-Schulz and the exchange in fp32 for
    the test: Gram amplifies the gradients' fp32 rounding differences past the tolerance)."""
    fp32 = {'MUON = {"lr": 3e-3, "weight_decay": 0.1}':
            'MUON = {"lr": 3e-3, "weight_decay": 0.1, "ns_dtype": "fp32", "comm_dtype": "fp32",'
            ' "ns_method": "standard"}'}
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    write_recipe(two, "hf_ddp.py", fp32, append=HARD_EXIT)  # gloo teardown abort
    write_recipe(one, "hf_ddp.py", {**fp32, "per_device_train_batch_size=4":
                                    "per_device_train_batch_size=8"}, append=HARD_EXIT)
    launch(two, "hf_ddp.py", nproc=2)
    launch(one, "hf_ddp.py", nproc=1)
    a, b = load_file(two / "out" / "model.safetensors"), load_file(one / "out" /
                                                                  "model.safetensors")
    init = _recipe_init_weights()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in ("model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(a[name], init[name]), name  # trained


def _recipe_init_weights() -> dict[str, torch.Tensor]:
    """The recipe's model at initialization (its config and seed)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_factory_puts_embedding_and_head_in_adamw(tmp_path):
    """Through the Trainer's own ``create_optimizer``: the factory orthogonalizes every hidden
    matrix and neither ``embed_tokens`` nor ``lm_head``; the bare class, given the Trainer's
    unnamed groups, orthogonalizes both (the defect the factory exists for)."""
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = _tiny_llama()
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2}
    hidden = matrices - HEAD_AND_EMBEDDING

    trainer = Trainer(model=model, args=args,
                      optimizer_cls_and_kwargs=(muon_optimizer, {"lr": 0.02,
                                                                 "weight_decay": 0.1}))
    opt = trainer.create_optimizer()
    assert isinstance(opt, DistributedMuon)
    assert _muon_names(opt, model) == hidden
    named = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(named) == sorted(n for n, _ in model.named_parameters())
    decay = {n: (g["weight_decay"], g["adamw_weight_decay"]) for g in opt.param_groups
             for n in g["param_names"]}
    assert decay["model.norm.weight"] == (0.0, 0.0)  # no decay for vectors, as HF's AdamW
    assert decay["lm_head.weight"][0] == 0.1 and decay["lm_head.weight"][1] in (None, 0.1)

    bare = Trainer(model=model, args=args,
                   optimizer_cls_and_kwargs=(DistributedMuon, {"lr": 0.02}))
    try:
        bare_opt = bare.create_optimizer()
    except ValueError:
        return  # a core that refuses unnamed matrices is also safe
    assert HEAD_AND_EMBEDDING <= _muon_names(bare_opt, model)


def test_factory_steps_and_older_trainer_form():
    """The factory's optimizer trains (one step moves every parameter); the older
    ``optimizer_cls(groups, **kwargs)`` form keeps the Trainer's decay split and names the
    groups from ``model=``; bad input is refused in one line."""
    model = _tiny_llama()
    opt = muon_optimizer(model, lr=0.02, ns_dtype="fp32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())

    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    old = muon_optimizer(groups, model=model, lr=0.02)
    hidden = {n for n, p in model.named_parameters() if p.ndim == 2} - HEAD_AND_EMBEDDING
    assert _muon_names(old, model) == hidden
    for group in old.param_groups:
        wanted = 0.0 if any("norm" in n for n in group["param_names"]) else 0.1
        assert group["weight_decay"] == wanted

    with pytest.raises(ValueError, match="add \"model\": model"):
        muon_optimizer(groups, lr=0.02)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        muon_optimizer([torch.nn.Parameter(torch.ones(3, 3))], model=model)
    with pytest.raises(ValueError, match="two different models"):
        muon_optimizer(model, model=_tiny_llama())
    with pytest.raises(ValueError, match="needs the model"):
        muon_optimizer(lr=0.02)
    assert muon_optimizer() is muon_optimizer  # the Trainer's factory() call


def test_factory_refuses_deepspeed(monkeypatch):
    """Under HF's DeepSpeed integration the factory would get flat partitions: refused,
    naming the JSON type and the import line."""
    from transformers.integrations import deepspeed as hf_deepspeed

    monkeypatch.setattr(hf_deepspeed, "deepspeed_config", lambda: {"zero_optimization": {}})
    with pytest.raises(ValueError, match="distributed_muon.integrations.deepspeed"):
        muon_optimizer(_tiny_llama(), lr=0.02)


def test_torchtitan_factory_names_groups():
    """The groups torchtitan's ``OptimizersContainer`` builds (names, ``fused``/``foreach``)
    make a DistributedMuon with embeddings and head on AdamW; unnamed groups are refused."""
    from distributed_muon.integrations.torchtitan import distributed_muon_factory

    model = _tiny_llama()
    names, params = zip(*model.named_parameters())
    groups = [{"params": list(params), "param_names": list(names), "fused": True,
               "foreach": False, "lr": 0.02, "weight_decay": 0.1}]
    opt = distributed_muon_factory(groups, comm_dtype="fp32")
    hidden = {n for n, p in model.named_parameters() if p.ndim == 2} - HEAD_AND_EMBEDDING
    assert _muon_names(opt, model) == hidden
    assert "fused" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="no param_names"):
        distributed_muon_factory([{"params": list(params), "lr": 0.02}])
