"""DeepSeek-V3: multi-head latent attention (RoPE interleaved unless ``rope_interleave`` is false), sigmoid
router with ``e_score_correction_bias`` (selection only), group-limited top-k where a group scores the sum of
its two best experts (``noaux_tc``), optional ``norm_topk_prob``, gates scaled by ``routed_scaling_factor``;
shared experts and dense first layers as DeepSeek-V2. The multi-token-prediction layer is not imported."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig, MoEConfig
from moetrain.interop.hf.common import Family, Layout, expect, normalizes_gates, require, routing_config
from moetrain.interop.hf.deepseek_v2 import deepseek_hf_config, deepseek_model_config, require_original_key

NAME = "deepseek_v3"


def to_moetrain(c: Any) -> tuple[ModelConfig, MoEConfig]:
    require_original_key(c, "topk_method", "noaux_tc")
    require_original_key(c, "scoring_func", "sigmoid")
    require(c.n_group is not None and c.topk_group is not None, "n_group", c.n_group, "an integer with topk_group")
    moe = routing_config(
        c.n_routed_experts,
        c.num_experts_per_tok,
        c.norm_topk_prob,
        score_func="sigmoid",
        routed_scaling_factor=c.routed_scaling_factor,
        n_group=c.n_group,
        topk_group=c.topk_group,
        group_score="top2_sum",
    )
    return deepseek_model_config(c, rope_interleave=bool(c.rope_interleave)), moe


def to_hf(m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect(moe.score_func == "sigmoid", NAME, "moe.score_func", moe.score_func, "sigmoid")
    expect(moe.n_group == 1 or moe.group_score == "top2_sum", NAME, "moe.group_score", moe.group_score, "top2_sum")
    expect(moe.num_experts // moe.n_group >= 2, NAME, "moe.num_experts", moe.num_experts, ">= 2 per group")
    return {
        **deepseek_hf_config(NAME, m, moe),
        "norm_topk_prob": normalizes_gates(moe),
        "rope_interleave": m.rope_interleave,
        "num_nextn_predict_layers": 0,  # no multi-token-prediction weights are exported
    }


FAMILY = Family(NAME, Layout(shared="shared_experts", router_bias="e_score_correction_bias"), to_moetrain, to_hf)
