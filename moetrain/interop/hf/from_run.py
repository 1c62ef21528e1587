"""Export a training run to a Hugging Face directory: the model as it routes at the end (the final stage's
top-k, the experts left unmasked or surviving pruning surgery), in the family of the run's ``model.init_from``.

Two sources, in this order:

- a run folder's ``export/`` (written by the trainer at the end of every run: safetensors in the native
  single-rank layout, whatever backend and expert-parallel size trained it, LoRA adapters merged);
- a ``checkpoints/step_*`` folder (or a run folder without ``export/``): DeepSpeed's
  ``mp_rank_00_model_states.pt``, read with ``torch.load(weights_only=True)`` (tensors and plain containers
  only, as :mod:`moetrain.train.checkpoint` does), for runs with ``moe.backend=native`` and ``parallel.ep_size=1``.

Hugging Face MoE layers are dropless, so the returned model is too (capacity factors cleared).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetrain.config import ConfigError, TrainConfig
from moetrain.interop.export import load_exported
from moetrain.interop.hf.api import save_hf
from moetrain.model.transformer import MoETransformer, build_model
from moetrain.train.checkpoint import resolve_resume
from moetrain.train.stages import StageSchedule


def dropless(model: MoETransformer) -> MoETransformer:
    for core in model.moe_layers():
        core.capacity_factor = core.eval_capacity_factor = None
    return model.eval()


def _checkpoint_model(checkpoint: Path) -> tuple[MoETransformer, TrainConfig]:
    root, tag = resolve_resume(str(checkpoint), checkpoint)
    folder = root / tag
    layout = json.loads((folder / "layout.json").read_text()) if (folder / "layout.json").is_file() else {}
    if layout.get("backend", "native") != "native" or layout.get("ep_size", 1) != 1:
        raise ConfigError(
            f"checkpoint {folder} has moe.backend={layout.get('backend')} parallel.ep_size={layout.get('ep_size')}: "
            "not supported by the export; allowed: moe.backend=native, parallel.ep_size=1 (or the run's export/)"
        )
    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved["config"]))
    model = build_model(cfg.model, cfg.moe)
    model.load_state_dict(saved["module"])
    step = int(saved.get("step", cfg.trainer.max_steps))
    top_k = StageSchedule(cfg.schedule, cfg.moe, cfg.trainer.max_steps).at(max(step - 1, 0)).moe["top_k"]
    for core in model.moe_layers():
        core.top_k = int(top_k)
    return model, cfg


def load_run_model(path: str | Path) -> tuple[MoETransformer, TrainConfig]:
    """The final model of a run folder (its ``export/``, else its latest checkpoint) or of one
    ``checkpoints/step_*`` folder, dropless, in eval mode; and the run's config (``model.init_from`` included)."""
    path = Path(path)
    if (path / "export" / "config.json").is_file():
        model, model_cfg, moe_cfg = load_exported(path / "export")
        run_cfg = path / ".hydra" / "config.yaml"
        init_from = OmegaConf.load(run_cfg).model.init_from if run_cfg.is_file() else None
        model_cfg.init_from = init_from  # the export leaves it out; the source directory is the family's
        return dropless(model), TrainConfig(model=model_cfg, moe=moe_cfg)
    model, cfg = _checkpoint_model(path)
    return dropless(model), cfg


def export_run(path: str | Path, out: str | Path, family: str | None = None) -> Path:
    """``path`` (a run folder or a ``step_*`` folder) as a Hugging Face directory ``out``."""
    model, cfg = load_run_model(path)
    return save_hf(model, cfg.model, cfg.moe, out, family=family)
