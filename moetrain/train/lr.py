"""Learning-rate schedule as a pure function of the optimizer step: resume needs only the step."""

from __future__ import annotations

import math

from moetrain.config import ScheduleConfig


def lr_multiplier(step: int, schedule: ScheduleConfig, max_steps: int) -> float:
    """Multiplier on ``optim.lr`` for optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then decay from 1 to
    ``min_lr_ratio`` at ``max_steps``: cosine ``r + (1 - r) * (1 + cos(pi * p)) / 2`` or linear
    ``1 - (1 - r) * p``, with ``p`` the fraction of the decay phase done; ``constant`` stays at 1.
    """
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return 1.0
    decay_steps = max(1, max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    r = schedule.min_lr_ratio
    if schedule.decay == "linear":
        return 1.0 - (1.0 - r) * progress
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
