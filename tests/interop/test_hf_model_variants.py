"""The architecture variants the imported families need, on their own: routing formulas, gating at top-1,
gradients through every new component, and config values that fail with one line naming the key."""

from __future__ import annotations

import pytest
import torch
from helpers.configs import assert_composition_error
from helpers.configs import assert_config_error as assert_one_line_error

from moetrain.config import MLAConfig, ModelConfig, MoEConfig
from moetrain.model import build_model
from moetrain.model.moe import MoELayer
from moetrain.model.router import combine_gates, group_limited_mask


def test_group_limited_mask_keeps_the_best_groups():
    # 6 experts in 3 groups of 2: group scores by max are (0.9, 0.5, 0.8), by top-2 sum (1.0, 0.9, 0.8)
    s = torch.tensor([[0.9, 0.1, 0.5, 0.4, 0.8, 0.0]])
    by_max = group_limited_mask(s, n_group=3, topk_group=2, group_score="max")
    assert by_max.tolist() == [[True, True, False, False, True, True]]
    by_sum = group_limited_mask(s, n_group=3, topk_group=2, group_score="top2_sum")
    assert by_sum.tolist() == [[True, True, True, True, False, False]]


def test_combine_gates_formulas():
    p = torch.tensor([[0.3, 0.1]])
    torch.testing.assert_close(combine_gates(p, True, False, 2.0), torch.tensor([[1.5, 0.5]]))
    torch.testing.assert_close(combine_gates(p, False, False, 2.0), torch.tensor([[0.6, 0.2]]))
    top1 = p[:, :1]
    torch.testing.assert_close(combine_gates(top1, True, False, 1.0), top1)  # Switch: the raw p1
    torch.testing.assert_close(combine_gates(top1, True, True, 2.5), torch.tensor([[2.5]]))  # Mixtral-style


def test_top1_gate_follows_renormalize_top1():
    torch.manual_seed(0)
    x = torch.randn(1, 10, 16)
    for renorm_top1, expect_one in ((False, False), (True, True)):
        layer = MoELayer(16, 8, MoEConfig(num_experts=4, top_k=1, renormalize_top1=renorm_top1))
        layer.reset_parameters(0.5, 0.5)
        gates = layer.router(x.view(10, 16)).gates_TK
        assert torch.allclose(gates, torch.ones_like(gates)) == expect_one


def test_every_variant_trains():
    """MLA, shared gated experts, dense first layer, group-limited sigmoid routing: finite loss and a
    gradient on every parameter."""
    model_cfg = ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=4,
        d_ff=16,
        dense_d_ff=40,
        first_dense_layers=1,
        shared_d_ff=24,
        shared_expert_gate=True,
        attention="mla",
        rope_interleave=True,
        mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
        seq_len=16,
    )
    moe_cfg = MoEConfig(
        num_experts=8, top_k=2, score_func="sigmoid", routed_scaling_factor=2.0, n_group=4, topk_group=2
    )
    gqa_cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, head_dim=12, qkv_bias=True, out_bias=True,
                          qk_norm="head", clip_qkv=2.0, seq_len=16)  # fmt: skip
    for m, moe in ((model_cfg, moe_cfg), (gqa_cfg, MoEConfig(num_experts=4))):
        torch.manual_seed(0)
        model = build_model(m, moe)
        tokens = torch.randint(0, m.vocab_size, (2, 16))
        out = model(tokens)
        loss = torch.nn.functional.cross_entropy(out.logits_BSV.flatten(0, 1), tokens.flatten()) + out.aux_loss
        loss.backward()
        assert torch.isfinite(loss)
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        assert not no_grad, no_grad
    with pytest.raises(ValueError, match=r"moe.top_k=5 exceeds the experts of moe.topk_group=2 groups"):
        build_model(model_cfg, moe_cfg).moe_layers()[0].top_k = 5


INVALID = [
    (["moe.n_group=3"], "moe.n_group=3", "divide moe.num_experts=8"),
    (["moe.n_group=4", "moe.topk_group=5"], "moe.topk_group=5", "between 1 and moe.n_group=4"),
    (["moe.n_group=4", "moe.top_k=5"], "moe.topk_group=1", "fewer than moe.top_k=5"),
    (["moe.routed_scaling_factor=0"], "moe.routed_scaling_factor=0.0", "must be > 0"),
    (["model.head_dim=7"], "model.head_dim=7", "RoPE needs it even"),
    (["model.shared_expert_gate=true"], "model.shared_expert_gate=True", "needs a shared expert"),
    (["model.dense_layers=[9]"], "model.dense_layers=[9]", "outside 0..3"),
    (["model.first_dense_layers=4"], "model.first_dense_layers=4", "leaves no MoE layer"),
    (["model.attention=mla", "model.mla.qk_rope_head_dim=3"], "model.mla.qk_rope_head_dim=3", "must be even"),
    (["model.attention=mla", "model.qk_norm=head"], "model.qk_norm=head", "not supported with model.attention=mla"),
    (["data.tokenizer=sentencepiece"], "data.tokenizer=sentencepiece", "allowed: byte, hf, auto, hf:PATH"),
    (["data.tokenizer=hf"], "data.tokenizer=hf", "needs model.init_from"),
]


@pytest.mark.parametrize(("overrides", "key_value", "allowed"), INVALID, ids=[i[1] for i in INVALID])
def test_invalid_variant_values_name_the_key(overrides, key_value, allowed):
    assert_one_line_error(overrides, key_value, allowed)


BAD_CHOICES = [
    (["moe.group_score=mean"], "max, top2_sum"),
    (["model.attention=linear"], "gqa, mla"),
    (["model.qk_norm=layer"], "none, head, full"),
]


@pytest.mark.parametrize(("overrides", "allowed"), BAD_CHOICES, ids=[b[0][0] for b in BAD_CHOICES])
def test_a_bad_variant_choice_fails_at_composition(overrides, allowed):
    assert_composition_error(overrides, allowed)
