"""Mixtral interchange: our model equals transformers' MixtralForCausalLM on the same weights, both ways."""

from __future__ import annotations

import json

import pytest
import torch
from test_hf_families import assert_logits_close
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moetrain.config import ConfigError
from moetrain.interop.hf import load_mixtral, mixtral_configs, save_mixtral


def tiny_mixtral(tmp_path, vocab_size=96, **overrides):
    cfg = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        **overrides,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init so routing and every path matter
            p.normal_(0, 0.3)
    model.save_pretrained(str(tmp_path / "hf"))
    return model


def test_import_equals_transformers_and_export_reloads(tmp_path):
    hf = tiny_mixtral(tmp_path)
    ours, model_cfg, moe_cfg = load_mixtral(tmp_path / "hf")
    ours.eval()
    tokens = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        theirs = hf(tokens).logits
        mine = ours(tokens).logits_BSV
    assert_logits_close(mine, theirs)

    save_mixtral(ours, model_cfg, moe_cfg, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert_logits_close(reloaded(tokens).logits, mine)


def test_unsupported_fields_fail_with_one_line(tmp_path):
    base = json.loads(MixtralConfig(num_experts_per_tok=2).to_json_string())
    with pytest.raises(ConfigError, match=r"^sliding_window=4096 is not supported"):
        mixtral_configs({**base, "sliding_window": 4096})
    # a top-1 Mixtral checkpoint imports with its renormalised gate (1.0); top-2 leaves top-1 gating to the recipe
    assert mixtral_configs({**base, "num_experts_per_tok": 1})[1].renormalize_top1
    assert not mixtral_configs(base)[1].renormalize_top1
    with pytest.raises(ConfigError, match=r"^model_type=llama is not supported"):
        mixtral_configs({**base, "model_type": "llama"})


def test_training_starts_from_a_mixtral_directory(tmp_path):
    """model.init_from=hf:DIR takes the architecture from config.json and the weights from safetensors."""
    from test_hf_pipeline import train_from

    from moetrain.interop.hf.from_run import load_run_model

    tiny_mixtral(tmp_path, vocab_size=300)  # >= the byte tokenizer's 257 ids
    train_from(tmp_path / "hf", tmp_path, "trainer.max_steps=2")
    model, _ = load_run_model(tmp_path / "run")
    assert model.layers[1].ffn.experts.w1_EDF.shape == (4, 32, 48)  # the checkpoint's architecture
    hf = MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"))
    hf_router = hf.state_dict()["model.layers.0.mlp.gate.weight"]
    # trained for two steps from the imported router: close to it, not equal
    assert 0 < (model.layers[0].ffn.router.weight_ED.detach() - hf_router).abs().max() < 0.05
