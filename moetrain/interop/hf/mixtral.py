"""Mixtral: softmax top-k router whose chosen gates are always renormalised (a top-1 gate is 1.0), SwiGLU
experts stored per expert as ``block_sparse_moe.experts.{e}.w1/w3/w2``, plain grouped-query attention."""

from __future__ import annotations

from typing import Any

from moetrain.config import ModelConfig, MoEConfig
from moetrain.interop.hf.common import (
    Family,
    Layout,
    common_hf_config,
    common_model_config,
    expect,
    expect_all_moe,
    expect_gqa,
    expect_no_shared_expert,
    expect_softmax_router,
    normalizes_gates,
    require,
    routing_config,
)

NAME = "mixtral"


def to_moetrain(c: Any) -> tuple[ModelConfig, MoEConfig]:
    require(c.sliding_window is None, "sliding_window", c.sliding_window, "null (full attention)")
    model = common_model_config(c, d_ff=c.intermediate_size, head_dim=getattr(c, "head_dim", None))
    return model, routing_config(c.num_local_experts, c.num_experts_per_tok, norm_topk_prob=True)


def to_hf(m: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
    expect_gqa(NAME, m, qkv_bias=False, out_bias=False, qk_norm="none")
    expect_all_moe(NAME, m)
    expect_no_shared_expert(NAME, m)
    expect_softmax_router(NAME, moe)
    key = "moe.renormalize_top1" if moe.top_k == 1 and moe.renormalize else "moe.renormalize"
    expect(
        normalizes_gates(moe),
        NAME,
        f"moe.top_k={moe.top_k} with {key}",
        False,
        "renormalised gates (Mixtral renormalises the chosen gates, so its top-1 gate is 1.0, not moetrain's raw "
        "p1): fine-tune with moe.renormalize_top1=true before exporting a top-1 model, or export top_k >= 2",
    )
    return {
        **common_hf_config(m),
        "head_dim": m.head_dim or m.d_model // m.n_heads,
        "intermediate_size": m.d_ff,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "sliding_window": None,
    }


FAMILY = Family(NAME, Layout(moe="block_sparse_moe", experts=("w1", "w3", "w2")), to_moetrain, to_hf)
