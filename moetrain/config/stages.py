"""Validation of ``schedule.stages``: one-line errors naming ``schedule.stages[i].key``.

Types, unknown keys and string choices of a stage (``moe.*``, ``trainable``, a ramp's ``shape``) are checked on
composition; what is left here are the values and how the stages fit together."""

from __future__ import annotations

from typing import Any

from moetrain.config.choices import RecoverTrainable, Trainable
from moetrain.config.errors import ConfigError
from moetrain.config.schema import StageMoEConfig, TrainConfig


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_stage_moe(key: str, moe: StageMoEConfig, num_experts: int) -> None:
    """The values ``schedule.stages[i].moe`` sets (``key`` is ``schedule.stages[i]``)."""
    values = moe.overrides()
    top_k = values.get("top_k", 1)
    if not (_is_int(top_k) and 1 <= top_k <= num_experts):
        raise ConfigError(f"{key}.moe.top_k={top_k} must be an integer between 1 and moe.num_experts={num_experts}")
    min_capacity = values.get("min_capacity", 1)
    if not (_is_int(min_capacity) and min_capacity >= 1):
        raise ConfigError(f"{key}.moe.min_capacity={min_capacity} must be an integer >= 1")
    for cf_key in ("capacity_factor", "eval_capacity_factor"):
        v = values.get(cf_key)
        if v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"{key}.moe.{cf_key}={v} must be a number > 0, or null for dropless")


def apply_recovery(cfg: TrainConfig) -> None:
    """Stages with ``recover: true`` train what ``recover.trainable`` names: ``router`` sets the stage's
    ``trainable=router``, ``lora`` its ``lora=true`` (adapters on ``lora.targets``), ``full`` its ``trainable=all``.
    A recovery stage that sets ``trainable`` or ``lora`` itself is refused: one key says what recovery trains."""
    for i, st in enumerate(cfg.schedule.stages):
        if not st.recover:
            continue
        if st.trainable != Trainable.all or st.lora:
            own = f"trainable={st.trainable}" if st.trainable != Trainable.all else "lora=true"
            raise ConfigError(
                f"schedule.stages[{i}].{own} in a recovery stage (recover: true): what it trains is "
                f"recover.trainable={cfg.recover.trainable}; allowed: set recover.trainable (router, lora, full)"
            )
        choice = RecoverTrainable(cfg.recover.trainable)
        st.trainable = Trainable.router if choice is RecoverTrainable.router else Trainable.all
        st.lora = choice is RecoverTrainable.lora


def validate_stages(cfg: TrainConfig) -> None:
    """One-line errors naming ``schedule.stages[i].key``."""
    names = set()
    start = 0
    for i, st in enumerate(cfg.schedule.stages):
        if start >= cfg.trainer.max_steps:
            raise ConfigError(
                f"schedule.stages[{i}] ({st.name}) would start at step {start}, after trainer.max_steps="
                f"{cfg.trainer.max_steps}; shorten earlier stages or raise trainer.max_steps"
            )
        start += st.steps
        key = f"schedule.stages[{i}]"
        if st.steps <= 0:
            raise ConfigError(f"{key}.steps={st.steps} must be > 0")
        if st.name in names:
            raise ConfigError(f"{key}.name={st.name} is used by an earlier stage; stage names must be unique")
        names.add(st.name)
        _check_stage_moe(key, st.moe, cfg.moe.num_experts)
        for rk in ("aux_loss_coef", "z_loss_coef", "lr_mult"):
            r = getattr(st, rk)
            if r is not None and min(r.start, r.end if r.end is not None else r.start) < 0:
                raise ConfigError(f"{key}.{rk}.start={r.start} / end={r.end} must be >= 0")
