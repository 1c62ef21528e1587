"""Qwen3-MoE: softmax router with optional ``norm_topk_prob``, no shared expert, RMSNorm of q and k over each
head (``q_norm`` / ``k_norm``), a ``head_dim`` independent of ``hidden_size``, Qwen's dense-layer pattern."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig, MoEConfig
from moetrain.interop.hf.common import (
    Family,
    Layout,
    common_hf_config,
    common_model_config,
    expect_gqa,
    expect_no_shared_expert,
    one_attention_bias_hf,
    routing_config,
    softmax_routing_hf,
)
from moetrain.interop.hf.qwen2_moe import qwen_layers, qwen_layers_hf, require_full_attention

NAME = "qwen3_moe"


def to_moetrain(c: Any) -> tuple[ModelConfig, MoEConfig]:
    require_full_attention(c)
    bias = bool(c.attention_bias)
    model = common_model_config(
        c, **qwen_layers(c), head_dim=getattr(c, "head_dim", None), qk_norm="head", qkv_bias=bias, out_bias=bias
    )
    return model, routing_config(c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)


def to_hf(m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect_gqa(NAME, m, qkv_bias=None, out_bias=None, qk_norm="head")
    expect_no_shared_expert(NAME, m)
    return {
        **common_hf_config(m),
        **qwen_layers_hf(m),
        **one_attention_bias_hf(NAME, m),
        **softmax_routing_hf(NAME, moe),
        "head_dim": m.head_dim or m.d_model // m.n_heads,
    }


FAMILY = Family(NAME, Layout(), to_moetrain, to_hf)
