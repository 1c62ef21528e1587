"""The LR schedule is a pure function of the step."""

from __future__ import annotations

import math

import pytest

from moetrain.config import ScheduleConfig
from moetrain.train.lr import lr_multiplier


def test_warmup_then_cosine_to_min_ratio():
    s = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, s, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, s, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, s, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, s, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, s, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, s, 110) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = ScheduleConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    assert lr_multiplier(50, lin, 100) == pytest.approx(0.5)
    const = ScheduleConfig(warmup_steps=4, decay="constant")
    assert [lr_multiplier(i, const, 100) for i in (1, 3, 50)] == pytest.approx([0.5, 1.0, 1.0])
