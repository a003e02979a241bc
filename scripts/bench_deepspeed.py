"""Step time and peak memory of AdamW, DeepSpeed's Muon and DistributedMuon under DeepSpeed ZeRO.

Launch (one node, 4 GPUs; repeat for each --stage and --optimizer):

    torchrun --standalone --nproc-per-node 4 scripts/bench_deepspeed.py \
        --stage 1 --optimizer distributed_muon --out results.jsonl

Trains a dense GPT-style transformer (about 1.0B parameters by default) on random tokens for
``--warmup + --steps`` steps in bf16. A step's time is the wall time between
``torch.cuda.synchronize()`` calls, max over ranks; the median, min and max of the measured
(post-warmup) steps are reported, with peak ``max_memory_allocated`` over the whole run (max over
ranks). Rank 0 appends one JSON line to ``--out`` and prints a summary.

--optimizer ds_muon is DeepSpeed's built-in ``"type": "Muon"``: ``deepspeed.initialize`` tags
every >=2-D parameter whose name lacks "embed"/"lm_head" with ``use_muon=True`` (the rest get
its auxiliary Adam, here torch's AdamW via ``torch_adam``), and its Newton-Schulz is
``torch.compile``d, so the first steps compile. ZeRO-3 Muon needs ``reduce_scatter: false``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse
import json
import statistics
import time
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 128
LR = 1e-4


def moe_layer(dim: int, moe: argparse.Namespace) -> nn.Module:
    """DeepSpeed's MoE layer: ``moe.experts`` GELU MLPs ``dim -> moe.expert_ffn -> dim``, top-1,
    expert parallelism over ``moe.ep`` ranks, no dropped tokens."""
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(nn.Linear(dim, moe.expert_ffn, bias=False), nn.GELU(),
                           nn.Linear(moe.expert_ffn, dim, bias=False))
    return MoE(hidden_size=dim, expert=expert, num_experts=moe.experts, ep_size=moe.ep, k=1,
               drop_tokens=False)


class Block(nn.Module):
    def __init__(self, dim: int, moe: argparse.Namespace | None = None) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.moe = moe_layer(dim, moe) if moe else None
        if self.moe is None:
            self.fc1 = nn.Linear(dim, 4 * dim, bias=False)
            self.fc2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, s, 3, d // HEAD_DIM, HEAD_DIM)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        if self.moe is not None:
            return x + self.moe(self.ln2(x))[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int,
                 moe: argparse.Namespace | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, moe) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1])
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def optimizer_block(name: str, dmuon: dict[str, Any]) -> dict[str, Any]:
    """The JSON optimizer block; ``dmuon`` overrides DistributedMuon's params."""
    if name == "adamw":
        params = {"lr": LR, "betas": [0.9, 0.95], "weight_decay": 0.1, "torch_adam": True}
        return {"type": "AdamW", "params": params}
    if name == "ds_muon":
        # Keys DeepSpeed's Muon reads: lr, muon_lr, adam_lr, momentum, weight_decay, ns_method
        # ("gram" default | "standard"), betas, eps, adam_w_mode, torch_adam, per_head_muon.
        # torch_adam: the Adam half is torch AdamW (else FusedAdam, a JIT-built CUDA extension).
        params = {"lr": LR, "momentum": 0.95, "weight_decay": 0.1, "betas": [0.9, 0.95],
                  "torch_adam": True}
        return {"type": "Muon", "params": params}
    import distributed_muon.integrations.deepspeed  # noqa: F401  (registers "DistributedMuon")

    params = {"lr": LR, "weight_decay": 0.1, **dmuon}  # our defaults unless --dmuon says
    return {"type": "DistributedMuon", "params": params}


def dmuon_memory(engine: Any) -> dict[str, int] | None:
    """`DistributedMuon.memory_bytes` summed over the optimizers of the engine's DeepSpeedMuon
    (one per param group partition) on this rank; None for the other optimizers."""
    from distributed_muon.integrations.deepspeed import DeepSpeedMuon

    opt = engine.optimizer
    while opt is not None and not isinstance(opt, DeepSpeedMuon):
        opt = getattr(opt, "optimizer", None)  # ZeRO's wrapper holds it as .optimizer
    if opt is None:
        return None
    total: dict[str, int] = {}
    for unit in opt._units.values():
        for key, value in unit.optimizer.memory_bytes().items():
            total[key] = total.get(key, 0) + value
    return total


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": args.stage}
    if args.optimizer == "ds_muon" and args.stage == 3:
        zero["reduce_scatter"] = False  # ZeRO-3 refuses Muon with reduce_scatter
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": optimizer_block(args.optimizer, args.dmuon),
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=1)
    p.add_argument("--optimizer", choices=("adamw", "ds_muon", "distributed_muon"),
                   default="distributed_muon")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step (DeepSpeed's gradient_accumulation_steps)")
    p.add_argument("--dmuon", action="append", default=[], metavar="KEY=JSON",
                   help="a DistributedMuon param of the JSON block, e.g. ns_method='\"gram\"' "
                        "or exchange_chunks=4 (repeatable)")
    p.add_argument("--moe-experts", type=int, default=0,
                   help="replace each dense MLP by DeepSpeed MoE with this many experts")
    p.add_argument("--expert-ffn", type=int, default=1408)
    p.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: world)")
    p.add_argument("--out", default="results.jsonl")
    args = p.parse_args()
    overrides = {}
    for item in args.dmuon:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--dmuon {item!r}: use KEY=JSON, e.g. exchange_chunks=4")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string: ns_method=gram
    args.dmuon = overrides
    return args


def main() -> None:
    args = parse_args()
    assert args.dim % HEAD_DIM == 0, f"--dim must be a multiple of {HEAD_DIM}"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)

    torch.manual_seed(0)
    moe = None
    if args.moe_experts:
        moe = argparse.Namespace(experts=args.moe_experts, expert_ffn=args.expert_ffn,
                                 ep=args.ep or world)
    model = GPT(args.vocab, args.dim, args.layers, moe)  # CPU, fp32; DeepSpeed casts to bf16
    n_params = sum(p.numel() for p in model.parameters())
    cfg = ds_config(args)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

    times: list[float] = []
    losses: list[torch.Tensor] = []
    gen = torch.Generator(device=device)
    for step in range(args.warmup + args.steps):
        gen.manual_seed(1_000_003 * rank + step)
        tokens = torch.randint(0, args.vocab, (args.grad_accum, args.micro_batch, args.seq + 1),
                               device=device, generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in tokens:  # DeepSpeed steps the optimizer at the last micro-batch only
            loss = engine(micro)
            engine.backward(loss)
            engine.step()
        torch.cuda.synchronize()
        dt = torch.tensor(time.perf_counter() - t0, device=device, dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        losses.append(loss.detach().float())
        if step >= args.warmup:
            times.append(dt.item())

    resident = torch.cuda.memory_allocated()  # between steps: what the run keeps allocated
    peak = torch.tensor(torch.cuda.max_memory_allocated(), device=device, dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    loss_mean = torch.stack(losses)
    dist.all_reduce(loss_mean)
    loss_mean = (loss_mean / world).tolist()

    if rank == 0:
        result = {
            "optimizer": args.optimizer, "stage": args.stage, "world_size": world,
            "tokens_per_step": args.seq * args.micro_batch * args.grad_accum * world,
            "step_s_median": statistics.median(times), "step_s_min": min(times),
            "step_s_max": max(times), "step_s_all": times,
            "peak_mem_gib": peak.item() / 2**30, "params": n_params,
            "allocated_between_steps_gib": resident / 2**30,
            "dmuon_memory_rank0": dmuon_memory(engine),
            "loss_first": loss_mean[0], "loss_last": loss_mean[-1],
            "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "optimizer_config": cfg["optimizer"],
            "zero_optimization": cfg["zero_optimization"], "args": vars(args),
        }
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[bench] {args.optimizer} {args.dmuon or ''} ZeRO-{args.stage} x{world}, "
              f"{result['tokens_per_step']} tokens: "
              f"step {result['step_s_median'] * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, "
              f"max {max(times) * 1e3:.1f}), peak {result['peak_mem_gib']:.2f} GiB, "
              f"{n_params / 1e9:.3f}B params, loss {loss_mean[0]:.4f} -> {loss_mean[-1]:.4f}; "
              f"allocated between steps {resident / 2**30:.2f} GiB", flush=True)
        if result["dmuon_memory_rank0"]:
            mem = result["dmuon_memory_rank0"]
            exchange = sum(v for k, v in mem.items() if k.startswith("exchange_"))
            print(f"[bench] DistributedMuon memory on rank 0 (GiB): momentum "
                  f"{mem['muon_state_bytes'] / 2**30:.2f}, AdamW state "
                  f"{mem['adamw_state_bytes'] / 2**30:.2f}, exchange buffers in a step "
                  f"{exchange / 2**30:.2f}, kept between steps "
                  f"{mem['between_steps_bytes'] / 2**30:.2f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
