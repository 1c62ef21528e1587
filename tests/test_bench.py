"""launch/bench.py's timing in rounds: the order each row runs in, and which runs are timed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
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
    assert times == [[1.0] * 3, [3.0] * 3]  # per round, the timed run's own clock span: 1 s, and 2 s more for "b"


def test_timing_groups_put_every_e_and_k_of_one_width_in_the_same_rounds():
    bench = load_bench()
    groups = bench.timing_groups([(256, 512, 8), (256, 512, 64), (512, 1024, 32)])
    assert groups == [
        [(256, 512, 8, 1), (256, 512, 8, 2), (256, 512, 64, 1), (256, 512, 64, 2)],
        [(512, 1024, 32, 1), (512, 1024, 32, 2)],
    ]


def test_a_round_runs_implementation_by_implementation_over_every_cell():
    bench = load_bench()
    per_cell = [["native", "ds"], ["native", "ds"], ["native", "ds"]]  # three cells, two implementations each
    order = bench.round_order(per_cell)
    assert [(c, per_cell[c][i]) for c, i in order] == [
        (0, "native"),
        (1, "native"),
        (2, "native"),
        (0, "ds"),
        (1, "ds"),
        (2, "ds"),
    ]


def test_ratios_between_cells_are_taken_within_each_round():
    bench = load_bench()
    # round 2 is slow for both rows: the within-round ratio stays 1.05, the ratio of the medians would not
    e64, e8 = [1.05, 2.10, 1.05], [1.0, 2.0, 1.0]
    assert bench.median_ratio(e64, e8) == pytest.approx((1.05, 1.05, 1.05))
    assert bench.median_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == (2.0, 1.0, 3.0)


def test_the_targets_table_judges_every_target_on_this_run():
    bench = load_bench()
    ms = 1e-3
    per_round = {}
    for E, (t1, t2) in {8: (60, 120), 64: (70, 120)}.items():  # E = 64: 70/60 = 1.17x at k=1; top-1/top-2 0.58
        for k, t in ((1, t1), (2, t2)):
            per_round[(256, 512, E, k, bench.NATIVE)] = [t * ms] * 3
            worst_bound, worst_ds = (E, k) == (64, 1), (E, k) == (64, 2)
            per_round[(256, 512, E, k, bench.BOUND)] = [(0.8 if worst_bound else 0.9) * t * ms] * 3
            per_round[(256, 512, E, k, bench.DS_DROPLESS)] = [(1.25 if worst_ds else 2) * t * ms] * 3
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in bench.targets_table(per_round)[2:]}
    assert rows == {
        (">= 0.85 of the dense bound", "every shape", "0.80 at worst ((256, 512, 64) k=1)", "no"),
        (">= 1.3x DeepSpeed's dropless layer", "every shape", "1.25x at worst ((256, 512, 64) k=2)", "no"),
        ("E = 64 within 10 % of E = 8", "(256, 512) k=1", "1.167x (rounds 1.167-1.167)", "no"),
        ("E = 64 within 10 % of E = 8", "(256, 512) k=2", "1.000x (rounds 1.000-1.000)", "yes"),
        ("top-1 time <= 0.55x top-2 time", "(256, 512, 8)", "0.500 (rounds 0.500-0.500)", "yes"),
        ("top-1 time <= 0.55x top-2 time", "(256, 512, 64)", "0.583 (rounds 0.583-0.583)", "no"),
    }
