"""Import and export: a local Hugging Face directory (or a transformers model object) of a supported family to
a moetrain model, and a moetrain model back to a directory ``AutoModelForCausalLM.from_pretrained`` loads.

Shape legend: E experts, K experts per token.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetrain.config import ConfigError, ModelConfig, MoEConfig, TrainConfig, error_line
from moetrain.interop.export import native_state_dict
from moetrain.interop.hf import deepseek_v2, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe
from moetrain.interop.hf.backend_names import moe_parts, to_model_names
from moetrain.interop.hf.common import (
    EXPERT_TENSORS,
    Family,
    hf_to_moetrain,
    moetrain_to_hf,
    read_safetensors,
    unused_tensors,
)
from moetrain.model.transformer import MoETransformer, build_model

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, deepseek_v2.FAMILY, deepseek_v3.FAMILY)
}
# architecture keys a checkpoint fixes; everything else (model.seq_len, capacity, coefficients...) stays the recipe's
MODEL_ARCH_KEYS = tuple(k for k in ModelConfig.__dataclass_fields__ if k not in ("seq_len", "init_std", "init_from"))
MOE_ARCH_KEYS = ("num_experts", "top_k", "score_func", "renormalize", "routed_scaling_factor", "n_group", "topk_group",
                 "group_score")  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


# ---------------------------------------------------------------------------------------------- configs
def family_of(model_type: Any) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type={model_type} is not supported; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def as_transformers_config(hf: Any):
    """A transformers config object from a ``config.json`` dict (transformers fills the family's defaults
    for keys an older file lacks, and reads legacy ``rope_theta`` / ``rope_scaling``)."""
    if not isinstance(hf, dict):
        return hf
    from transformers import AutoConfig

    family_of(hf.get("model_type"))
    kwargs = {k: v for k, v in hf.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(hf["model_type"], **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model_type={hf['model_type']} config.json is invalid: {str(e).splitlines()[0]}") from e


def hf_configs(hf: Any) -> tuple[Family, ModelConfig, MoEConfig]:
    """The family and our model / MoE configs of a ``config.json`` dict or transformers config."""
    c = as_transformers_config(hf)
    family = family_of(c.model_type)
    model_cfg, moe_cfg = family.to_moetrain(c)
    return family, model_cfg, moe_cfg


def mixtral_configs(hf: dict[str, Any]) -> tuple[ModelConfig, MoEConfig]:
    """Our model and MoE configs for a Mixtral ``config.json`` (as a dict)."""
    if hf.get("model_type") != "mixtral":
        raise ConfigError(f"model_type={hf.get('model_type')} is not supported by this importer; allowed: mixtral")
    _, model_cfg, moe_cfg = hf_configs(hf)
    return model_cfg, moe_cfg


HF_DIR_ALLOWED = "allowed: hf:PATH of a local Hugging Face folder (config.json + *.safetensors)"


def hf_path(init_from: str) -> Path:
    if not init_from.startswith("hf:"):
        raise ConfigError(f"model.init_from={init_from} is not supported; allowed: hf:PATH (a local directory)")
    path = Path(init_from[3:]).expanduser()
    if not (path / "config.json").is_file():
        where = " (no such folder)" if not path.exists() else " (not a folder)" if not path.is_dir() else ""
        raise ConfigError(f"model.init_from={init_from} has no config.json{where}; {HF_DIR_ALLOWED}")
    return path


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict; ConfigError naming ``model.init_from`` and the file when it is not
    readable JSON, not an object, or names no ``model_type`` (the JSON parser's traceback says neither)."""
    f = path / "config.json"
    kv = f"model.init_from=hf:{path}"
    try:
        hf = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(
            f"{kv} has a config.json that is not readable JSON ({error_line(e)}); {HF_DIR_ALLOWED}"
        ) from e
    if not isinstance(hf, dict):
        raise ConfigError(f"{kv} has a config.json that is a JSON {type(hf).__name__}, not an object; {HF_DIR_ALLOWED}")
    if not isinstance(hf.get("model_type"), str):
        raise ConfigError(f"{kv} has a config.json without a model_type; allowed: {', '.join(FAMILIES)}")
    return hf


def apply_hf_architecture(cfg: TrainConfig) -> None:
    """Replace the architecture keys of ``cfg`` by the checkpoint's (training keys such as model.seq_len,
    capacity and coefficients stay as the recipe sets them). ``moe.renormalize_top1`` stays the recipe's
    choice unless the checkpoint is itself top-1 with renormalised gates."""
    hf = read_config(hf_path(cfg.model.init_from))
    try:
        _, hf_model, hf_moe = hf_configs(hf)
    except ConfigError:  # a value the mapping refuses: it names the config.json key
        raise
    except Exception as e:  # noqa: BLE001 - a mistyped value fails deep inside transformers' config classes
        raise ConfigError(
            f"model.init_from={cfg.model.init_from} has a config.json transformers cannot read ({error_line(e)}); "
            f"allowed: a config.json that {hf['model_type']}'s transformers config accepts"
        ) from e
    for key in MODEL_ARCH_KEYS:
        setattr(cfg.model, key, getattr(hf_model, key))
    for key in MOE_ARCH_KEYS:
        setattr(cfg.moe, key, getattr(hf_moe, key))
    cfg.moe.renormalize_top1 = cfg.moe.renormalize_top1 or hf_moe.renormalize_top1


# ---------------------------------------------------------------------------------------------- import
def _convert(hf_state: dict[str, torch.Tensor], family: Family, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    unused = unused_tensors(hf_state, cfg.model, family.layout, cfg.moe.num_experts)
    if unused:
        raise ValueError(
            f"model.init_from: {len(unused)} tensors of the checkpoint have no place in the {family.model_type} "
            f"model its config describes (an unsupported feature?): {unused[:4]}"
        )
    return hf_to_moetrain(hf_state, cfg.model, family.layout, cfg.moe.num_experts)


def _load_converted(model: MoETransformer, state: dict[str, torch.Tensor]) -> None:
    """Copy native-named tensors into ``model`` (any backend; expert-parallel layers take their slice)."""
    missing, unexpected = model.load_state_dict(to_model_names(model, state), strict=False)
    tied = ("lm_head.weight",) if model.cfg.tie_embeddings else ()  # the embedding's own tensor
    if unexpected or [k for k in missing if not k.endswith(("bias_E", "active_E")) and k not in tied]:
        raise ValueError(f"model.init_from: weights do not match the model: missing {missing}, unexpected {unexpected}")


def load_hf_weights(model: MoETransformer, cfg: TrainConfig) -> None:
    """Copy the weights of ``model.init_from``'s checkpoint into ``model`` (built from ``cfg``, whose
    architecture :func:`apply_hf_architecture` set)."""
    path = hf_path(cfg.model.init_from)
    family = family_of(read_config(path).get("model_type"))
    _load_converted(model, _convert(read_safetensors(path), family, cfg))


def _transformers_state(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's tensors in its family's on-disk layout (what save_pretrained would write)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return revert_weight_conversion(hf_model, state)


def load_hf(source: str | Path | nn.Module) -> tuple[MoETransformer, ModelConfig, MoEConfig]:
    """A moetrain model equal to ``source``: a local Hugging Face directory (config.json + safetensors) or a
    transformers ``PreTrainedModel`` of a supported family. Returns (model, model config, MoE config)."""
    if isinstance(source, nn.Module):
        family, model_cfg, moe_cfg = hf_configs(source.config)
        hf_state = _transformers_state(source)
    else:
        path = Path(source).expanduser()
        family, model_cfg, moe_cfg = hf_configs(read_config(hf_path(f"hf:{path}")))
        model_cfg.init_from = f"hf:{path}"
        hf_state = read_safetensors(path)
    model = build_model(model_cfg, moe_cfg)
    _load_converted(model, _convert(hf_state, family, TrainConfig(model=model_cfg, moe=moe_cfg)))
    return model, model_cfg, moe_cfg


def load_mixtral(path: str | Path) -> tuple[MoETransformer, ModelConfig, MoEConfig]:
    """A moetrain model with the weights of the Mixtral checkpoint in ``path`` (config.json + safetensors)."""
    mixtral_configs(read_config(Path(path)))  # a clear error for another family
    return load_hf(path)


# ---------------------------------------------------------------------------------------------- export
def routing_now(model: MoETransformer, moe_cfg: MoEConfig) -> tuple[MoEConfig, dict[int, torch.Tensor]]:
    """The MoE config as the model routes *now* (runtime top-k, experts left unmasked, the routers' gating)
    and each MoE layer's kept-expert mask. Fails when layers disagree: a family's config has one value."""
    blocks = [(i, core) for i, core, _ in moe_parts(model)]
    constants = {i: layer.num_constants for i, layer in blocks if getattr(layer, "num_constants", 0)}
    if constants:
        raise ConfigError(
            f"prune.mode=mone: MoNE constants (layer: count {constants}) cannot be exported to a Hugging Face "
            "family (an expert there is an FFN, not a fixed vector); allowed: prune.mode=drop, merge or merge_ream, "
            "or the run's native export/"
        )
    keep = {i: layer.base_router.active_E.detach().cpu().clone() for i, layer in blocks}
    counts = {i: int(k.sum()) for i, k in keep.items()}
    top_ks = {i: layer.top_k for i, layer in blocks}
    if len(set(counts.values())) > 1:
        raise ConfigError(
            f"moe.num_experts per layer={counts} cannot be exported; allowed: the same count in every layer"
        )
    if len(set(top_ks.values())) > 1:
        raise ConfigError(f"moe.top_k per layer={top_ks} cannot be exported; allowed: the same top_k in every layer")
    router = blocks[0][1].base_router
    now = replace(
        moe_cfg,
        num_experts=next(iter(counts.values())),
        top_k=next(iter(top_ks.values())),
        **{k: getattr(router, k) for k in ("renormalize", "renormalize_top1", "score_func", "routed_scaling_factor")},
        **{k: getattr(router, k) for k in ("n_group", "topk_group", "group_score")},
    )
    if now.n_group > 1:
        for i, k in keep.items():
            per_group = k.view(now.n_group, -1).sum(dim=1)
            if len(set(per_group.tolist())) > 1:
                raise ConfigError(
                    f"moe.n_group={now.n_group} cannot be exported with layer {i}'s pruned experts: groups keep "
                    f"{per_group.tolist()} experts; allowed: the same number of experts kept in every group"
                )
    return now, keep


def _kept_state(model: MoETransformer, keep: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict with only the unmasked experts of each MoE layer (router rows and expert weights)."""
    state = native_state_dict(model)
    for i, k in keep.items():
        prefix = f"layers.{i}.ffn."
        for name in ("router.weight_ED", "router.bias_E", *(f"experts.{w}" for w in EXPERT_TENSORS)):
            state[prefix + name] = state[prefix + name][k]
    return state


def write_safetensors(state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` (transformers' layout) when the
    tensors exceed ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _canonical_keys(model_type: str):
    from transformers import CONFIG_MAPPING

    aliases = CONFIG_MAPPING[model_type].attribute_map
    return lambda key: aliases.get(key, key)


def _source_dir(model_cfg: ModelConfig, source: str | Path | None) -> Path | None:
    """The Hugging Face directory a model came from: ``source``, else ``model.init_from``'s when it still exists."""
    if source is not None:
        return hf_path(f"hf:{source}")
    init_from = model_cfg.init_from or ""
    path = Path(init_from[3:]).expanduser()
    return path if init_from.startswith("hf:") and (path / "config.json").is_file() else None


def save_hf(
    model: MoETransformer,
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    path: str | Path,
    family: str | None = None,
    source: str | Path | None = None,
    write: bool = True,
) -> Path:
    """Write ``model`` as a Hugging Face directory of ``family`` (default: the family of ``source``, itself
    defaulting to ``model_cfg.init_from``'s directory): config.json with the experts the model routes to now
    (masked experts are left out) and its current top-k, safetensors in the family's on-disk layout, and the
    source's tokenizer files. Raises :class:`ConfigError` naming the field when the family cannot express
    the model (e.g. a raw top-1 gate as Mixtral). Collective when experts are sharded (expert parallelism):
    call it on every rank, with ``write`` true on one."""
    src = _source_dir(model_cfg, source)
    base = read_config(src) if src is not None else {}
    family = family or base.get("model_type")
    if family is None:
        raise ConfigError(f"save_hf: family=None needs a source directory; allowed: {', '.join(FAMILIES)}")
    spec = family_of(family)
    now, keep = routing_now(model, moe_cfg)
    biased = any(bool(core.base_router.bias_E.any()) for _, core, _ in moe_parts(model))
    if biased and spec.layout.router_bias is None:
        raise ConfigError(
            f"moe.bias_update_rate={moe_cfg.bias_update_rate}: the routers' selection bias (nonzero) cannot be "
            f"expressed as {family}; allowed: a zero bias, or a family with a router bias (deepseek_v3)"
        )
    hf_cfg = spec.to_hf(model_cfg, now)
    state = moetrain_to_hf(_kept_state(model, keep), model_cfg, spec.layout)
    out = Path(path)
    if not write:
        return out

    # keep what our configs do not hold (token ids, initializer range...) from a source of the same family;
    # keys go by their canonical names (config.json may spell num_experts as num_local_experts, say)
    canonical = _canonical_keys(family)
    same = base.get("model_type") == family
    config = {canonical(k): v for k, v in base.items() if same and k not in ("transformers_version", "torch_dtype")}
    keep_max_positions = config.get("max_position_embeddings")  # the training seq_len is not the model's limit
    config.update({canonical(k): v for k, v in hf_cfg.items()})
    if keep_max_positions:
        config["max_position_embeddings"] = keep_max_positions
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    as_transformers_config({"model_type": family, **config}).save_pretrained(str(out))
    write_safetensors(state, out)
    for name in TOKENIZER_FILES if src is not None and src.resolve() != out.resolve() else ():
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def save_mixtral(model: MoETransformer, model_cfg: ModelConfig, moe_cfg: MoEConfig, path: str | Path) -> None:
    """Write ``model`` as a Mixtral checkpoint loadable by ``AutoModelForCausalLM.from_pretrained``."""
    save_hf(model, model_cfg, moe_cfg, path, family="mixtral")
