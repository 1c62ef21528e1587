"""DeepSeek-V2: multi-head latent attention with interleaved RoPE, softmax router (``greedy`` or
``group_limited_greedy`` top-k, best expert per group scores the group), gates scaled by
``routed_scaling_factor`` and never renormalised (transformers' DeepseekV2 ignores ``norm_topk_prob``), an
ungated shared-expert FFN of ``n_shared_experts * moe_intermediate_size``, the first
``first_k_dense_replace`` layers dense (``intermediate_size``)."""

from __future__ import annotations

from typing import Any

from moetrain.config import MLAConfig, ModelConfig, MoEConfig
from moetrain.interop.hf.common import (
    Family,
    Layout,
    common_hf_config,
    common_model_config,
    expect,
    normalizes_gates,
    require,
    routing_config,
)

NAME = "deepseek_v2"
TOPK_METHODS = ("greedy", "group_limited_greedy")


def deepseek_model_config(c: Any, rope_interleave: bool) -> ModelConfig:
    """The architecture DeepSeek-V2 and V3 share: MLA, shared experts, first-k dense layers."""
    for key in ("attention_bias", "mlp_bias"):
        require(not getattr(c, key, False), key, getattr(c, key, False), "false")
    freq = getattr(c, "moe_layer_freq", 1)
    require(freq == 1, "moe_layer_freq", freq, "1 (transformers' DeepSeek models ignore it)")
    require(c.n_routed_experts is not None, "n_routed_experts", None, ">= 1")
    n_shared = c.n_shared_experts or 0
    return common_model_config(
        c,
        n_kv_heads=c.num_attention_heads,  # MLA has one key/value per head; num_key_value_heads is unused
        d_ff=c.moe_intermediate_size,
        dense_d_ff=c.intermediate_size,
        first_dense_layers=c.first_k_dense_replace or 0,
        shared_d_ff=c.moe_intermediate_size * n_shared,
        attention="mla",
        rope_interleave=rope_interleave,
        mla=MLAConfig(
            q_lora_rank=c.q_lora_rank,
            kv_lora_rank=c.kv_lora_rank,
            qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim,
            v_head_dim=c.v_head_dim,
        ),
    )


def deepseek_hf_config(family: str, m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect(m.attention == "mla", family, "model.attention", m.attention, "mla")
    expect(m.moe_every == 1 and not m.dense_layers, family, "model.dense_layers", m.dense_layers, "[] with moe_every=1")
    expect(
        m.shared_d_ff > 0 and m.shared_d_ff % m.d_ff == 0 and not m.shared_expert_gate,
        family,
        "model.shared_d_ff",
        m.shared_d_ff,
        f"a positive multiple of model.d_ff={m.d_ff} (n_shared_experts), ungated",
    )
    common = common_hf_config(m)
    common.pop("num_key_value_heads")
    return {
        **common,
        "intermediate_size": m.dense_d_ff or m.d_ff,
        "moe_intermediate_size": m.d_ff,
        "first_k_dense_replace": m.first_dense_layers,
        "n_shared_experts": m.shared_d_ff // m.d_ff,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "q_lora_rank": m.mla.q_lora_rank,
        "kv_lora_rank": m.mla.kv_lora_rank,
        "qk_nope_head_dim": m.mla.qk_nope_head_dim,
        "qk_rope_head_dim": m.mla.qk_rope_head_dim,
        "v_head_dim": m.mla.v_head_dim,
        "attention_bias": False,
    }


def require_original_key(c: Any, key: str, allowed: str) -> None:
    """DeepSeek's own config.json keys transformers does not read: accepted only with the value it assumes."""
    value = getattr(c, key, None)
    require(value in (None, allowed), key, value, allowed)


def to_moetrain(c: Any) -> tuple[ModelConfig, MoEConfig]:
    require(c.topk_method in TOPK_METHODS, "topk_method", c.topk_method, ", ".join(TOPK_METHODS))
    require_original_key(c, "scoring_func", "softmax")
    require(
        not c.norm_topk_prob,
        "norm_topk_prob",
        c.norm_topk_prob,
        "false (transformers' DeepseekV2 never renormalises, so renormalised logits could not match it)",
    )
    grouped = c.topk_method == "group_limited_greedy"
    routing = {"n_group": c.n_group, "topk_group": c.topk_group, "group_score": "max"} if grouped else {}
    moe = routing_config(
        c.n_routed_experts,
        c.num_experts_per_tok,
        norm_topk_prob=False,
        score_func="softmax",
        routed_scaling_factor=c.routed_scaling_factor,
        **routing,
    )
    return deepseek_model_config(c, rope_interleave=True), moe


def to_hf(m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect(m.rope_interleave, NAME, "model.rope_interleave", m.rope_interleave, "true")
    expect(moe.score_func == "softmax", NAME, "moe.score_func", moe.score_func, "softmax")
    expect(
        not normalizes_gates(moe),
        NAME,
        f"moe.top_k={moe.top_k} with renormalised gates (moe.renormalize / moe.renormalize_top1)",
        True,
        "raw gates (transformers' DeepseekV2 never renormalises)",
    )
    grouped = moe.n_group > 1
    expect(not grouped or moe.group_score == "max", NAME, "moe.group_score", moe.group_score, "max")
    return {
        **deepseek_hf_config(NAME, m, moe),
        "topk_method": "group_limited_greedy" if grouped else "greedy",
        "norm_topk_prob": False,
    }


FAMILY = Family(NAME, Layout(shared="shared_experts"), to_moetrain, to_hf)
