"""Qwen2-MoE (Qwen1.5-MoE): softmax router with optional ``norm_topk_prob``, a shared expert with a per-token
sigmoid gate beside the routed experts, q/k/v biases, dense layers by ``decoder_sparse_step`` and
``mlp_only_layers`` with their own width (``intermediate_size``; experts use ``moe_intermediate_size``)."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig, MoEConfig
from moetrain.interop.hf.common import (
    Family,
    Layout,
    common_hf_config,
    common_model_config,
    dense_layer_indices,
    expect,
    expect_gqa,
    expect_natural_head_dim,
    require,
    require_natural_head_dim,
    routing_config,
    softmax_routing_hf,
)

NAME = "qwen2_moe"


def require_full_attention(c: Any) -> None:
    """Qwen's sliding-window layers are not supported."""
    require(not c.use_sliding_window, "use_sliding_window", c.use_sliding_window, "false")
    kinds = sorted(set(getattr(c, "layer_types", None) or ["full_attention"]))
    require(kinds == ["full_attention"], "layer_types", kinds, "full_attention only")


def qwen_layers(c: Any) -> dict[str, Any]:
    """Our FFN-layer keys for Qwen's layer pattern: layer i is MoE when (i + 1) % decoder_sparse_step == 0 and
    i is not in mlp_only_layers (the same rule as model.moe_every / model.dense_layers)."""
    require(c.num_experts > 0, "num_experts", c.num_experts, ">= 1")
    return {
        "d_ff": c.moe_intermediate_size,
        "dense_d_ff": c.intermediate_size,
        "moe_every": c.decoder_sparse_step,
        "dense_layers": sorted(c.mlp_only_layers or []),
    }


def qwen_layers_hf(m: ModelConfig) -> dict[str, Any]:
    dense = dense_layer_indices(m)
    # layers the moe_every rule already makes dense need not be listed; everything else dense is mlp_only
    only = [i for i in dense if (i + 1) % m.moe_every == 0]
    return {
        "intermediate_size": m.dense_d_ff or m.d_ff,
        "moe_intermediate_size": m.d_ff,
        "decoder_sparse_step": m.moe_every,
        "mlp_only_layers": only,
        "use_sliding_window": False,
    }


def to_moetrain(c: Any) -> tuple[ModelConfig, MoEConfig]:
    require_full_attention(c)
    require_natural_head_dim(c)
    width = c.shared_expert_intermediate_size
    require(width > 0, "shared_expert_intermediate_size", width, ">= 1")
    model = common_model_config(
        c, **qwen_layers(c), shared_d_ff=width, shared_expert_gate=True, qkv_bias=bool(c.qkv_bias)
    )
    return model, routing_config(c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)


def to_hf(m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect_gqa(NAME, m, qkv_bias=None, out_bias=False, qk_norm="none")
    expect_natural_head_dim(NAME, m)
    expect(
        m.shared_d_ff > 0 and m.shared_expert_gate,
        NAME,
        "model.shared_d_ff / model.shared_expert_gate",
        f"{m.shared_d_ff} / {m.shared_expert_gate}",
        "a gated shared expert (shared_d_ff > 0, shared_expert_gate=true): every Qwen2-MoE block has one",
    )
    return {
        **common_hf_config(m),
        **qwen_layers_hf(m),
        **softmax_routing_hf(NAME, moe),
        "shared_expert_intermediate_size": m.shared_d_ff,
        "qkv_bias": m.qkv_bias,
    }


FAMILY = Family(NAME, Layout(shared="shared_expert", shared_gate="shared_expert_gate"), to_moetrain, to_hf)
