"""A small GPT-style mixture-of-experts language model, written for `dmuon train`.

Attention uses one fused QKV weight ``[3d, d]`` (Muon splits it into Q, K, V blocks); each
MoE layer routes every token to its top-k of ``E`` experts, whose weights are 3-D tensors
``[E, h, d]`` and ``[E, d, h]`` (E matrices each for Muon). The head is tied to the byte
embedding (AdamW), the router is AdamW too. With a ``recorder`` set (``--qk-clip``), each
attention layer reports the per-head max logits of its training forwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distributed_muon.qk_clip import MaxLogitRecorder


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    seq: int = 64
    d: int = 160
    layers: int = 4
    heads: int = 4
    experts: int = 4
    top_k: int = 2
    hidden: int = 320
    aux_loss: float = 0.01  # load-balancing loss weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d, bias=False)
        self.proj = nn.Linear(cfg.d, cfg.d, bias=False)
        self.recorder: MaxLogitRecorder | None = None  # set for QK-clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.transpose(1, 2) for y in
                   self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2))
        if self.recorder is not None and self.training:
            self.recorder.record_attention(q, k, causal=True)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MoE(nn.Module):
    """Top-k routed experts; returns the output and the load-balancing loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.d, cfg.experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(cfg.experts, cfg.hidden, cfg.d) / math.sqrt(cfg.d))
        self.w_out = nn.Parameter(
            torch.randn(cfg.experts, cfg.d, cfg.hidden) / math.sqrt(cfg.hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(-1)
        weight, chosen = probs.topk(self.top_k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        experts = self.w_in.shape[0]
        for e in range(experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel() == 0:  # an expert without tokens: its weights get no gradient
                continue
            h = F.gelu(x[rows] @ self.w_in[e].T)
            out.index_add_(0, rows, (h @ self.w_out[e].T) * weight[rows, slot, None])
        # Switch-style balance: fraction routed x mean router probability, per expert.
        load = F.one_hot(chosen, experts).float().sum((0, 1)) / chosen.numel()
        aux = experts * (load * probs.mean(0)).sum()
        return out.view(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x))
        y, aux = self.moe(self.norm2(x))
        return x + y, aux


class TinyMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d)
        self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        """(mean cross-entropy in nats per byte, total loss including the balance term)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        aux_total = x.new_zeros(())
        for block in self.blocks:
            x, aux = block(x)
            aux_total = aux_total + aux
        logits = self.norm(x) @ self.embed.weight.T  # head tied to the embedding
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce, ce + self.cfg.aux_loss * aux_total

    def param_groups_spec(self) -> dict:
        """How `muon_param_groups` should treat this model (fused QKV blocks, AdamW extras)."""
        d = self.cfg.d
        return {"row_blocks": {"*.qkv.weight": (d, d, d)},
                "adamw": ["*.router.weight", "pos"]}
