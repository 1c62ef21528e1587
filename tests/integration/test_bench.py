"""launch/bench.py's timing in rounds: the order each row runs in, and which runs are timed."""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers.launch import ROOT
from torch import nn

from moetrain.metrics import timing


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "launch" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # dataclasses look their module up while the file runs
    spec.loader.exec_module(bench)
    return bench


def clocked_rows(timing, monkeypatch, calls: list[str]):
    """Rows on a fake clock: every perf_counter call advances it by 1 s, and a row's run by `extra` s more; each run
    appends the row's name to `calls`."""
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))

    def row(name: str, extra: int):
        def fn(x):
            calls.append(name)
            for _ in range(extra):
                next(clock)
            return x * 2

        return timing.Entry(name, fn, torch.ones(2, 1), nn.Linear(1, 1))

    return row


def test_rounds_run_every_row_twice_in_turn_and_time_the_second_run(monkeypatch):
    bench = load_bench()
    calls: list[str] = []
    row = clocked_rows(timing, monkeypatch, calls)
    times = bench.time_in_rounds([row("a", 0), row("b", 2)], iters=3, warmup=2)
    assert calls == ["a", "b"] * 2 + ["a", "a", "b", "b"] * 3  # 2 warm-up rounds, then 3 rounds of 2 runs each
    assert times == [[1.0] * 3, [3.0] * 3]  # per round, the timed run's own clock span: 1 s, and 2 s more for "b"


def test_the_backward_starts_from_the_fixed_output_gradient():
    """No loss: the timed backward is the layer's, from the same seeded gradient of the output's shape every time."""
    layer = nn.Linear(3, 3, bias=False)
    x = torch.randn(4, 3)
    layer.weight.grad = torch.full((3, 3), 7.0)  # set to None before the run: not added to
    timing.one_fwd_bwd(layer, x, layer)
    dout = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    assert timing.output_gradient((4, 3), torch.float32, torch.device("cpu")).equal(dout)
    torch.testing.assert_close(layer.weight.grad, dout.t() @ x)  # dW of y = x W^T is dY^T x


def test_timing_groups_put_every_e_and_k_of_one_width_in_the_same_rounds():
    bench = load_bench()
    groups = bench.timing_groups([(256, 512, 8), (256, 512, 64), (512, 1024, 32)])
    assert groups == [
        [(256, 512, 8, 1), (256, 512, 8, 2), (256, 512, 64, 1), (256, 512, 64, 2)],
        [(512, 1024, 32, 1), (512, 1024, 32, 2)],
    ]


def test_alternate_rounds_run_in_reverse_and_keep_each_entry_its_own_times(monkeypatch):
    bench = load_bench()
    calls: list[str] = []
    row = clocked_rows(timing, monkeypatch, calls)
    times = bench.time_in_rounds([row("a", 0), row("b", 2)], iters=3, warmup=2, alternate=True)
    warm = ["a", "b", "b", "a"]
    assert calls == warm + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert times == [[1.0] * 3, [3.0] * 3]


def named(*names: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=n) for n in names]


def test_a_round_runs_implementation_by_implementation_over_every_cell():
    bench = load_bench()
    per_cell = [named("native", "ds"), named("native", "ds"), named("native", "ds")]  # three cells, two rows each
    order = bench.round_order(per_cell)
    assert [(c, per_cell[c][i].name) for c, i in order] == [
        (0, "native"),
        (1, "native"),
        (2, "native"),
        (0, "ds"),
        (1, "ds"),
        (2, "ds"),
    ]
    with pytest.raises(ValueError, match="same implementations in the same order"):
        bench.round_order([named("native", "ds"), named("ds", "native")])


def test_ratios_between_cells_are_taken_within_each_round():
    bench = load_bench()
    # round 2 is slow for both rows, round 3 for E = 8 alone: the within-round ratios are 1.05, 1.05 and 0.917, so
    # their median is 1.05; the ratio of the medians (1.10 / 1.2 = 0.917) would take round 3's E = 8 for E = 8's time
    e64, e8 = [1.05, 2.10, 1.10], [1.0, 2.0, 1.2]
    assert bench.median_ratio(e64, e8) == pytest.approx((1.05, 1.10 / 1.2, 1.05))
    assert bench.median_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == (2.0, 1.0, 3.0)


def target_rows(bench, per_round) -> set[tuple[str, ...]]:
    lines = bench.targets_table(per_round)
    assert lines[0].startswith("Targets for native dropless") and "3 rounds" in lines[0]
    return {tuple(c.strip() for c in line.strip("|").split("|")) for line in lines[4:]}


def test_the_targets_table_judges_every_target_on_this_run():
    """Per-round values that differ between rounds (so that the median, lowest and highest differ), targets met
    exactly on their line, a width without E = 8 (no E64/E8 row), and DeepSpeed rows missing."""
    bench = load_bench()
    native = {  # (d, f, E, k) -> ms in rounds 1, 2, 3
        (256, 512, 8, 1): [60, 90, 72],
        (256, 512, 8, 2): [120, 180, 144],
        (256, 512, 64, 1): [66, 99, 86.4],  # 1.1x E = 8 in rounds 1 and 2: on the line; 0.55 of top-2: on the line
        (256, 512, 64, 2): [120, 180, 144],
        (512, 1024, 32, 1): [200, 300, 240],
        (512, 1024, 32, 2): [380, 570, 400],
    }
    per_round = {}
    for cell, t in native.items():
        per_round[(*cell, bench.NATIVE)] = t
        per_round[(*cell, bench.BOUND)] = [0.9 * v for v in t]
        per_round[(*cell, bench.DS_DROPLESS)] = [2 * v for v in t]
    per_round[(512, 1024, 32, 1, bench.BOUND)] = [170, 240, 228]  # 0.85, 0.80, 0.95 of native: on the line
    per_round[(256, 512, 64, 2, bench.DS_DROPLESS)] = [150, 200, 180]  # 1.25, 1.11, 1.25x native
    assert target_rows(bench, per_round) == {
        (
            ">= 0.85 of the MKL dense-GEMM bound",
            "every shape; worst (512, 1024, 32) k=1",
            "0.850 (range over rounds 0.800-0.950)",
            "yes",
        ),
        (
            ">= 1.3x DeepSpeed's dropless layer",
            "every shape; worst (256, 512, 64) k=2",
            "1.250x (range over rounds 1.111-1.250)",
            "no",
        ),
        ("E = 64 time within 10 % of E = 8", "(256, 512) k=1", "1.100x (range over rounds 1.100-1.200)", "yes"),
        ("E = 64 time within 10 % of E = 8", "(256, 512) k=2", "1.000x (range over rounds 1.000-1.000)", "yes"),
        ("top-1 time <= 0.55x top-2 time", "(256, 512, 8)", "0.500x (range over rounds 0.500-0.500)", "yes"),
        ("top-1 time <= 0.55x top-2 time", "(256, 512, 64)", "0.550x (range over rounds 0.550-0.600)", "yes"),
        ("top-1 time <= 0.55x top-2 time", "(512, 1024, 32)", "0.526x (range over rounds 0.526-0.600)", "yes"),
    }
    # just over the lines
    per_round[(256, 512, 64, 1, bench.NATIVE)] = [66.1, 99.1, 86.4]
    per_round[(512, 1024, 32, 1, bench.BOUND)] = [169.9, 240, 228]
    for key in [key for key in per_round if key[4] == bench.DS_DROPLESS]:
        del per_round[key]
    rows = target_rows(bench, per_round)
    verdict = {(target, where): met for target, where, _, met in rows}
    assert verdict[("E = 64 time within 10 % of E = 8", "(256, 512) k=1")] == "no"
    assert verdict[("top-1 time <= 0.55x top-2 time", "(256, 512, 64)")] == "no"
    assert verdict[(">= 0.85 of the MKL dense-GEMM bound", "every shape; worst (512, 1024, 32) k=1")] == "no"
    assert (">= 1.3x DeepSpeed's dropless layer", "every shape", "not measured (no DeepSpeed rows)", "no") in rows


def test_bench_moe_puts_each_rows_times_in_its_own_row(monkeypatch):
    """bench_moe with labelled fakes for the layers, the bounds and the timing: every table row shows the time of
    its own (d, f, E, k, implementation) and the bound of its k under every E."""
    bench = load_bench()
    tokens = 2

    def ms(d, E, k, name):
        if name == bench.BOUND:
            return 100 * d + k
        return {bench.NATIVE: 10, bench.DS_DROPLESS: 20}[name] * d + E / 10 + k

    def entry(d, E, k, name):
        e = bench.Entry(name, lambda x: x, torch.zeros(1), nn.Identity())
        e.ms = ms(d, E, k, name)
        return e

    def fake_bound(d, f, x_dense):
        return entry(d, None, x_dense.shape[0] // tokens, bench.BOUND)

    def fake_candidates(d, f, E, k, x):
        return [entry(d, E, k, bench.NATIVE), entry(d, E, k, bench.DS_DROPLESS)]

    def fake_time_in_rounds(entries, iters, warmup=2, alternate=False):
        assert alternate
        return [[e.ms * 1e-3] * iters for e in entries]

    monkeypatch.setattr(bench, "SHAPES", [(4, 8, 8), (4, 8, 64), (6, 8, 2)])
    monkeypatch.setattr(bench, "dense_bound", fake_bound)
    monkeypatch.setattr(bench, "candidates", fake_candidates)
    monkeypatch.setattr(bench, "time_in_rounds", fake_time_in_rounds)
    monkeypatch.setattr(bench, "expert_flops", lambda *a: 1.0)
    args = SimpleNamespace(device="cpu", tokens=tokens, iters=3, threads=1, cpu_malloc="cached")
    text = bench.bench_moe(args)
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith(("| 4 |", "| 6 |"))]
    assert len(rows) == 4 * 3 + 2 * 3  # every cell: its bound + 2 layers (width 4: 4 cells, width 6: 2)
    for d, _f, E, k, name, t, frac, _ in (tuple(c.strip() for c in r) for r in rows):
        d, E, k = int(d), int(E), int(k)
        expect = ms(d, None if "bound" in name else E, k, name.strip())
        assert float(t) == pytest.approx(expect, abs=0.05), (d, E, k, name)
        assert frac == f"{ms(d, None, k, bench.BOUND) / expect:.2f}"
