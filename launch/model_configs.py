"""Model presets and Hugging Face ``config.json`` files -> the Muon parameters of the model.

A config is read the way Hugging Face's Llama, Qwen2/Qwen3(-MoE), Mixtral and DeepSeek-V2/V3
(Kimi K2, Moonlight) modeling code builds its linear layers: every 2-D weight of the decoder
layers (attention projections, MLP, shared experts, the router) is a Muon matrix; embeddings,
the output head and norms go to AdamW and are left out. Routed experts are one ``[E, m, n]``
tensor per projection and layer, as grouped-GEMM trainers (torchtitan) store them. Weights
are ``[out, in]``. The multi-token-prediction layers (``num_nextn_predict_layers``) are
left out: trainers build them separately.

The presets are the published configs' fields (sources in docs/scale.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed_muon.cluster import ModelParam
from distributed_muon.heads import head_row_blocks

# Fields of the published config.json files (see docs/scale.md for the sources).
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": {  # deepseek-ai/DeepSeek-V3, 671B
        "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "first_k_dense_replace": 3,
        "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    },
    "kimi-k2": {  # moonshotai/Kimi-K2-Base, 1.04T
        "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 64,
        "num_key_value_heads": 64, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 384, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    },
    "qwen3-235b-a22b": {  # Qwen/Qwen3-235B-A22B
        "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_experts": 128, "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "moonlight-16b-a3b": {  # moonshotai/Moonlight-16B-A3B
        "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "intermediate_size": 11264, "moe_intermediate_size": 1408,
        "n_routed_experts": 64, "n_shared_experts": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    },
    "llama-3-70b": {  # meta-llama/Meta-Llama-3-70B
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672,
    },
    "llama-3.1-405b": {  # meta-llama/Llama-3.1-405B
        "hidden_size": 16384, "num_hidden_layers": 126, "num_attention_heads": 128,
        "num_key_value_heads": 8, "intermediate_size": 53248,
    },
}


def bench_model(layers: int = 16, d: int = 2048) -> list[ModelParam]:
    """The model of `dmuon bench` and docs/benchmarks.md: per layer a fused qkv ``3d x d``,
    proj ``d x d``, fc1 ``4d x d`` and fc2 ``d x 4d``."""
    shapes = (("qkv", (3 * d, d), "col"), ("proj", (d, d), "row"),
              ("fc1", (4 * d, d), "col"), ("fc2", (d, 4 * d), "row"))
    return [ModelParam(f"layers.{i}.{name}.weight", shape, i, tp=tp)
            for i in range(layers) for name, shape, tp in shapes]


# Models that are not Hugging Face configs: the benchmark models of docs/benchmarks.md.
BUILTIN: dict[str, Callable[[], list[ModelParam]]] = {"bench-16x2048": bench_model}

MODELS = (*PRESETS, *BUILTIN)


def load_model(name_or_path: str, per_head: bool = False) -> list[ModelParam]:
    """A preset's or a ``config.json`` file's Muon parameters (ValueError names the fix);
    ``per_head``: attention split per head (`params_from_config`)."""
    if name_or_path in PRESETS:
        return params_from_config(PRESETS[name_or_path], per_head=per_head)
    if name_or_path in BUILTIN:
        if per_head:
            raise ValueError(f"--model {name_or_path} has no attention heads to split: "
                             "--per-head needs a preset or a config.json")
        return BUILTIN[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--model {name_or_path!r} is neither a preset ({', '.join(MODELS)}) "
                         "nor a config.json file")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--model {name_or_path}: not a JSON file ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--model {name_or_path}: a config.json holds a JSON object")
    return params_from_config(cfg, label=str(path), per_head=per_head)


def _int(cfg: dict[str, Any], key: str, label: str, default: Any = ...) -> int:
    value = cfg.get(key, default)
    if value is ...:
        raise ValueError(f"{label}: config has no {key!r} (a Llama-, Qwen-, Mixtral- or "
                         "DeepSeek-style config.json is needed)")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{label}: {key}={value!r} must be a non-negative integer")
    return value


def params_from_config(cfg: dict[str, Any], label: str = "config",
                       per_head: bool = False) -> list[ModelParam]:
    """The Muon parameters of the decoder a Hugging Face config describes; ``per_head``: the
    attention Q, K, V and latent up-projections split into one matrix per head, as
    ``muon_param_groups(model, per_head=True)`` splits them."""
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers (Kimi K2.5, Kimi-VL) hold it here
    h = _int(cfg, "hidden_size", label)
    layers = _int(cfg, "num_hidden_layers", label)
    heads = _int(cfg, "num_attention_heads", label)
    if min(h, layers, heads) < 1:
        raise ValueError(f"{label}: hidden_size, num_hidden_layers and num_attention_heads "
                         "must be positive")
    experts = (cfg.get("n_routed_experts") or cfg.get("num_experts")
               or cfg.get("num_local_experts") or 0)
    out: list[ModelParam] = []
    for i in range(layers):
        pre = f"layers.{i}"

        def add(name: str, shape: tuple[int, ...], tp: str | None, expert: bool = False,
                head: int | None = None, pre: str = pre, i: int = i) -> None:
            full = f"{pre}.{name}.weight"
            blocks = head_row_blocks(shape[0], head, full) if per_head and head else None
            out.append(ModelParam(full, shape, i, expert, tp, blocks))

        if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3)
            nope = _int(cfg, "qk_nope_head_dim", label)
            rope = _int(cfg, "qk_rope_head_dim", label)
            v = _int(cfg, "v_head_dim", label)
            kv_rank = _int(cfg, "kv_lora_rank", label)
            q_rank = cfg.get("q_lora_rank")
            if q_rank:
                add("self_attn.q_a_proj", (q_rank, h), None)
                add("self_attn.q_b_proj", (heads * (nope + rope), q_rank), "col",
                    head=nope + rope)
            else:
                add("self_attn.q_proj", (heads * (nope + rope), h), "col", head=nope + rope)
            add("self_attn.kv_a_proj_with_mqa", (kv_rank + rope, h), None)
            add("self_attn.kv_b_proj", (heads * (nope + v), kv_rank), "col", head=nope + v)
            add("self_attn.o_proj", (h, heads * v), "row")
        else:
            hd = cfg.get("head_dim") or h // heads
            kv = _int(cfg, "num_key_value_heads", label, heads)
            add("self_attn.q_proj", (heads * hd, h), "col", head=hd)
            add("self_attn.k_proj", (kv * hd, h), "col", head=hd)
            add("self_attn.v_proj", (kv * hd, h), "col", head=hd)
            add("self_attn.o_proj", (h, heads * hd), "row")
        if experts and _is_moe_layer(cfg, i):
            inter = _int(cfg, "moe_intermediate_size", label, cfg.get("intermediate_size", ...))
            add("mlp.gate", (experts, h), None)
            add("mlp.experts.gate_proj", (experts, inter, h), "col", True)
            add("mlp.experts.up_proj", (experts, inter, h), "col", True)
            add("mlp.experts.down_proj", (experts, h, inter), "row", True)
            shared = (cfg.get("n_shared_experts") or 0) * inter
            shared = shared or cfg.get("shared_expert_intermediate_size") or 0
            if shared:
                add("mlp.shared_experts.gate_proj", (shared, h), "col")
                add("mlp.shared_experts.up_proj", (shared, h), "col")
                add("mlp.shared_experts.down_proj", (h, shared), "row")
        else:
            inter = _int(cfg, "intermediate_size", label)
            add("mlp.gate_proj", (inter, h), "col")
            add("mlp.up_proj", (inter, h), "col")
            add("mlp.down_proj", (h, inter), "row")
    return out


def _is_moe_layer(cfg: dict[str, Any], i: int) -> bool:
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:  # DeepSeek
        return i >= (cfg.get("first_k_dense_replace") or 0) and i % (
            cfg.get("moe_layer_freq") or 1) == 0
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:  # Qwen2/3-MoE
        step = cfg.get("decoder_sparse_step") or 1
        return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0
    return True  # Mixtral: every layer
