"""Hugging Face interchange for the Mixtral family: a local directory (config.json + safetensors) to a
moetrain model and back.

The on-disk layout is Mixtral's published one (transformers converts it to its fused in-memory layout on
load): ``block_sparse_moe.gate.weight`` (E, D) is our ``router.weight_ED``; per expert e,
``block_sparse_moe.experts.{e}.w1.weight`` / ``w3.weight`` (F, D) are ``w1_EDF[e].T`` / ``w3_EDF[e].T`` and
``w2.weight`` (D, F) is ``w2_EFD[e].T``. Attention, norms, embeddings and the LM head map one to one.
Unsupported config values fail with one line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moetrain.config import ConfigError, ModelConfig, MoEConfig, TrainConfig
from moetrain.model.transformer import MoETransformer, build_model


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.rope_type={rope.get('rope_type')} is not supported; allowed: default")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def mixtral_configs(hf: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    """Our model and MoE configs for a Mixtral ``config.json`` (as a dict)."""
    if hf.get("model_type") != "mixtral":
        raise ConfigError(f"model_type={hf.get('model_type')} is not supported by this importer; allowed: mixtral")
    checks = {
        "hidden_act": (hf.get("hidden_act", "silu"), lambda v: v == "silu", "allowed: silu"),
        "sliding_window": (hf.get("sliding_window"), lambda v: v is None, "allowed: null (full attention)"),
        "num_experts_per_tok": (
            hf["num_experts_per_tok"],
            lambda v: v >= 2,
            "Mixtral renormalises a single gate to 1.0, which moetrain's top-1 (raw p1) differs from; allowed: >= 2",
        ),
    }
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    checks["head_dim"] = (
        head_dim,
        lambda v: v * hf["num_attention_heads"] == hf["hidden_size"],
        "allowed: hidden_size / num_attention_heads",
    )
    for key, (value, ok, allowed) in checks.items():
        if not ok(value):
            raise ConfigError(f"{key}={value} is not supported; {allowed}")
    model = ModelConfig(
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        d_ff=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        seq_len=hf["max_position_embeddings"],
        moe_every=1,
        rope_theta=_rope_theta(hf),
        norm_eps=hf["rms_norm_eps"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    moe = MoEConfig(
        num_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        renormalize=True,
        score_func="softmax",
        capacity_factor=None,
    )
    return model, moe


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.init_from: no *.safetensors file in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


PER_LAYER = (
    ("attn.wq", "self_attn.q_proj"),
    ("attn.wk", "self_attn.k_proj"),
    ("attn.wv", "self_attn.v_proj"),
    ("attn.wo", "self_attn.o_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn.router", "block_sparse_moe.gate"),
)
EXPERT_WEIGHTS = (("w1", "w1_EDF"), ("w3", "w3_EDF"), ("w2", "w2_EFD"))  # Mixtral per-expert name, our stacked name


def _one_to_one(model_cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, Mixtral name) of every tensor that maps without reshaping."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not model_cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i in range(model_cfg.n_layers):
        suffix = {"ffn.router": "weight_ED"}
        pairs += [
            (f"layers.{i}.{ours}.{suffix.get(ours, 'weight')}", f"model.layers.{i}.{theirs}.weight")
            for ours, theirs in PER_LAYER
        ]
    return pairs


def mixtral_to_moetrain(
    hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig, num_experts: int
) -> dict[str, torch.Tensor]:
    out = {ours: hf_state[theirs] for ours, theirs in _one_to_one(model_cfg)}
    for i in range(model_cfg.n_layers):
        for theirs, ours in EXPERT_WEIGHTS:
            experts = [
                hf_state[f"model.layers.{i}.block_sparse_moe.experts.{e}.{theirs}.weight"].t()
                for e in range(num_experts)
            ]
            out[f"layers.{i}.ffn.experts.{ours}"] = torch.stack(experts).contiguous()
    return out


def moetrain_to_mixtral(state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {theirs: state[ours] for ours, theirs in _one_to_one(model_cfg)}
    for i in range(model_cfg.n_layers):
        for theirs, ours in EXPERT_WEIGHTS:
            for e, weight in enumerate(state[f"layers.{i}.ffn.experts.{ours}"].unbind(0)):
                out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{theirs}.weight"] = weight.t()
    return {k: v.contiguous() for k, v in out.items()}


def hf_path(init_from: str) -> Path:
    if not init_from.startswith("hf:"):
        raise ConfigError(f"model.init_from={init_from} is not supported; allowed: hf:PATH (a local directory)")
    path = Path(init_from[3:]).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.init_from={init_from} has no config.json")
    return path


def apply_hf_architecture(cfg: TrainConfig) -> None:
    """Replace the architecture keys of ``cfg`` by the checkpoint's (training keys such as model.seq_len,
    capacity and coefficients stay as the recipe sets them)."""
    hf_model, hf_moe = mixtral_configs(json.loads((hf_path(cfg.model.init_from) / "config.json").read_text()))
    for key in (
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "d_ff",
        "vocab_size",
        "moe_every",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
    ):
        setattr(cfg.model, key, getattr(hf_model, key))
    for key in ("num_experts", "top_k", "score_func", "renormalize"):
        setattr(cfg.moe, key, getattr(hf_moe, key))


def load_hf_weights(model: MoETransformer, cfg: TrainConfig) -> None:
    """Copy the checkpoint's weights into ``model``; expert-parallel layers keep their own experts' slice."""
    path = hf_path(cfg.model.init_from)
    state = mixtral_to_moetrain(_read_safetensors(path), cfg.model, cfg.moe.num_experts)
    for name, layer in model.named_modules():
        if getattr(layer, "ep_size", 1) > 1 and hasattr(layer, "experts"):
            first = layer.ep_rank * layer.num_local_experts
            for w in ("w1_EDF", "w3_EDF", "w2_EFD"):
                key = f"{name}.experts.{w}"
                state[key] = state[key][first : first + layer.num_local_experts].contiguous()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("bias_E", "active_E"))]:
        raise ValueError(f"model.init_from: weights do not match the model: missing {missing}, unexpected {unexpected}")


def load_mixtral(path: str | Path) -> tuple[MoETransformer, ModelConfig, MoEConfig]:
    """A moetrain model with the weights of the Mixtral checkpoint in ``path`` (config.json + safetensors)."""
    path = Path(path)
    hf_cfg = json.loads((path / "config.json").read_text())
    model_cfg, moe_cfg = mixtral_configs(hf_cfg)
    model = build_model(model_cfg, moe_cfg)
    cfg = TrainConfig(model=model_cfg, moe=moe_cfg)
    cfg.model.init_from = f"hf:{path}"
    load_hf_weights(model, cfg)
    return model, model_cfg, moe_cfg


def save_mixtral(model: MoETransformer, model_cfg: ModelConfig, moe_cfg: MoEConfig, path: str | Path) -> None:
    """Write ``model`` as a Mixtral checkpoint loadable by ``AutoModelForCausalLM.from_pretrained``."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    layers = model.moe_layers()
    top_k = layers[0].top_k if layers else moe_cfg.top_k
    if top_k < 2 or model_cfg.moe_every != 1 or model_cfg.tie_embeddings:
        raise ConfigError(
            f"moe.top_k={top_k} / model.moe_every={model_cfg.moe_every} / model.tie_embeddings="
            f"{model_cfg.tie_embeddings} cannot be expressed as Mixtral; allowed: top_k >= 2, moe_every=1, untied"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = MixtralConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.d_model,
        intermediate_size=model_cfg.d_ff,
        num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads,
        num_key_value_heads=model_cfg.n_kv_heads,
        max_position_embeddings=model_cfg.seq_len,
        rms_norm_eps=model_cfg.norm_eps,
        num_local_experts=moe_cfg.num_experts,
        num_experts_per_tok=top_k,
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        tie_word_embeddings=False,
    )
    hf_cfg.save_pretrained(str(path))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(moetrain_to_mixtral(state, model_cfg), str(path / "model.safetensors"), metadata={"format": "pt"})
