"""Megatron-LM's ``pretrain_gpt.py`` on a small GPT-MoE with mock data, through `dmuon megatron`.

Used by ``tests/test_gpu_pretrain_gpt.py`` and ``scripts/megatron_curve.py``: the command line
(one place for the model and training flags, so the test and the curve run the same job), the
Megatron-LM checkout it needs, and the losses it logs.

The checkout is found through the ``MEGATRON_LM`` environment variable: a folder with
``pretrain_gpt.py``, ``gpt_builders.py``, ``model_provider.py`` and ``megatron/training`` of the
Megatron-LM tag matching the installed megatron-core (``core_v0.19.0`` for 0.19.x), e.g.
``git archive core_v0.19.0 megatron/training pretrain_gpt.py gpt_builders.py model_provider.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV = "MEGATRON_LM"
NEEDED = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py",
          "megatron/training/__init__.py")
# Megatron's training log: " iteration        3/      40 | ... | lm loss: 8.957163E+00 | ..."
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+\s*\|.*?\blm loss:\s*([-+0-9.eE]+)")
# In every process we start, as the GPU machines ask (docs/megatron.md).
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def find_megatron_lm(env: Mapping[str, str] | None = None) -> Path | None:
    """The Megatron-LM folder ``$MEGATRON_LM`` names, or None when unset; a folder that lacks
    a needed file is an error naming it."""
    value = (os.environ if env is None else env).get(ENV)
    if not value:
        return None
    folder = Path(value)
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"${ENV}={value} lacks {', '.join(missing)}: point it to a folder with "
                         "Megatron-LM's training code (git archive core_v0.19.0 megatron/training "
                         "pretrain_gpt.py gpt_builders.py model_provider.py)")
    return folder


@dataclass(frozen=True)
class Model:
    """A GPT-MoE of Megatron's local (no Transformer Engine) layers."""

    layers: int = 4
    hidden: int = 256
    heads: int = 8
    groups: int = 4
    ffn: int = 512
    experts: int = 4
    topk: int = 2
    seq: int = 256
    micro_batch: int = 8
    vocab: int = 8192

    def flags(self) -> list[str]:
        return [
            "--num-layers", str(self.layers), "--hidden-size", str(self.hidden),
            "--num-attention-heads", str(self.heads), "--group-query-attention",
            "--num-query-groups", str(self.groups), "--ffn-hidden-size", str(self.ffn),
            "--num-experts", str(self.experts), "--moe-router-topk", str(self.topk),
            "--moe-ffn-hidden-size", str(self.ffn), "--seq-length", str(self.seq),
            "--max-position-embeddings", str(self.seq),
            "--micro-batch-size", str(self.micro_batch),
            "--global-batch-size", str(self.micro_batch),
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(self.vocab),
            # Megatron's local layers: its fused kernels need Transformer Engine or apex.
            "--transformer-impl", "local", "--no-persist-layer-norm",
            "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-gelu-fusion",
            "--no-gradient-accumulation-fusion",  # its fused kernel needs APEX
            # megatron-core 0.19's local expert MLP adds its bias in place to the output of a
            # custom autograd Function, which autograd refuses (seen on one H100, 2026-12-06).
            "--disable-bias-linear",
        ]


def pretrain_args(optimizer: str, iters: int, model: Model = Model(), *, lr: float = 1e-3,
                  save: Path | None = None, load: Path | None = None, save_interval: int = 0,
                  exit_interval: int = 0, extra: Sequence[str] = ()) -> list[str]:
    """``pretrain_gpt.py`` arguments: ``model``, bf16, the distributed optimizer, a constant
    learning rate after 2 warm-up steps, no dropout, every iteration logged, no evaluation.

    ``exit_interval``: stop (after saving) at that iteration of an ``iters``-iteration run. A
    run to resume from must be cut this way rather than by a smaller ``iters``: Megatron sizes
    the mock dataset, and so the order of its samples, by ``iters``."""
    args = [
        *model.flags(), "--optimizer", optimizer, "--bf16", "--use-distributed-optimizer",
        "--train-iters", str(iters), "--lr", str(lr), "--lr-decay-style", "constant",
        "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--adam-beta2", "0.95", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--seed", "1234", "--log-interval", "1", "--eval-iters", "0",
        "--eval-interval", str(10 * iters), "--ckpt-format", "torch_dist",
    ]
    if save is not None:
        args += ["--save", str(save), "--save-interval", str(save_interval or iters)]
    if exit_interval:
        args += ["--exit-interval", str(exit_interval)]
    if load is not None:
        args += ["--load", str(load)]
    return [*args, *extra]


def command(megatron_lm: Path, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """One rank under torchrun, running ``pretrain_gpt.py`` through `dmuon megatron`."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "distributed_muon.launch.megatron_run", str(megatron_lm / "pretrain_gpt.py"),
            *args]


def losses(log: str) -> dict[int, float]:
    """``{iteration: lm loss}`` of every iteration a Megatron training log reports."""
    return {int(it): float(loss) for it, loss in LOSS.findall(log)}


def run(megatron_lm: Path, args: Sequence[str], *, log: Path, timeout: float = 300,
        cwd: Path | None = None) -> dict[int, float]:
    """Run ``pretrain_gpt.py`` with ``args``, its output to ``log``; the logged losses. A
    failed run raises with the log's tail."""
    env = {**os.environ, **GPU_ENV}
    with open(log, "w") as out:
        done = subprocess.run(command(megatron_lm, args), stdout=out, stderr=subprocess.STDOUT,
                              env=env, timeout=timeout, cwd=cwd)
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"pretrain_gpt.py exited {done.returncode} (log {log}):\n"
                           + text[-4000:])
    return losses(text)
