"""launch/bench.py's timing in rounds: the order each row runs in, and which runs are timed."""

from __future__ import annotations

import importlib.util
import sys

import torch
from conftest import ROOT
from torch import nn


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "launch" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses look their module up while the file runs
    spec.loader.exec_module(bench)
    return bench


def test_rounds_run_every_row_twice_in_turn_and_time_the_second_run(monkeypatch):
    bench = load_bench()
    calls: list[str] = []
    clock = iter(range(1000))
    # every perf_counter call advances by 1 s; row "b" takes 2 s more than "a" in each run
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))

    def row(name: str, extra: int):
        def fn(x):
            calls.append(name)
            for _ in range(extra):
                next(clock)
            return x * 2

        layer = nn.Linear(1, 1)
        return bench.Entry(name, fn, torch.ones(2, 1), layer)

    times = bench.time_in_rounds([row("a", 0), row("b", 2)], iters=3, warmup=2)
    assert calls == ["a", "b"] * 2 + ["a", "a", "b", "b"] * 3  # 2 warm-up rounds, then 3 rounds of 2 runs each
    assert times == [1.0, 3.0]  # the timed run's own clock span: 1 s, and 2 s more for "b"


def test_timing_groups_put_every_e_and_k_of_one_width_in_the_same_rounds():
    bench = load_bench()
    groups = bench.timing_groups([(256, 512, 8), (256, 512, 64), (512, 1024, 32)])
    assert groups == [
        [(256, 512, 8, 1), (256, 512, 8, 2), (256, 512, 64, 1), (256, 512, 64, 2)],
        [(512, 1024, 32, 1), (512, 1024, 32, 2)],
    ]
