"""The run's own Hugging Face export (``export.hf=true``; ``+recipe=compress`` sets it): at the end of the run the
final model, read back from the trainer's native ``export/`` (any backend, any expert-parallel size, LoRA
adapters merged), is written as a directory of its family's layout into ``<run>/hf``, then loaded back with
transformers on every rank so the report's export row is measured on exactly what a user loads.

The family is ``export.family``, else that of ``model.init_from=hf:DIR``; both are checked when the run starts
(:func:`export_family`). The directory is written under a temporary name and renamed: never half-written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moetrain.config import ConfigError, TrainConfig
from moetrain.interop.export import load_exported
from moetrain.interop.hf.api import FAMILIES, hf_path, read_config, save_hf
from moetrain.interop.hf.from_run import dropless


def export_family(cfg: TrainConfig) -> str | None:
    """The family ``export.hf`` writes (None when it is off); raises ``ConfigError`` with one line when no
    family is named or known."""
    e = cfg.export
    if not e.hf:
        return None
    allowed = ", ".join(FAMILIES)
    if cfg.prune.mode == "mone" and any(st.prune for st in cfg.schedule.stages):
        raise ConfigError(
            "export.hf=true cannot write prune.mode=mone's constants: no Hugging Face family has an expert that is a "
            "fixed vector; allowed: export.hf=false (the run's native export/ keeps them) or another prune.mode"
        )
    if e.family is not None:
        if e.family not in FAMILIES:
            raise ConfigError(f"export.family={e.family} is not supported; allowed: {allowed}")
        return e.family
    init_from = cfg.model.init_from or ""
    if not init_from.startswith("hf:"):
        raise ConfigError(
            f"export.hf=true needs a family: model.init_from={cfg.model.init_from} is not a Hugging Face "
            f"directory; set export.family (allowed: {allowed}) or export.hf=false"
        )
    return str(read_config(hf_path(init_from))["model_type"])


class HFRunExport:
    """:class:`moetrain.train.components.FamilyExport` through :func:`save_hf` and transformers."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.family = export_family(cfg) or ""
        self.init_from = cfg.model.init_from

    def write(self, native_dir: Path, out: Path) -> Path:
        model, model_cfg, moe_cfg = load_exported(native_dir)
        model_cfg.init_from = self.init_from  # the source directory: its tokenizer files go along
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_hf(dropless(model), model_cfg, moe_cfg, tmp, family=self.family)  # Hugging Face MoE layers are dropless
        if out.exists():  # a run resumed at its end writes it again
            shutil.rmtree(out)
        os.replace(tmp, out)
        return out

    def load(self, out: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device).eval()
        return lambda inputs_BS: model(inputs_BS).logits
