"""Export a training run's checkpoint to a Hugging Face directory: the model as it routes at the checkpoint's
step (the stage schedule's top-k, the experts left unmasked), in the family of the run's ``model.init_from``.

Reads DeepSpeed's ``mp_rank_00_model_states.pt`` with ``torch.load(weights_only=True)`` (tensors and plain
containers only, as :mod:`moetrain.checkpoint` does). Supported: runs with ``moe.backend=native`` and
``parallel.ep_size=1`` (one file holds every expert).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moetrain.checkpoint import resolve_resume
from moetrain.config import ConfigError, TrainConfig
from moetrain.hf.api import save_hf
from moetrain.model.transformer import MoETransformer, build_model
from moetrain.stages import StageSchedule


def load_checkpoint_model(checkpoint: str | Path) -> tuple[MoETransformer, TrainConfig]:
    """The model of a run folder's latest checkpoint (or of one ``step_*`` folder), in the routing state of
    the last step it trained, and the run's config."""
    root, tag = resolve_resume(str(checkpoint), Path(checkpoint))
    folder = root / tag
    layout = json.loads((folder / "layout.json").read_text()) if (folder / "layout.json").is_file() else {}
    if layout.get("backend", "native") != "native" or layout.get("ep_size", 1) != 1:
        raise ConfigError(
            f"checkpoint {folder} has moe.backend={layout.get('backend')} parallel.ep_size={layout.get('ep_size')}: "
            "not supported by the export; allowed: moe.backend=native, parallel.ep_size=1"
        )
    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved["config"]))
    state = saved["module"]
    routers = [k for k in state if k.endswith("ffn.router.weight_ED")]
    cfg.moe.num_experts = state[routers[0]].shape[0]  # experts removed by pruning surgery are gone for good
    model = build_model(cfg.model, cfg.moe)
    model.load_state_dict(state)
    step = int(saved.get("step", cfg.trainer.max_steps))
    top_k = StageSchedule(cfg.schedule, cfg.moe, cfg.trainer.max_steps).at(max(step - 1, 0)).moe["top_k"]
    for core in model.moe_layers():
        core.top_k = int(top_k)
    return model.eval(), cfg


def export_run(checkpoint: str | Path, out: str | Path, family: str | None = None) -> Path:
    """``checkpoint`` (a run folder or a ``step_*`` folder) as a Hugging Face directory under ``out``."""
    model, cfg = load_checkpoint_model(checkpoint)
    return save_hf(model, cfg.model, cfg.moe, out, family=family)
