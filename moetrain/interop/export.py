"""The trained model as a self-contained folder: ``config.json`` (model + MoE config, pruned structure
included) and ``model.safetensors`` in the native single-rank layout, whatever backend and expert-parallel
size trained it. ``load_exported(path)`` rebuilds it in one call; ``validation_loss`` evaluates it on the
run's validation batches exactly as the trainer does.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from moetrain.config import DataConfig, ModelConfig, MoEConfig, plain
from moetrain.model.transformer import MoETransformer, build_model
from moetrain.surgery.experts import base_parameter, full_expert_stacks, routing_core


def native_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Collective over expert-parallel groups: every weight of the model under the native layer's names, with
    all experts of each layer."""
    out: dict[str, torch.Tensor] = {}
    moe_prefixes = []
    for i, block in enumerate(model.layers):
        core = routing_core(block.ffn)
        if core is None:
            continue
        prefix = f"layers.{i}.ffn"
        moe_prefixes.append(prefix + ".")
        router = core.base_router
        out[f"{prefix}.router.weight_ED"] = base_parameter(router, "weight_ED").detach()
        out[f"{prefix}.router.bias_E"] = router.bias_E
        out[f"{prefix}.router.active_E"] = router.active_E
        for name, full in full_expert_stacks(core).items():
            out[f"{prefix}.experts.{name}"] = full
        if getattr(core, "constant_out_ND", None) is not None:  # MoNE constants
            out[f"{prefix}.constant_out_ND"] = core.constant_out_ND.detach()
    for name, t in model.state_dict().items():
        if not any(name.startswith(p) for p in moe_prefixes) and not name.startswith("ds_expert_parallel"):
            out[name] = t
    return unshared({k: v.detach().cpu().contiguous() for k, v in out.items()})


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor on a storage of its own: tied weights (an LM head that is the embedding)
    become copies, which safetensors can write and a strict ``load_state_dict`` ties again."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def export_model(
    model: MoETransformer, model_cfg: ModelConfig, moe_cfg: MoEConfig, directory: Path, write: bool
) -> Path:
    """Collective; rank(s) with ``write`` write the folder (temp names, then renamed: no half-written export)."""
    from safetensors.torch import save_file

    state = native_state_dict(model)
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        moe = replace(moe_cfg, backend="native", a2a_chunks=1)
        cfg = {"format": "moetrain-export-v1", "model": plain(replace(model_cfg, init_from=None)), "moe": plain(moe)}
        tmp = directory / ".model.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, directory / "model.safetensors")
        tmp = directory / ".config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, directory / "config.json")
    return directory


def load_exported(directory: str | Path) -> tuple[MoETransformer, ModelConfig, MoEConfig]:
    """One call: the exported model (native backend, one process), in eval mode, and its configs."""
    from safetensors.torch import load_file

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    model_cfg, moe_cfg = ModelConfig(**raw["model"]), MoEConfig(**raw["moe"])
    model = build_model(model_cfg, moe_cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval(), model_cfg, moe_cfg


@torch.no_grad()
def validation_loss(
    model: MoETransformer, data: DataConfig, seq_len: int, micro_batch: int, dp_size: int, eval_batches: int, seed: int
) -> float:
    """Mean next-token cross-entropy over the validation batches a ``dp_size``-rank run evaluates."""
    from moetrain.train.data import DataPipeline, default_cache_dir, tokenize_splits
    from moetrain.train.evaluation import cross_entropy_sums

    splits = tokenize_splits(data, Path(data.cache_dir) if data.cache_dir else default_cache_dir())
    device = next(model.parameters()).device
    totals = sum(
        cross_entropy_sums(
            model, DataPipeline(splits, seq_len, micro_batch, rank, dp_size, seed).val_batches(eval_batches), device
        )
        for rank in range(dp_size)
    )
    return float(totals[0] / totals[1])
