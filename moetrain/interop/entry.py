"""The entry: a composed Hydra config becomes the typed, resolved, validated config a run trains with, once.

:func:`resolve_config` is the only place that turns a recipe into a :class:`TrainConfig`:

1. ``to_typed``: the composed tree into the dataclasses (types and Enum choices were checked at composition),
   and ``recover.trainable`` into the recovery stages (:func:`moetrain.config.stages.apply_recovery`);
2. ``model.init_from=hf:DIR``: that directory's architecture replaces the model and MoE architecture keys;
3. ``data.tokenizer``: ``auto`` / ``hf`` become a concrete ``byte`` or ``hf:DIR``;
4. ``validate``: every value, with the launch's world size and device when known;
5. the files the run will read (data, resume folder, tokenizer) and the machine's CPU settings are checked
   and named in one line.

Nothing past the entry validates again.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from moetrain.config import ConfigError, TrainConfig, to_typed, validate
from moetrain.config.stages import apply_recovery
from moetrain.interop.hf import apply_hf_architecture
from moetrain.interop.hf.run_export import export_family
from moetrain.interop.inputs import check_inputs
from moetrain.runtime.cpu_process import cpu_malloc_setting
from moetrain.train.data import check_tokenizer_vocab, resolve_tokenizer


def resolve_config(
    composed: DictConfig | dict[str, Any], world_size: int | None = None, cuda: bool | None = None
) -> TrainConfig:
    """The typed config of a run (see the module docstring); raises ``ConfigError`` with one line."""
    cfg = to_typed(composed)
    apply_recovery(cfg)  # recover.trainable into the recovery stages' trainable / lora
    if cfg.model.init_from:
        apply_hf_architecture(cfg)
    # a concrete data.tokenizer (byte or hf:DIR) from here on: the data pipeline sees only cfg.data
    cfg.data.tokenizer = resolve_tokenizer(cfg.data.tokenizer, cfg.model.init_from)
    validate(cfg, world_size=world_size, cuda=cuda)
    check_tokenizer_vocab(cfg.data.tokenizer, cfg.model.vocab_size)
    check_inputs(cfg)
    export_family(cfg)  # export.hf: a family it can write, named now rather than after training
    check_process_settings()
    return cfg


def check_process_settings() -> None:
    """The machine's CPU settings (``MOETRAIN_CPU_MALLOC``), named in one line."""
    try:
        cpu_malloc_setting()
    except ValueError as e:
        raise ConfigError(str(e)) from None
