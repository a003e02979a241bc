"""docs/trainers.md's FSDP2 recipes for HF Trainer and Accelerate, as written, on GPUs.

On CPU Accelerate turns FSDP off, so these run only here: each recipe trains a tiny Llama 6
steps with a save at step 3 under ``torchrun`` (one rank per GPU, at most 2), then again
resumed from that save; the resumed losses of steps 4-6 must equal the first run's. Both
trainers build the optimizer before the model is sharded, so a copy of each recipe also
asserts that the model is FSDP2-sharded and that the optimizer steps the `DTensor` shards.
Skipped without CUDA; run with ``cd tests && python -m pytest test_gpu_trainers.py``.
"""

from __future__ import annotations

import pytest
import torch
from recipes import launch, write_recipe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = pytest.mark.timeout(900)

# Inserted into the recipes: what the test checks besides the losses.
_CHECK = """
from torch.distributed.tensor import DTensor

from distributed_muon import DistributedMuon


def check(model, opt):
    while not isinstance(opt, DistributedMuon):  # Accelerate wraps it
        opt = opt.optimizer
    assert all(isinstance(p, DTensor) for p in model.parameters()), "model is not FSDP2"
    assert all(isinstance(p, DTensor) for p in opt.muon_params), "optimizer kept old params"
    muon = {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]}
    assert muon and not any("embed" in n or "lm_head" in n for n in muon), muon
"""

_HF_CALLBACK = _CHECK + """
from transformers import TrainerCallback


class Check(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        check(model, optimizer)
"""

CHECKS = {
    "hf_fsdp2.py": {
        "resume = ": _HF_CALLBACK + "resume = ",
        "optimizer_cls_and_kwargs=(muon_optimizer,":
            "callbacks=[Check()], optimizer_cls_and_kwargs=(muon_optimizer,"},
    "accelerate_fsdp2.py": {
        "resume = ": _CHECK + "resume = ",
        "    opt.zero_grad()\n": "    opt.zero_grad()\n    check(model, opt)\n"},
}


def _losses(output: str) -> dict[int, str]:
    lines = [line.split() for line in output.splitlines() if line.startswith("step ")]
    return {int(words[1]): words[3] for words in lines}


@cuda
@pytest.mark.parametrize("recipe", sorted(CHECKS))
def test_fsdp2_recipe_resumes_exactly(tmp_path, recipe):
    write_recipe(tmp_path, recipe, CHECKS[recipe])
    nproc = min(torch.cuda.device_count(), 2)
    straight = _losses(launch(tmp_path, recipe, nproc=nproc, timeout=400).stdout)
    resumed = _losses(launch(tmp_path, recipe, "--resume", nproc=nproc, timeout=400).stdout)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6], straight
    assert len(set(straight.values())) > 1  # the weights move
    for step in (4, 5, 6):
        assert resumed[step] == straight[step], (straight, resumed)
