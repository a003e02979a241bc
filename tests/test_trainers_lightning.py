"""Lightning with DistributedMuon: docs/trainers.md's DDP recipe, run as written (Lightning
starts the second CPU rank itself)."""

from __future__ import annotations

import shutil

import pytest
import torch
from recipes import launch, write_recipe

pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_lightning_ddp_resumes_bit_for_bit(tmp_path):
    """2 epochs straight (checkpoints at each epoch's end) against a resume from the first:
    the same weights and DistributedMuon state bit for bit; the embedding and head are in an
    AdamW group (state ``exp_avg``), the hidden matrices in Muon's (``momentum_buffer``)."""
    write_recipe(tmp_path, "lightning_ddp.py")
    launch(tmp_path, "lightning_ddp.py", nproc=None)
    final = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    shutil.move(final, tmp_path / "straight.ckpt")
    launch(tmp_path, "lightning_ddp.py", "--resume", nproc=None)
    straight, resumed = _load(tmp_path / "straight.ckpt"), _load(final)
    first = _load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")

    a, b = straight["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(first["state_dict"][n], a[n]) for n in a)  # epoch 2 trained

    (opt_a,), (opt_b,) = straight["optimizer_states"], resumed["optimizer_states"]
    for key in opt_a["state"]:
        for field, value in opt_a["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(
                opt_b["state"][key][field])), (key, field)
    by_name = {}
    for group in opt_a["param_groups"]:
        for index, name in zip(group["params"], group["param_names"]):
            by_name[name] = (group["use_muon"], set(opt_a["state"][index]))
    assert by_name["model.model.embed_tokens.weight"][0] is False
    assert by_name["model.lm_head.weight"][0] is False
    assert "exp_avg" in by_name["model.lm_head.weight"][1]
    assert by_name["model.model.layers.0.mlp.up_proj.weight"] == (True, {"momentum_buffer"})
