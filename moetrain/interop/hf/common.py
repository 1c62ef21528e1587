"""What every Hugging Face family shares: the spec a family module fills in, config checks that fail with one
line, and the tensor-name mapping between a family's published on-disk layout and our state dict.

Shape legend: E experts, D model dim, F expert hidden dim.

A family is described by data, not code paths: :class:`Layout` says where a family keeps each tensor (all
families share embeddings, norms and attention names; they differ in the MoE block's prefix, the expert
tensor names, and whether a shared expert, its gate or a router bias exist). :class:`Family` adds the two
config mappings (``config.json`` -> our configs, our configs -> ``config.json`` keys), each of which raises
:class:`ConfigError` for what the other side cannot express.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrain.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig, error_line, is_moe_layer
from moetrain.train.checkpoint import file_problem

EXPERT_TENSORS = ("w1_EDF", "w3_EDF", "w2_EFD")  # our stacked expert weights, in the order of Layout.experts


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its tensors, relative to ``model.layers.{i}.``."""

    moe: str = "mlp"  # the MoE block
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names of w1, w3, w2
    shared: str | None = None  # the shared-expert FFN inside the MoE block
    shared_gate: str | None = None  # its per-token sigmoid gate (Linear D -> 1)
    router_bias: str | None = None  # the router's selection bias (our bias_E), e.g. e_score_correction_bias
    dense: str = "mlp"  # a dense layer's FFN


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family: its ``model_type``, on-disk layout and config mappings both ways."""

    model_type: str
    layout: Layout
    # a transformers config of this family -> our model and MoE configs (ConfigError: not supported)
    to_moetrain: Callable[[Any], tuple[ModelConfig, MoEConfig]]
    # our configs (the MoE config as the model routes *now*: expert count, top-k, gating) -> the family's
    # config.json keys (ConfigError: the family cannot express it)
    to_hf: Callable[[ModelConfig, MoEConfig], dict[str, Any]]


# ---------------------------------------------------------------------------------------------- config checks
def unsupported(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value} is not supported; allowed: {allowed}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the one-line ``key=value is not supported; allowed: ...`` unless ``ok``."""
    if not ok:
        raise unsupported(key, value, allowed)


YARN_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


def rope_settings(c: Any) -> tuple[float, RopeScalingConfig]:
    """The RoPE base and scaling of a transformers config: plain RoPE or YaRN."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    require(kind in ("default", "yarn"), "rope_parameters.rope_type", kind, "default, yarn")
    factor = rope.get("partial_rotary_factor", 1.0)
    require(factor == 1.0, "rope_parameters.partial_rotary_factor", factor, "1.0")
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    if kind == "default":
        return theta, RopeScalingConfig()
    original = rope.get("original_max_position_embeddings") or c.max_position_embeddings
    scaling = RopeScalingConfig(
        type="yarn",
        factor=float(rope.get("factor") or c.max_position_embeddings / original),
        original_max_position_embeddings=int(original),
        **{k: rope[k] for k in YARN_KEYS if rope.get(k) is not None},
    )
    return theta, scaling


def rope_parameters_hf(m: ModelConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for our RoPE settings."""
    s = m.rope_scaling
    if s.type == "default":
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    params = {k: getattr(s, k) for k in YARN_KEYS if getattr(s, k) is not None}
    return {
        "rope_type": "yarn",
        "rope_theta": m.rope_theta,
        "factor": s.factor,
        "original_max_position_embeddings": s.original_max_position_embeddings or m.seq_len,
        **params,
    }


def common_model_config(c: Any, **arch: Any) -> ModelConfig:
    """Our model config from the keys every family shares, plus the family's ``arch`` keys."""
    act = getattr(c, "hidden_act", "silu")
    require(act == "silu", "hidden_act", act, "silu (SwiGLU experts)")
    theta, scaling = rope_settings(c)
    return ModelConfig(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=arch.pop("n_kv_heads", c.num_key_value_heads),
        vocab_size=c.vocab_size,
        seq_len=c.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        **arch,
    )


def require_natural_head_dim(c: Any) -> None:
    """Families whose attention assumes head_dim = hidden_size / num_attention_heads."""
    head_dim, natural = getattr(c, "head_dim", None), c.hidden_size // c.num_attention_heads
    require(head_dim in (None, natural), "head_dim", head_dim, f"null or {natural} (hidden_size / num_attention_heads)")


def common_hf_config(m: ModelConfig) -> dict[str, Any]:
    """The config.json keys every family shares, from our model config."""
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": rope_parameters_hf(m),
    }


def cannot_express(family: str, key: str, value: Any, allowed: str) -> ConfigError:
    """An export failure: our model has something the family's config cannot say."""
    return ConfigError(f"{key}={value} cannot be expressed as {family}; allowed: {allowed}")


def expect(ok: bool, family: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise cannot_express(family, key, value, allowed)


def normalizes_gates(moe: MoEConfig) -> bool:
    """Whether our router renormalises the chosen gates at ``moe.top_k`` (a family's ``norm_topk_prob``)."""
    return moe.renormalize and (moe.top_k > 1 or moe.renormalize_top1)


def expect_gqa(family: str, m: ModelConfig, *, qkv_bias: bool | None, out_bias: bool | None, qk_norm: str) -> None:
    """Export checks of grouped-query attention; ``None``: the family can express either value."""
    expect(m.attention == "gqa", family, "model.attention", m.attention, "gqa")
    for key, want in (("qkv_bias", qkv_bias), ("out_bias", out_bias)):
        expect(want is None or getattr(m, key) == want, family, f"model.{key}", getattr(m, key), str(want).lower())
    expect(m.qk_norm == qk_norm, family, "model.qk_norm", m.qk_norm, qk_norm)
    expect(not m.rope_interleave, family, "model.rope_interleave", m.rope_interleave, "false")


def expect_softmax_router(family: str, moe: MoEConfig) -> None:
    expect(moe.score_func == "softmax", family, "moe.score_func", moe.score_func, "softmax")
    expect(moe.routed_scaling_factor == 1.0, family, "moe.routed_scaling_factor", moe.routed_scaling_factor, "1.0")
    expect(moe.n_group == 1, family, "moe.n_group", moe.n_group, "1 (no group-limited routing)")


def softmax_routing_hf(family: str, moe: MoEConfig) -> dict[str, Any]:
    """The router keys of the families with a plain softmax router and ``norm_topk_prob`` (Qwen, OLMoE)."""
    expect_softmax_router(family, moe)
    return {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": normalizes_gates(moe)}


def one_attention_bias_hf(family: str, m: ModelConfig) -> dict[str, Any]:
    """Families whose one ``attention_bias`` covers the q/k/v and output projections alike."""
    expect(
        m.qkv_bias == m.out_bias,
        family,
        "model.qkv_bias",
        m.qkv_bias,
        f"model.out_bias={m.out_bias} (one attention_bias)",
    )
    return {"attention_bias": m.qkv_bias}


def expect_natural_head_dim(family: str, m: ModelConfig) -> None:
    natural = m.d_model // m.n_heads
    expect(
        m.head_dim in (None, natural), family, "model.head_dim", m.head_dim, f"null or {natural} (d_model / n_heads)"
    )


def expect_no_shared_expert(family: str, m: ModelConfig) -> None:
    expect(m.shared_d_ff == 0, family, "model.shared_d_ff", m.shared_d_ff, "0 (no shared expert)")


def expect_all_moe(family: str, m: ModelConfig) -> None:
    dense = [i for i in range(m.n_layers) if not is_moe_layer(i, m)]
    expect(not dense, family, "dense layers", dense, "none (every layer is an MoE layer)")


def dense_layer_indices(m: ModelConfig) -> list[int]:
    return [i for i in range(m.n_layers) if not is_moe_layer(i, m)]


# ---------------------------------------------------------------------------------------------- tensor names
def _ffn_names(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [
        (f"{ours}.{w}.weight", f"{theirs}.{t}.weight")
        for w, t in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    ]


def _attention_names(m: ModelConfig) -> list[tuple[str, str]]:
    if m.attention == "mla":
        q = (
            [("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")]
            if m.mla.q_lora_rank is not None
            else [("wq", "q_proj")]
        )
        pairs = [
            *q,
            ("wkv_a", "kv_a_proj_with_mqa"),
            ("kv_norm", "kv_a_layernorm"),
            ("wkv_b", "kv_b_proj"),
            ("wo", "o_proj"),
        ]
        return [(f"attn.{a}.weight", f"self_attn.{b}.weight") for a, b in pairs]
    proj = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
    out = [(f"attn.{a}.weight", f"self_attn.{b}.weight") for a, b in proj]
    biased = [p for p in proj[:3] if m.qkv_bias] + [proj[3]] * m.out_bias
    out += [(f"attn.{a}.bias", f"self_attn.{b}.bias") for a, b in biased]
    if m.qk_norm != "none":
        out += [("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight")]
    return out


def one_to_one_names(m: ModelConfig, layout: Layout) -> list[tuple[str, str]]:
    """(our name, on-disk name) of every tensor that maps without reshaping: all but the stacked experts."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not m.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    attention = _attention_names(m)
    for i in range(m.n_layers):
        local = [("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight")]
        local += attention
        if is_moe_layer(i, m):
            local.append(("ffn.router.weight_ED", f"{layout.moe}.gate.weight"))
            if layout.router_bias:
                local.append(("ffn.router.bias_E", f"{layout.moe}.gate.{layout.router_bias}"))
            if m.shared_d_ff:
                local += _ffn_names("shared.ffn", f"{layout.moe}.{layout.shared}")
            if m.shared_expert_gate:
                local.append(("shared.gate.weight", f"{layout.moe}.{layout.shared_gate}.weight"))
        else:
            local += _ffn_names("ffn", layout.dense)
        pairs += [(f"layers.{i}.{a}", f"model.layers.{i}.{b}") for a, b in local]
    return pairs


def expert_name(layout: Layout, layer: int, expert: int, which: int) -> str:
    return f"model.layers.{layer}.{layout.moe}.experts.{expert}.{layout.experts[which]}.weight"


def hf_to_moetrain(
    hf_state: dict[str, torch.Tensor], m: ModelConfig, layout: Layout, num_experts: int
) -> dict[str, torch.Tensor]:
    """Our state dict from a family's on-disk tensors. Per expert the on-disk weights are ``nn.Linear``
    (out, in) matrices: ``w1``/``w3`` (F, D) and ``w2`` (D, F); ours stack their transposes."""
    missing = [theirs for _, theirs in one_to_one_names(m, layout) if theirs not in hf_state]
    if missing:
        raise ValueError(
            f"model.init_from: the checkpoint lacks {len(missing)} tensors the config implies: {missing[:4]}"
        )
    out = {ours: hf_state[theirs] for ours, theirs in one_to_one_names(m, layout)}
    for i in range(m.n_layers):
        if not is_moe_layer(i, m):
            continue
        for which, ours in enumerate(EXPERT_TENSORS):
            stacked = [hf_state[expert_name(layout, i, e, which)].t() for e in range(num_experts)]
            out[f"layers.{i}.ffn.experts.{ours}"] = torch.stack(stacked).contiguous()
    return out


def moetrain_to_hf(state: dict[str, torch.Tensor], m: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """A family's on-disk tensors from our state dict (inverse of :func:`hf_to_moetrain`)."""
    out = {theirs: state[ours] for ours, theirs in one_to_one_names(m, layout)}
    for i in range(m.n_layers):
        if not is_moe_layer(i, m):
            continue
        for which, ours in enumerate(EXPERT_TENSORS):
            for e, weight in enumerate(state[f"layers.{i}.ffn.experts.{ours}"].unbind(0)):
                out[expert_name(layout, i, e, which)] = weight.t()
    return {k: v.contiguous() for k, v in out.items()}


def unused_tensors(hf_state: dict[str, torch.Tensor], m: ModelConfig, layout: Layout, num_experts: int) -> list[str]:
    """On-disk tensors the conversion would ignore, except the ones that are safe to ignore: layers past
    ``n_layers`` (DeepSeek-V3's multi-token-prediction layer), a tied ``lm_head`` and rotary caches."""
    used = {theirs for _, theirs in one_to_one_names(m, layout)}
    used |= {
        expert_name(layout, i, e, w)
        for i in range(m.n_layers)
        if is_moe_layer(i, m)
        for e in range(num_experts)
        for w in range(3)
    }
    unused = []
    for name in hf_state:
        parts = name.split(".")
        extra_layer = name.startswith("model.layers.") and int(parts[2]) >= m.n_layers
        if name in used or extra_layer or name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
            continue
        unused.append(name)
    return unused


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, checked cheaply (headers, and that the tensors fit each file)
    before anything loads them; ConfigError naming ``model.init_from`` and the file otherwise."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"model.init_from=hf:{path} has no *.safetensors file; allowed: hf:PATH of a folder with config.json "
            "and *.safetensors"
        )
    for f in files:
        problem = file_problem(f)
        if problem:
            raise ConfigError(f"model.init_from=hf:{path} has a corrupt {f.name} ({problem}); allowed: intact weights")
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - damage the header check cannot see, named instead of a traceback
            raise ConfigError(
                f"model.init_from=hf:{path} has a corrupt {f.name} ({error_line(e)}); allowed: intact weights"
            ) from e
    return state


def routing_config(num_experts: int, top_k: int, norm_topk_prob: bool, **routing: Any) -> MoEConfig:
    """Our MoE config for a family's router. ``renormalize_top1`` is set only when the checkpoint itself is
    top-1 with renormalised gates (its logits need it); for a top-k >= 2 checkpoint, how a later switch to
    top-1 gates stays the recipe's choice (raw p1 by default)."""
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        renormalize=bool(norm_topk_prob),
        renormalize_top1=bool(norm_topk_prob) and top_k == 1,
        capacity_factor=None,
        **routing,
    )
