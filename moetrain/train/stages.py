"""Staged schedules: which MoE runtime values, loss coefficients, LR multiplier and trainable parameter sets
hold at a given optimizer step. Everything here is a pure function of the step, so resume needs only the
step.

Stages run in the order listed; stage i covers ``[start_i, start_i + steps_i)``; the last stage lasts until
``trainer.max_steps``. A stage's ``moe`` overrides (``top_k``, ``capacity_factor``, ``eval_capacity_factor``,
``drop_policy``, ``min_capacity``) hold from its start on, until a later stage overrides them again.
A stage's coefficient or LR ramp runs from ``start`` to ``end`` over its first ``steps`` steps and then stays
at ``end``; a stage that sets none keeps the value the previous stage ended with (or the recipe's base).
The stages are validated with the rest of the config (:mod:`moetrain.config.stages`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from moetrain.config import RUNTIME_MOE_KEYS, MoEConfig, RampConfig, ScheduleConfig, StageConfig, plain

__all__ = ["RUNTIME_MOE_KEYS", "StageSchedule", "StageState", "frozen_parameters", "ramp_value"]


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
            moe.update(st.moe.overrides())
            # earlier stages contribute the value they ended with
            here = step - self.starts[j] if j == i else st.steps
            if st.aux_loss_coef is not None:
                aux = ramp_value(st.aux_loss_coef, here)
            if st.z_loss_coef is not None:
                z = ramp_value(st.z_loss_coef, here)
            if st.lr_mult is not None:
                lr = ramp_value(st.lr_mult, here)
        moe = plain(moe)  # choices as plain strings: the state goes into logs, summaries and checkpoints
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
