"""Lightning's ModelParallelStrategy (FSDP2 on CPU, gloo) with DistributedMuon: docs/trainers.md's
recipe, run as written. The optimizer is saved through torch DCP (`get_optimizer_state_dict`)."""

from __future__ import annotations

import shutil

import pytest
import torch
from recipes import launch, write_recipe

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
