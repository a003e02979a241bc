"""HF Trainer and Accelerate with real FSDP2 on a GPU (on CPU, Accelerate turns FSDP off).

Each runs a small script under ``torchrun --nproc-per-node N`` (N = the GPUs present, at most
2): a tiny Llama trained 6 steps with a save at step 3, then a second run resumed from that
save, whose losses of steps 4-6 must equal the first run's. The scripts also check that the
model really is FSDP2-sharded (DTensor parameters), that the optimizer (built before the model
was sharded: both trainers do that) holds the sharded parameters, and that the embedding and
the head were given to AdamW. Skipped without CUDA; run with
``python -m pytest tests/test_gpu_trainers.py`` on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distributed_muon.launch.local import free_port

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

COMMON = """
import json, sys
import torch
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from distributed_muon import DistributedMuon

resume = "--resume" in sys.argv
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
tokens = torch.randint(0, 256, (256, 32), generator=torch.Generator().manual_seed(0))


def check(model, opt):
    while not isinstance(opt, DistributedMuon):  # Accelerate wraps it
        opt = opt.optimizer
    assert all(isinstance(p, DTensor) for p in model.parameters()), "model is not FSDP2"
    names = {n for g in opt.param_groups for n in g["param_names"]}
    muon = {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]}
    assert names == {n for n, _ in model.named_parameters()}, "optimizer lost parameters"
    assert all(isinstance(p, DTensor) for p in opt.muon_params), "optimizer kept old params"
    assert not any("embed" in n or "lm_head" in n for n in muon), muon
    assert any("mlp" in n for n in muon), muon
"""

HF_TRAINER = COMMON + """
from transformers import Trainer, TrainerCallback, TrainingArguments

from distributed_muon.integrations.transformers import muon_optimizer


class Check(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        check(model, optimizer)


args = TrainingArguments(
    output_dir="out", max_steps=6, save_steps=3, per_device_train_batch_size=4,
    logging_steps=1, report_to="none", seed=0, data_seed=0,
    fsdp="full_shard", fsdp_config={"fsdp_version": 2,
                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
trainer = Trainer(model=model, args=args,
                  train_dataset=[{"input_ids": t, "labels": t} for t in tokens],
                  optimizer_cls_and_kwargs=(muon_optimizer, {"lr": 3e-3, "weight_decay": 0.1}),
                  callbacks=[Check()])
trainer.train(resume_from_checkpoint="out/checkpoint-3" if resume else None)
losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
if trainer.is_world_process_zero():
    json.dump(losses, open("resumed.json" if resume else "straight.json", "w"))
"""

ACCELERATE = COMMON + """
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, set_seed

from distributed_muon import muon_param_groups

accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(
    fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
    transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="SHARDED_STATE_DICT"))
opt = DistributedMuon(muon_param_groups(model), lr=3e-3, weight_decay=0.1)
model, opt = accelerator.prepare(model, opt)
rank, world = accelerator.process_index, accelerator.num_processes
if resume:
    accelerator.load_state("ckpt")
losses = {}
for step in range(3 if resume else 0, 6):
    batch = tokens[step * 8:(step + 1) * 8].view(world, -1, 32)[rank].to(accelerator.device)
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    check(model, opt)
    losses[step + 1] = accelerator.reduce(loss.detach(), "mean").item()
    if step + 1 == 3 and not resume:
        accelerator.save_state("ckpt")
if accelerator.is_main_process:
    json.dump(losses, open("resumed.json" if resume else "straight.json", "w"))
accelerator.end_training()
"""


def _run(folder: Path, script: str, *args: str) -> None:
    nproc = min(torch.cuda.device_count(), 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@cuda
@pytest.mark.parametrize("name,source", [("hf_trainer_fsdp2.py", HF_TRAINER),
                                         ("accelerate_fsdp2.py", ACCELERATE)])
def test_fsdp2_trainer_resumes_exactly(tmp_path, name, source):
    (tmp_path / name).write_text(textwrap.dedent(source))
    _run(tmp_path, name)
    _run(tmp_path, name, "--resume")
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert straight["6"] < straight["1"]  # it trains
    for step in ("4", "5", "6"):
        assert resumed[step] == straight[step], (step, straight, resumed)
