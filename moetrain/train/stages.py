"""Staged schedules: which MoE runtime values, loss coefficients, LR multiplier and trainable parameter sets
hold at a given optimizer step. Everything here is a pure function of the step, so resume needs only the
step.

Stages run in the order listed; stage i covers ``[start_i, start_i + steps_i)``; the last stage lasts until
``trainer.max_steps``. A stage's ``moe`` overrides (``top_k``, ``capacity_factor``, ``eval_capacity_factor``,
``drop_policy``, ``min_capacity``) hold from its start on, until a later stage overrides them again.
A stage's coefficient or LR ramp runs from ``start`` to ``end`` over its first ``steps`` steps and then stays
at ``end``; a stage that sets none keeps the value the previous stage ended with (or the recipe's base).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from moetrain.config import ConfigError, MoEConfig, RampConfig, ScheduleConfig, StageConfig, TrainConfig

# MoE values a stage may change at run time without rebuilding the model.
RUNTIME_MOE_KEYS = ("top_k", "capacity_factor", "eval_capacity_factor", "drop_policy", "min_capacity")
TRAINABLE = ("all", "router", "experts", "non_experts")
RAMP_SHAPES = ("linear", "cosine")


def ramp_value(ramp: RampConfig, step_in_stage: int) -> float:
    """``start`` -> ``end`` over ``steps`` (linear or cosine), then ``end``; a constant when ``end`` is null."""
    if ramp.end is None or ramp.steps <= 0:
        return ramp.start if ramp.end is None else ramp.end
    p = min(1.0, step_in_stage / ramp.steps)
    if ramp.shape == "cosine":
        p = 0.5 * (1.0 - math.cos(math.pi * p))
    return ramp.start + (ramp.end - ramp.start) * p


@dataclass(frozen=True)
class StageState:
    """Everything the schedule fixes at one step."""

    index: int
    name: str
    step_in_stage: int
    moe: dict[str, Any]  # runtime MoE values in force (all RUNTIME_MOE_KEYS)
    aux_loss_coef: float
    z_loss_coef: float
    lr_mult: float
    frozen: frozenset[str] = field(default_factory=frozenset)  # names of parameters that do not train


class StageSchedule:
    def __init__(
        self, schedule: ScheduleConfig, base_moe: MoEConfig, max_steps: int, param_names: list[str] | None = None
    ) -> None:
        self.stages = list(schedule.stages) or [StageConfig(name="train", steps=max_steps)]
        self.base_moe = base_moe
        self.max_steps = max_steps
        starts, s = [], 0
        for st in self.stages:
            starts.append(s)
            s += st.steps
        self.starts = starts
        self.param_names = param_names or []
        self._frozen = [frozenset(frozen_parameters(st, self.param_names)) for st in self.stages]

    def index_at(self, step: int) -> int:
        i = 0
        for j, start in enumerate(self.starts):
            if step >= start:
                i = j
        return i

    def boundaries(self) -> list[int]:
        """Steps at which a stage after the first begins (within the run)."""
        return [s for s in self.starts[1:] if s < self.max_steps]

    def at(self, step: int) -> StageState:
        i = self.index_at(step)
        moe = {k: getattr(self.base_moe, k) for k in RUNTIME_MOE_KEYS}
        aux, z, lr = self.base_moe.aux_loss_coef, self.base_moe.z_loss_coef, 1.0
        for j in range(i + 1):
            st = self.stages[j]
            moe.update(st.moe)
            # earlier stages contribute the value they ended with
            here = step - self.starts[j] if j == i else st.steps
            if st.aux_loss_coef is not None:
                aux = ramp_value(st.aux_loss_coef, here)
            if st.z_loss_coef is not None:
                z = ramp_value(st.z_loss_coef, here)
            if st.lr_mult is not None:
                lr = ramp_value(st.lr_mult, here)
        return StageState(i, self.stages[i].name, step - self.starts[i], moe, aux, z, lr, self._frozen[i])

    def param_frozen_pattern(self, name: str) -> tuple[bool, ...]:
        """Per stage, whether parameter ``name`` is frozen: its optimizer group key."""
        return tuple(name in f for f in self._frozen)

    def lr_factor(self, step: int, frozen_by_stage: tuple[bool, ...]) -> float:
        """Stage LR multiplier for a parameter group, 0 in the stages that freeze it."""
        state = self.at(step)
        return 0.0 if frozen_by_stage[state.index] else state.lr_mult


def frozen_parameters(stage: StageConfig, names: list[str]) -> list[str]:
    """Parameters a stage does not train: outside its ``trainable`` set, or matching a ``freeze`` pattern."""

    def in_set(n: str) -> bool:
        expert = ".experts." in n or ".deepspeed_experts." in n
        router = ".router." in n
        return {
            "all": True,
            "router": router,
            "experts": expert,
            "non_experts": not expert,
        }[stage.trainable]

    return [n for n in names if not in_set(n) or any(fnmatch.fnmatch(n, pat) for pat in stage.freeze)]


def _check_stage_moe(key: str, moe: dict[str, Any], num_experts: int) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if "top_k" in moe and not (is_int(moe["top_k"]) and 1 <= moe["top_k"] <= num_experts):
        raise ConfigError(
            f"{key}.moe.top_k={moe['top_k']} must be an integer between 1 and moe.num_experts={num_experts}"
        )
    if "min_capacity" in moe and not (is_int(moe["min_capacity"]) and moe["min_capacity"] >= 1):
        raise ConfigError(f"{key}.moe.min_capacity={moe['min_capacity']} must be an integer >= 1")
    for cf_key in ("capacity_factor", "eval_capacity_factor"):
        v = moe.get(cf_key)
        if cf_key in moe and v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"{key}.moe.{cf_key}={v} must be a number > 0, or null for dropless")
    if "drop_policy" in moe and moe["drop_policy"] not in ("probs", "position", "reroute"):
        raise ConfigError(
            f"{key}.moe.drop_policy={moe['drop_policy']} is not supported; allowed: probs, position, reroute"
        )


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
        for k, v in st.moe.items():
            if k not in RUNTIME_MOE_KEYS:
                raise ConfigError(
                    f"{key}.moe.{k}={v} cannot change during a run; allowed: {', '.join(RUNTIME_MOE_KEYS)}"
                )
        _check_stage_moe(key, st.moe, cfg.moe.num_experts)
        if st.trainable not in TRAINABLE:
            raise ConfigError(f"{key}.trainable={st.trainable} is not supported; allowed: {', '.join(TRAINABLE)}")
        for rk in ("aux_loss_coef", "z_loss_coef", "lr_mult"):
            r = getattr(st, rk)
            if r is None:
                continue
            if r.shape not in RAMP_SHAPES:
                raise ConfigError(f"{key}.{rk}.shape={r.shape} is not supported; allowed: {', '.join(RAMP_SHAPES)}")
            if min(r.start, r.end if r.end is not None else r.start) < 0:
                raise ConfigError(f"{key}.{rk}.start={r.start} / end={r.end} must be >= 0")
