"""FSDP2 on CPU (gloo) in Lightning (ModelParallelStrategy) and Accelerate with DistributedMuon:
docs/trainers.md's recipes, run as written. Both save the optimizer through torch DCP."""

from __future__ import annotations

import shutil

import pytest
import torch
from recipes import HARD_EXIT, launch, write_recipe

pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_lightning_fsdp2_resumes_bit_for_bit(tmp_path):
    """2 epochs straight against a resume from the first epoch's sharded checkpoint: equal
    weights and optimizer state (Muon momenta, AdamW moments of embedding and head)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    write_recipe(tmp_path, "lightning_fsdp2.py")
    launch(tmp_path, "lightning_fsdp2.py", nproc=None)
    final = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    shutil.move(final, tmp_path / "straight")
    launch(tmp_path, "lightning_fsdp2.py", "--resume", nproc=None)
    loaded = {}
    for name, folder in (("straight", tmp_path / "straight"), ("resumed", final),
                         ("first", tmp_path / "ckpt" / "epoch=0-step=3.ckpt")):
        dcp_to_torch_save(folder, tmp_path / f"{name}.pt")  # the sharded folder, whole
        loaded[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    a, b = loaded["straight"]["state_dict"], loaded["resumed"]["state_dict"]
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(loaded["first"]["state_dict"][n], a[n]) for n in a)
    sa = _flat(loaded["straight"]["optimizer_0"]["state"])
    sb = _flat(loaded["resumed"]["optimizer_0"]["state"])
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert "model.model.layers.0.mlp.up_proj.weight.momentum_buffer" in sa
    assert "model.lm_head.weight.exp_avg" in sa and "model.model.embed_tokens.weight.exp_avg" in sa
    assert not any(k.startswith("model.lm_head.weight.momentum") for k in sa)


# Accelerate shards only on accelerators; on CPU its FSDP plugin is dropped silently, so the
# test switches its distributed type to FSDP after construction (what it would be on GPUs).
_FORCE_FSDP = '''accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState._shared_state["distributed_type"] = DistributedType.FSDP
accelerator.state.distributed_type = DistributedType.FSDP
accelerator.state.fsdp_plugin = plugin
'''
_PREPARE = "model, opt = accelerator.prepare(model, opt)  # shards the model; opt gets the shards\n"
_CHECK_SHARDED = _PREPARE + '''from torch.distributed.tensor import DTensor
assert all(isinstance(p, DTensor) for p in model.parameters()), "not FSDP2"
'''
_CHECK_OPTIMIZER = '''    opt.zero_grad()
    assert all(isinstance(p, DTensor) for p in opt.optimizer.muon_params), "old parameters"
'''


def _losses(output: str) -> dict[int, str]:
    lines = [line.split() for line in output.splitlines() if line.startswith("step ")]
    return {int(words[1]): words[3] for words in lines}


def test_accelerate_fsdp2_resumes_exactly(tmp_path):
    """docs/trainers.md's Accelerate recipe (optimizer built before `prepare`) with FSDP forced
    on CPU: the optimizer trains the shards, and `load_state` of the step-3 `save_state`
    repeats steps 4-6 exactly."""
    write_recipe(tmp_path, "accelerate_fsdp2.py", {
        "accelerator = Accelerator(fsdp_plugin=plugin)\n": _FORCE_FSDP,
        _PREPARE: _CHECK_SHARDED,
        "    opt.zero_grad()\n": _CHECK_OPTIMIZER}, append=HARD_EXIT)  # gloo teardown abort
    straight = _losses(launch(tmp_path, "accelerate_fsdp2.py").stdout)
    resumed = _losses(launch(tmp_path, "accelerate_fsdp2.py", "--resume").stdout)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(resumed) == [4, 5, 6]
    assert len(set(straight.values())) == 6  # the weights move
    for step in (4, 5, 6):
        assert resumed[step] == straight[step], (straight, resumed)
