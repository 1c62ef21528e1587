"""OLMoE: softmax router with optional ``norm_topk_prob``, every layer MoE, RMSNorm of the whole q and k
projections (not per head), optional ``clip_qkv``; experts' width is ``intermediate_size``."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig, MoEConfig
from moetrain.interop.hf.common import (
    Family,
    Layout,
    common_hf_config,
    common_model_config,
    expect_all_moe,
    expect_gqa,
    expect_natural_head_dim,
    expect_no_shared_expert,
    one_attention_bias_hf,
    require_natural_head_dim,
    routing_config,
    softmax_routing_hf,
)

NAME = "olmoe"


def to_moetrain(c: Any) -> tuple[ModelConfig, MoEConfig]:
    # transformers sizes OLMoE's k_norm by hidden_size / num_attention_heads: another head_dim cannot load
    require_natural_head_dim(c)
    bias = bool(c.attention_bias)
    model = common_model_config(
        c, d_ff=c.intermediate_size, qk_norm="full", qkv_bias=bias, out_bias=bias, clip_qkv=c.clip_qkv
    )
    return model, routing_config(c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)


def to_hf(m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect_gqa(NAME, m, qkv_bias=None, out_bias=None, qk_norm="full")
    expect_natural_head_dim(NAME, m)
    expect_all_moe(NAME, m)
    expect_no_shared_expert(NAME, m)
    return {
        **common_hf_config(m),
        **one_attention_bias_hf(NAME, m),
        **softmax_routing_hf(NAME, moe),
        "intermediate_size": m.d_ff,
        "clip_qkv": m.clip_qkv,
    }


FAMILY = Family(NAME, Layout(), to_moetrain, to_hf)
