"""Forward FLOPs per token (moetrain.metrics.flops) against torch's FlopCounterMode over a real forward of the
built model: every matmul counted (experts on the per-expert loop, SDPA on its math path), divided by tokens."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import compose_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moetrain.config import MLAConfig, ModelConfig, MoEConfig
from moetrain.metrics.flops import forward_flops_per_token
from moetrain.model.transformer import build_model


def counted_flops_per_token(model_cfg: ModelConfig, moe_cfg: MoEConfig, top_k: int, batch: int = 2) -> float:
    """FlopCounterMode's total over one forward of ``batch`` full-length sequences, per token."""
    torch.manual_seed(0)
    model = build_model(model_cfg, MoEConfig(**{**moe_cfg.__dict__, "expert_impl": "loop"})).eval()
    for core in model.moe_layers():
        core.top_k = top_k
    ids = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops() / ids.numel()


SMALL = {"d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_ff": 48, "seq_len": 16, "vocab_size": 61}
CASES = {
    "gqa-all-moe": (ModelConfig(**SMALL), MoEConfig(num_experts=4)),
    "dense-every-other+shared-gate+bias": (
        ModelConfig(
            **{**SMALL, "n_layers": 4},
            moe_every=2,
            dense_d_ff=40,
            shared_d_ff=24,
            shared_expert_gate=True,
            qkv_bias=True,
            head_dim=12,
        ),
        MoEConfig(num_experts=6),
    ),
    "first-dense+listed-dense+tied": (
        ModelConfig(**SMALL, first_dense_layers=1, dense_layers=[2], tie_embeddings=True),
        MoEConfig(num_experts=4),
    ),
    "mla-q-latent": (
        ModelConfig(
            **SMALL,
            attention="mla",
            mla=MLAConfig(q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
        ),
        MoEConfig(num_experts=4),
    ),
    "mla-direct-q": (
        ModelConfig(
            **SMALL,
            attention="mla",
            mla=MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
        ),
        MoEConfig(num_experts=4),
    ),
    "pruned-layers": (ModelConfig(**SMALL), MoEConfig(num_experts=6, expert_ids=[[0, 1, 2], [5, 4, 3, 2, 1], [1, 3]])),
}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_formula_equals_flop_counter(case, top_k):
    model_cfg, moe_cfg = CASES[case]
    expected = counted_flops_per_token(model_cfg, moe_cfg, top_k)
    got = forward_flops_per_token(model_cfg, moe_cfg, top_k=top_k)
    assert got.total == pytest.approx(expected, rel=1e-12)


def test_parts_by_hand_on_the_base_shape():
    """The base preset's parts, written out: D 128, 4 layers, 4 heads of 32, 2 KV heads, 8 experts of 512, S 256."""
    cfg = compose_config(["+recipe=pretrain"])
    f = forward_flops_per_token(cfg.model, cfg.moe)
    D, L, F, S, V = 128, 4, 512, 256, 257
    assert f.attn_proj == L * (2 * D * 128 + 2 * 2 * D * 64 + 2 * 128 * D)
    assert f.attn_scores == L * 2 * 2 * S * 128
    assert f.router == L * 2 * D * 8
    assert f.experts == L * 2 * 3 * 2 * D * F
    assert f.lm_head == 2 * D * V
    assert f.shared_experts == f.dense_ffn == 0
    assert f.total == pytest.approx(counted_flops_per_token(cfg.model, cfg.moe, top_k=2, batch=1), rel=1e-12)


def test_base_preset_has_most_forward_flops_in_the_experts():
    """Issue 22: at top-2 at least 70 % of a step's forward FLOPs are in the experts (measured, not formula)."""
    cfg = compose_config(["+recipe=pretrain"])
    assert cfg.moe.top_k == 2
    counted_total = counted_flops_per_token(cfg.model, cfg.moe, top_k=2, batch=1)
    f = forward_flops_per_token(cfg.model, cfg.moe)
    assert f.experts / counted_total >= 0.70
    assert f.expert_share >= 0.70
    # top-1 halves the expert FLOPs: the step drops by about 40 %
    assert forward_flops_per_token(cfg.model, cfg.moe, top_k=1).total / f.total == pytest.approx(
        1 - f.experts / 2 / f.total
    )


def test_bad_top_k_names_it():
    with pytest.raises(ValueError, match="top_k=9"):
        forward_flops_per_token(ModelConfig(), MoEConfig(num_experts=8), top_k=9)


def test_the_peak_comes_from_the_device_name_in_half_precision_only():
    from moetrain.metrics.flops import device_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # before the plain H100 entry
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") is None  # not the tensor-core half rate
    assert device_peak_tflops("Some Future GPU", "bf16") is None and device_peak_tflops(None, "bf16") is None


def test_training_flops_are_three_forwards_at_the_top_k():
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.metrics.flops import forward_flops_per_token, training_flops_per_token

    model, moe = ModelConfig(), MoEConfig(num_experts=8, top_k=2)
    per_token = training_flops_per_token(model, moe)
    assert per_token(2) == 3 * forward_flops_per_token(model, moe, 2).total
    assert per_token(2) - per_token(1) == 3 * forward_flops_per_token(model, moe, 2).experts / 2
