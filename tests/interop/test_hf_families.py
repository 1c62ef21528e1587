"""Every supported Hugging Face family against transformers' own implementation: import gives equal logits,
export reloads with equal logits (also pruned and top-1, where the family can express it), unsupported
config values fail with one line. Tiny random checkpoints are built locally; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moetrain.config import ConfigError
from moetrain.interop.hf import hf_configs, load_hf, save_hf

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
DEEPSEEK = dict(
    intermediate_size=40,
    moe_intermediate_size=24,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
# YaRN with every knob that changes numbers: blended frequencies, cos/sin factor, MLA softmax scale
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=16,
    mscale=0.707,
    mscale_all_dim=1.0,
)
# (model_type, config kwargs): together they cover every variant the importer knows
FAMILIES = {
    "mixtral": ("mixtral", dict(num_key_value_heads=2, intermediate_size=24, num_local_experts=4)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_key_value_heads=2,
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=36,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_key_value_heads=2,
            head_dim=16,  # != hidden_size / heads
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=True,
            attention_bias=True,
        ),
    ),
    "qwen3_moe_yarn": (
        "qwen3_moe",
        dict(
            num_key_value_heads=2, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, rope_parameters=YARN
        ),
    ),
    "olmoe": (
        "olmoe",
        dict(
            num_key_value_heads=2,
            intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            clip_qkv=1.5,
            tie_word_embeddings=True,
            eos_token_id=1,
        ),
    ),
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            **DEEPSEEK,
            n_shared_experts=2,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
        ),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(**DEEPSEEK, n_shared_experts=1, q_lora_rank=12, n_group=2, topk_group=1, norm_topk_prob=True),
    ),
    "deepseek_v3_yarn": (
        "deepseek_v3",
        dict(**DEEPSEEK, n_shared_experts=1, q_lora_rank=12, n_group=1, topk_group=1, rope_parameters=YARN),
    ),
    "deepseek_v3_plain": (
        "deepseek_v3",
        dict(**DEEPSEEK, n_shared_experts=1, q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False),
    ),
}


def tiny_checkpoint(name: str, path, vocab_size: int = VOCAB, spec: tuple[str, dict] | None = None):
    """A random transformers model of family ``name`` (or of ``spec``: model type and config kwargs) saved in its
    published on-disk layout under ``path``."""
    model_type, kwargs = spec or FAMILIES[name]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, "vocab_size": vocab_size}, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the default init so routing, norms and every path matter
        for p in model.parameters():
            p.normal_(0, 0.3)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "hf"
    return request.param, path, tiny_checkpoint(request.param, path)


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(TOKENS)
    return out.logits if hasattr(out, "logits") else out.logits_BSV


def assert_logits_close(ours, theirs):
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale, float((ours - theirs).abs().max() / scale)


def reload(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_import_equals_transformers(family):
    name, path, hf = family
    expected = logits(hf)
    ours, _, _ = load_hf(path)
    assert_logits_close(logits(ours), expected)
    from_object, _, _ = load_hf(hf)  # a transformers model object imports the same
    assert_logits_close(logits(from_object), expected)


def test_export_reloads_in_transformers(family, tmp_path):
    name, path, hf = family
    ours, model_cfg, moe_cfg = load_hf(path)
    save_hf(ours, model_cfg, moe_cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == FAMILIES[name][0]
    assert_logits_close(logits(reload(tmp_path / "out")), logits(ours))


def prune_to_top1(model, moe_cfg) -> int:
    """Mask one expert of every group (one of all when ungrouped) in each MoE layer and route top-1; returns
    the experts left."""
    E, groups = moe_cfg.num_experts, moe_cfg.n_group
    keep = torch.ones(E, dtype=torch.bool)
    keep[1 :: E // groups] = False  # expert 1 of each group
    for core in model.moe_layers():
        core.set_expert_mask(keep)
        core.top_k = 1
    return int(keep.sum())


def test_pruned_top1_model_exports_with_equal_logits(family, tmp_path):
    name, path, _ = family
    ours, model_cfg, moe_cfg = load_hf(path)
    kept = prune_to_top1(ours, moe_cfg)
    if name == "mixtral":
        # moetrain's top-1 gate is the raw p1; Mixtral always renormalises (its top-1 gate is 1.0)
        with pytest.raises(ConfigError, match=r"^moe.top_k=1 with moe.renormalize_top1=False cannot be expressed"):
            save_hf(ours, model_cfg, moe_cfg, tmp_path / "out")
        for core in ours.moe_layers():
            core.router.renormalize_top1 = True
    save_hf(ours, model_cfg, moe_cfg, tmp_path / "out")
    written = AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert written.num_experts_per_tok == 1
    assert num_experts(written) == kept < moe_cfg.num_experts
    assert_logits_close(logits(reload(tmp_path / "out")), logits(ours))


def num_experts(hf_cfg) -> int:
    names = {"mixtral": "num_local_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}
    return getattr(hf_cfg, names.get(hf_cfg.model_type, "num_experts"))


def test_a_physically_smaller_model_exports(tmp_path):
    """Fewer experts by construction (as pruning surgery leaves them), not by mask."""
    path = tmp_path / "hf"
    tiny_checkpoint("qwen3_moe", path)
    ours, model_cfg, moe_cfg = load_hf(path)
    keep = torch.tensor([0, 2])
    moe_cfg.num_experts, moe_cfg.top_k = 2, 1
    from moetrain.model import build_model

    small = build_model(model_cfg, moe_cfg)
    state = ours.state_dict()
    for name, t in state.items():
        if ".ffn.router." in name or ".ffn.experts." in name:
            state[name] = t[keep]
    small.load_state_dict(state)
    save_hf(small, model_cfg, moe_cfg, tmp_path / "out")
    assert num_experts(AutoConfig.from_pretrained(str(tmp_path / "out"))) == 2
    assert_logits_close(logits(reload(tmp_path / "out")), logits(small))


def base_config(name: str) -> dict:
    model_type, kwargs = FAMILIES[name]
    return json.loads(AutoConfig.for_model(model_type, **COMMON, **kwargs).to_json_string())


UNSUPPORTED = [
    ("mixtral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
    (
        "qwen3_moe",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        "rope_parameters.rope_type=linear",
    ),
    ("olmoe", {"hidden_act": "gelu"}, "hidden_act=gelu"),
    ("olmoe", {"head_dim": 16}, "head_dim=16"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method=noaux_tc"),
    ("deepseek_v2", {"mlp_bias": True}, "mlp_bias=True"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func=softmax"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias=True"),
    ("mixtral", {"model_type": "llama"}, "model_type=llama"),
]


@pytest.mark.parametrize(("name", "change", "key_value"), UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_unsupported_config_values_fail_with_one_line(name, change, key_value):
    with pytest.raises(ConfigError) as err:
        hf_configs({**base_config(name), **change})
    msg = str(err.value)
    assert msg.startswith(f"{key_value} is not supported; allowed: "), msg
    assert "\n" not in msg


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    path = tmp_path / "hf"
    tiny_checkpoint("qwen3_moe", path)
    ours, model_cfg, moe_cfg = load_hf(path)
    with pytest.raises(ConfigError, match=r"^model.qkv_bias=True cannot be expressed as mixtral; allowed: false$"):
        save_hf(ours, model_cfg, moe_cfg, tmp_path / "out", family="mixtral")
    ours.moe_layers()[0].router.bias_E[0] = 0.1  # aux-loss-free balancing moved a selection bias
    with pytest.raises(ConfigError, match=r"^moe.bias_update_rate=0.0: .* cannot be expressed as qwen3_moe"):
        save_hf(ours, model_cfg, moe_cfg, tmp_path / "out")
    ours.moe_layers()[0].router.bias_E.zero_()
    ours.moe_layers()[0].set_expert_mask(torch.tensor([True, True, True, False]))
    with pytest.raises(ConfigError, match=r"^moe.num_experts per layer=.* cannot be exported"):
        save_hf(ours, model_cfg, moe_cfg, tmp_path / "out")

    tiny_checkpoint("deepseek_v2", tmp_path / "v2")
    v2, v2_model, v2_moe = load_hf(tmp_path / "v2")
    for core in v2.moe_layers():
        core.router.renormalize = True
    with pytest.raises(
        ConfigError, match=r"^moe.top_k=2 with renormalised gates .* cannot be expressed as deepseek_v2"
    ):
        save_hf(v2, v2_model, v2_moe, tmp_path / "out")


def test_deepspeed_backend_imports_and_exports(tmp_path):
    """model.init_from with moe.backend=deepspeed: DeepSpeed's per-expert layers get the same weights."""
    from dataclasses import replace

    from moetrain.config import TrainConfig
    from moetrain.interop.hf import load_hf_weights
    from moetrain.model import build_model

    hf = tiny_checkpoint("deepseek_v3", tmp_path / "hf")
    _, model_cfg, moe_cfg = load_hf(tmp_path / "hf")
    cfg = TrainConfig(model=model_cfg, moe=replace(moe_cfg, backend="deepspeed"))
    model = build_model(cfg.model, cfg.moe)
    load_hf_weights(model, cfg)
    assert_logits_close(logits(model), logits(hf))
    save_hf(model, cfg.model, cfg.moe, tmp_path / "out")
    assert_logits_close(logits(reload(tmp_path / "out")), logits(hf))
