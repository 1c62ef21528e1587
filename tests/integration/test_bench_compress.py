"""`python launch/bench.py compress`: the study's tables, targets and plot written from fake measurements (every
rendered number checked against a value worked out by hand), the study's pieces (cut counts, the measuring ops, the
cell cache, a rerun that measures only the missing cells), and `--quick` through the real command line: every
table measured on a tiny imported Mixtral."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.launch import BIN, ROOT, run_launcher
from torch import nn

from moetrain.interop.bench_session import MeasuringOps
from moetrain.interop.compress_bench import CellCache, plot_keeps, staged_path
from moetrain.metrics import compression_bench as doc
from moetrain.metrics.compression_results import (
    BASE_SPEED,
    ONE_SHOT,
    STAGED,
    TOP1_SPEED,
    BaseInfo,
    BenchResults,
    ExportCheck,
    Point,
    Quality,
    Run,
    Speed,
    fraction_recovered,
    targets,
)

BASE = 2.0  # the fake base's NLL; every NLL below is a dyadic fraction away from it, so gaps and ratios are exact


def q(nll: float) -> Quality:
    """A fake measurement: KL half the gap, agreement 1 - gap."""
    return Quality(nll, (nll - BASE) / 2, 1 - (nll - BASE))


def run(table: str, name: str, points: list[tuple[int, int, float]], schedule: str = ONE_SHOT, **kw) -> Run:
    return Run(name, kw.pop("method", "reap"), schedule, kw.pop("top_k", 2), kw.pop("distill", False),
               [Point(t, e, q(nll)) for t, e, nll in points], table=table, **kw)  # fmt: skip


def fake_results() -> BenchResults:
    """1,000,000 pretraining tokens, 1,000 a step: 0.5 / 1 / 2 / 5 % are 5,000 / 10,000 / 20,000 / 50,000 tokens."""
    runs = []
    for method, per_expert in (("frequency", 0.0625), ("reap", 0.03125)):  # gap = per_expert x experts removed
        for kept in (6, 4):
            runs.append(run("one_shot", method, [(0, kept, BASE + per_expert * (8 - kept))], method=method))
    marks = (5000, 10000, 20000, 50000)
    full = [2.0625, 2.03125, 2.015625, 2.0078125]  # cut +0.125: 50, 75, 87.5, 93.75 % recovered
    router = [2.125, 2.25, 2.09375, 2.0625]  # 0, -100, 25, 50 %
    runs.append(run("recovery", "reap 8 -> 4", [(0, 4, 2.125), *((t, 4, v) for t, v in zip(marks, full))],
                    option="full", distill=True))  # fmt: skip
    runs.append(run("recovery", "reap 8 -> 4", [(0, 4, 2.125), *((t, 4, v) for t, v in zip(marks, router))],
                    option="router"))  # fmt: skip
    runs.append(run("staged", "reap 8 -> 4", [(0, 4, 2.125), (20000, 4, 2.015625)], option="full", distill=True))
    staged = [(0, 6, 2.0625), (10000, 6, 2.03), (10000, 4, 2.1), (20000, 4, 2.0078125)]
    runs.append(run("staged", "reap 8 -> 6 -> 4", staged, STAGED, option="full", distill=True))
    runs.append(run("staged", "reap 8 -> 6", [(0, 6, 2.0625), (20000, 6, 2.00390625)], option="full", distill=True))
    runs.append(run("top1", "top-1", [(0, 8, 2.25)], "none", top_k=1, method=None, speed=TOP1_SPEED))
    runs.append(run("top1", "top-1 + recovery", [(0, 8, 2.25), (20000, 8, 2.0078125)], "none", top_k=1,
                    method=None, speed=TOP1_SPEED, option="full", distill=True))  # fmt: skip
    runs.append(run("final", "top-1, 8 -> 6 + recovery", [(0, 6, 2.5), (50000, 6, 2.03125)], top_k=1, params=800,
                    expert_flops=2048, speed="top-1, 8 -> 6 + recovery", option="full", distill=True))  # fmt: skip
    runs.append(run("final", "top-1, 8 -> 4 + recovery", [(0, 4, 2.75), (50000, 4, 2.0625)], top_k=1, params=600,
                    expert_flops=2048, speed="top-1, 8 -> 4 + recovery", option="full", distill=True))  # fmt: skip
    speeds = [
        Speed(BASE_SPEED, 1000.0, (1.0, 1.0, 1.0)),
        Speed(TOP1_SPEED, 1500.0, (1.5, 1.4, 1.625)),
        Speed("top-1, 8 -> 6 + recovery", 1600.0, (1.625, 1.5, 1.75)),
        Speed("top-1, 8 -> 4 + recovery", 1700.0, (1.75, 1.5, 2.0)),
    ]
    exports = [ExportCheck("a", "/x/a", 2.0, 2.0001), ExportCheck("b", "/x/b", 2.0, 2.0004)]
    base = BaseInfo("/base", BASE, 2, 8, 1000, 4096.0, 1_000_000, 100, 2.0000001, 0.75, "validation loss flat")
    return BenchResults(
        machine="test machine", command="python launch/bench.py compress", seconds=600.0, load=[1.0, 3.0, 2.0],
        val_tokens=32768, tokens_per_step=1000, base=base, best_method="reap",
        best_option="reap's best at 2 %: full, distilled", runs=runs, speeds=speeds, exports=exports,
    )  # fmt: skip


def rows(lines: list[str]) -> list[list[str]]:
    """A Markdown table's body rows as stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_the_one_shot_table_shows_each_method_at_25_and_50_percent():
    frequency, reap = rows(doc.one_shot_table(fake_results()))
    # frequency: 2 x 0.0625 at 8 -> 6 (6.25 % of 2.0), 4 x 0.0625 at 8 -> 4; KL half the gap, agreement 1 - gap
    assert frequency == ["frequency", "+0.1250 (+6.25 %)", "0.0625", "87.5 %", "+0.2500 (+12.50 %)", "0.1250",
                         "75.0 %"]  # fmt: skip
    assert reap[1] == "+0.0625 (+3.12 %)" and reap[4] == "+0.1250 (+6.25 %)"


def test_the_recovery_table_shows_the_gap_and_the_fraction_recovered_at_each_share():
    lines = doc.recovery_table(fake_results())
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[3:7] == [f"gap / recovered at {s} ({t} tokens)" for s, t in
                           (("0.5 %", "5,000"), ("1 %", "10,000"), ("2 %", "20,000"), ("5 %", "50,000"))]  # fmt: skip
    full, router = rows(lines)
    # cut +0.125, then +0.0625, +0.03125, +0.015625, +0.0078125: (0.125 - gap) / 0.125
    assert full[:7] == ["reap", "full, distilled", "+0.1250", "+0.0625 / 50 %", "+0.0312 / 75 %", "+0.0156 / 88 %",
                        "+0.0078 / 94 %"]  # fmt: skip
    # no better at 0.5 %, worse at 1 % (the gap doubled), 25 % and 50 % recovered later
    assert router[3:7] == ["+0.1250 / 0 %", "+0.2500 / -100 %", "+0.0938 / 25 %", "+0.0625 / 50 %"]
    assert fraction_recovered(2.125, 2.125, 2.125) != fraction_recovered(2.125, 2.125, 2.125)  # NaN: nothing cut


def test_the_staged_table_compares_the_final_gap_with_one_shots():
    one, staged = rows(doc.staged_table(fake_results()))  # the one-shot 8 -> 6 cell is the plot's, not a row
    assert one[:6] == ["reap", "one-shot", "8 -> 4", "full, distilled", "20,000", "+0.1250"]
    assert staged[:6] == ["reap", "staged", "8 -> 6 -> 4", "full, distilled", "20,000", "+0.0625, +0.1000"]
    assert staged[6] == "+0.0078 (+0.39 %)" and staged[-1] == "0.50x"  # 0.0078125 / 0.015625


def test_the_top1_and_final_tables_join_each_model_with_the_speed_timed_for_its_shape():
    base, top1, recovered = rows(doc.top1_table(fake_results()))
    assert base[-2:] == ["1,000", "1.00x (1.00-1.00)"]
    assert top1[:5] == ["top-1", "-", "0", "2.2500", "+0.2500 (+12.50 %)"] and top1[-3] == "-"
    # 0.25 -> 0.0078125: (0.25 - 0.0078125) / 0.25 = 96.875 % of the top-1 gap taken back
    assert recovered[1] == "full, distilled" and recovered[-3:] == ["96.9 %", "1,500", "1.50x (1.40-1.62)"]
    base, six, four = rows(doc.final_table(fake_results()))
    assert base[:2] == ["base (top-2)", "8"] and base[-4:-2] == ["4.1e+03", "1,000"]
    assert six[:6] == ["top-1, 8 -> 6 + recovery", "8 -> 6", "full, distilled", "50,000", "2.0312", "+0.0312 (+1.56 %)"]
    assert six[-4:] == ["2.05e+03", "800", "1,600", "1.62x (1.50-1.75)"]
    assert four[-4:] == ["2.05e+03", "600", "1,700", "1.75x (1.50-2.00)"]


def judged(res: BenchResults) -> dict[str, object]:
    return {t.target.split(":")[0]: t for t in targets(res)}


def test_every_target_is_judged_with_what_it_missed_by():
    got = judged(fake_results())
    assert len(got) == 10
    six = got["one-shot 8 -> 6"]  # reap 0.0625 vs frequency 0.125: 0.5x <= 0.6x
    assert six.met and six.measured == "reap +0.0625 vs frequency +0.1250: 0.50x"
    short = got["recovery at 50 % removed takes back >= 80 % of the gap with <= 2 % of the pretraining tokens"]
    assert short.met and short.measured == "reap, full, distilled: 87.5 % at 20,000 tokens"
    long = got["recovery at 50 % removed takes back >= 90 % of the gap with <= 5 % of the pretraining tokens"]
    assert long.met and long.measured == "reap, full, distilled: 93.8 % at 50,000 tokens"
    assert got["top-1 after recovery with <= 2 % of the pretraining tokens"].met  # +0.0078 <= 0.01
    staged = got["staged pruning ends with a >= 15 % smaller gap than one-shot at equal recovery tokens (best method)"]
    assert staged.met and staged.measured == "reap: staged +0.0078 vs one-shot +0.0156: 0.50x"
    quarter = got["top-1 with 25 % fewer experts, <= 5 % of the pretraining tokens"]
    half = got["top-1 with 50 % fewer experts, <= 5 % of the pretraining tokens"]
    assert quarter.met and half.met  # 1.5625 % <= 2 %, 3.125 % <= 5 %
    speed = got["the final models' training tokens/s >= 1.6x the base's, in one run"]
    assert speed.met and speed.measured.startswith("slowest top-1, 8 -> 6 + recovery: 1.62x")
    export = got["export"]  # the worst of the two: 2e-4 relative
    assert (export.met, export.missed_by, export.measured) == (False, "0.0001", "2.00e-04 (worst: b)")

    # just over each line the other way
    res = fake_results()
    cut = next(r for r in res.runs if r.table == "one_shot" and r.method == "reap" and r.experts == 6)
    cut.points = [Point(0, 6, q(2.09375))]  # 0.09375 / 0.125 = 0.75x
    router = next(r for r in res.runs if r.table == "recovery" and r.option == "router")
    res.runs = [r for r in res.runs if not (r.table == "recovery" and r.option == "full")]
    for r in res.runs:
        if r.table == "final" and r.experts == 6:
            r.points[-1] = Point(50000, 6, q(2.0625))  # 3.125 % > 2 %
        if r.table == "top1" and r.option:
            r.points[-1] = Point(20000, 8, q(2.015625))
    res.speeds[2] = Speed("top-1, 8 -> 6 + recovery", 1500.0, (1.5, 1.4, 1.6))
    got = judged(res)
    assert (got["one-shot 8 -> 6"].met, got["one-shot 8 -> 6"].missed_by) == (False, "0.15x")
    short = got["recovery at 50 % removed takes back >= 80 % of the gap with <= 2 % of the pretraining tokens"]
    assert (short.met, short.missed_by) == (False, "55 %-points") and router.option == "router"
    quarter = got["top-1 with 25 % fewer experts, <= 5 % of the pretraining tokens"]
    assert (quarter.met, quarter.missed_by) == (False, "1.12 %-points")
    top1 = got["top-1 after recovery with <= 2 % of the pretraining tokens"]
    assert (top1.met, top1.missed_by) == (False, "0.00562 nats/token")
    speed = got["the final models' training tokens/s >= 1.6x the base's, in one run"]
    assert (speed.met, speed.missed_by) == (False, "0.1x")


def test_a_target_with_nothing_to_judge_it_by_is_a_miss_that_says_so():
    res = fake_results()
    res.runs = [r for r in res.runs if r.table == "one_shot"]
    res.speeds, res.exports = [], []
    missed = [t for t in targets(res) if not t.met]
    assert len(missed) == 8 and {t.missed_by for t in missed} == {"not measured"}


def test_the_document_puts_machine_command_and_base_first_and_every_table_after():
    text = doc.render(fake_results(), "compression_quality.png")
    lines = text.splitlines()
    assert lines[0].startswith("Machine: test machine; 1-minute load average 1.0-3.0 (median 2.0) during the run")
    assert lines[2] == "Command: `python launch/bench.py compress`"
    assert lines[4].startswith("Base model: `/base` (100 steps, 1,000,000 pretraining tokens, validation loss flat)")
    assert "validation NLL **2.0000** nats/token on 32,768 validation tokens" in lines[4]
    assert "1,000 parameters, 4.1e+03 expert FLOPs/token, 75 % of the forward FLOPs." in lines[4]
    headings = [line for line in lines if line.startswith("###")]
    assert [h.split(" ")[1] for h in headings] == ["(a)", "(b)", "(c)", "(d)", "(e)", "Export", "Targets"]
    assert "![NLL gap against experts kept](compression_quality.png)" in lines
    # 7 header rows, then the body rows: (a) 2, (b) 2, (c) 2, (d) 3, (e) 3, export 2, targets 10
    assert sum(line.startswith("| ") for line in lines) == 7 + (2 + 2 + 2 + 3 + 3 + 2 + 10)


def test_the_measurements_round_trip_through_json():
    res = fake_results()
    again = BenchResults.from_json(res.to_json())
    assert again == res
    assert doc.render(again, "p.png") == doc.render(res, "p.png")


def test_the_plot_draws_each_method_before_and_after_recovery(tmp_path):
    series = doc.plot_series(fake_results())
    assert list(series) == ["frequency", "reap"]
    assert series["frequency"]["before"] == ([4, 6], [0.25, 0.125])
    assert series["frequency"]["after"] == ([], [])
    assert series["reap"]["after"] == ([4, 6], [0.015625, 0.00390625])  # the one-shot cells of table (b)
    path = doc.plot_quality(fake_results(), tmp_path / "docs" / "plot.png")
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (495, 825)  # 7.5 x 4.5 inches at 110 dpi


def test_a_run_folder_refuses_cells_of_other_settings(tmp_path):
    from moetrain.config import ConfigError
    from moetrain.interop.compress_bench import check_same_settings

    check_same_settings(tmp_path, {"optim": {"lr": 0.002}, "pretrain_tokens": 100})
    check_same_settings(tmp_path, {"optim": {"lr": 0.002}, "pretrain_tokens": 100})  # the same: resumes
    with pytest.raises(ConfigError, match=r"holds cells measured with optim.lr=0.002, not 0.0005; allowed: the same"):
        check_same_settings(tmp_path, {"optim": {"lr": 0.0005}, "pretrain_tokens": 100})


def test_the_cell_cache_gives_back_what_a_run_wrote(tmp_path):
    cache = CellCache(tmp_path / "cells.jsonl")
    assert cache.get("a") is None
    cache.put("a", {"run": {"x": 1}, "export": None})
    cache.put("b", {"run": {"x": 2}, "export": None})
    again = CellCache(tmp_path / "cells.jsonl")  # a rerun reads the file
    assert again.get("a") == {"key": "a", "run": {"x": 1}, "export": None} and again.get("b")["run"] == {"x": 2}
    with (tmp_path / "cells.jsonl").open("a") as f:
        f.write('{"key": "c", "ru')  # a run killed while it wrote its last cell
    torn = CellCache(tmp_path / "cells.jsonl")
    assert torn.get("c") is None and torn.get("b")["run"] == {"x": 2}  # that cell is measured again
    (tmp_path / "bad.jsonl").write_text('not json\n{"key": "a"}\n')
    from moetrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"bad.jsonl line 1 is not a cell"):
        CellCache(tmp_path / "bad.jsonl")


def test_the_cut_counts_follow_the_expert_count():
    assert plot_keeps(8, 2) == [7, 6, 5, 4, 3, 2]
    assert plot_keeps(8, 4) == [7, 6, 5, 4]  # top-4 (or min_experts 4): never fewer experts than that
    assert plot_keeps(64, 8) == [56, 48, 40, 32, 24, 16]
    assert plot_keeps(4, 2) == [3, 2]
    assert staged_path(8, 6) == [7, 6] and staged_path(8, 4) == [6, 4] and staged_path(64, 32) == [48, 32]


def test_the_measuring_ops_measure_once_per_model_state_and_forget_on_every_change():
    calls = []
    inner = SimpleNamespace(
        step=3,
        remove_experts=lambda keep: calls.append(("remove", keep)),
        restore=lambda path: calls.append(("restore", path)),
        merge_adapters=lambda: calls.append("merge"),
    )
    values = iter([2.5, 2.25, 2.125])
    ops = MeasuringOps(inner, lambda: q(next(values)))
    assert ops.step == 3  # everything else is the trainer's ops
    assert ops.validate() == ops.validate() == 2.5  # one measurement
    ops.remove_experts([[0, 1]])
    assert ops.validate() == 2.25 and ops.quality() == q(2.25)
    ops.merge_adapters()
    ops.restore(Path("snap"))
    assert ops.validate() == 2.125
    assert calls == [("remove", [[0, 1]]), "merge", ("restore", Path("snap"))]


class HFForward(nn.Module):
    """A transformers model behind our forward's interface (``.logits_BSV``)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, inputs_BS: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits_BSV=self.hf(inputs_BS).logits)


def test_quick_runs_every_table_end_to_end_and_caches_every_cell(tmp_path):
    """`--quick` on a tiny random Mixtral: the base's NLL is transformers' NLL of its directory on the same
    validation batches; every table is measured (recovery at the four shares); the recovery cells start from the
    one-shot cell's cut; the exports load in transformers with our NLL; every cell is in the folder's cache."""
    from transformers import AutoModelForCausalLM

    from moetrain.config import DataConfig
    from moetrain.interop.export import validation_loss

    run_dir = tmp_path / "run"
    cmd = [str(BIN / "python"), str(ROOT / "launch" / "bench.py"), "compress", "--quick", "--run-dir", str(run_dir)]
    first = run_launcher(cmd, tmp_path, timeout=300)  # a rerun's reading of the cache: a test of its own below
    res = BenchResults.from_json((run_dir / "results.json").read_text())
    assert res.quick and res.tokens_per_step == 64 and res.val_tokens == 2 * 2 * 32

    hf = AutoModelForCausalLM.from_pretrained(str(run_dir / "tiny-base")).eval()
    data = DataConfig(
        stdlib_glob="[a-c]*.py", tokenizer="byte", cache_dir=str(ROOT / ".pytest_cache" / "moetrain-data")
    )
    assert res.base.nll == pytest.approx(validation_loss(HFForward(hf), data, 32, 2, 1, 2, seed=1234), rel=1e-5)

    tables = {t: res.table(t) for t in ("one_shot", "staged", "recovery", "top1", "final")}
    assert len(tables["one_shot"]) == 10 * 2  # every method at 8 -> 6 and 8 -> 4
    assert {r.method for r in tables["one_shot"]} >= {"merge", "merge_ream", "reap, global ranking", "mone"}
    assert all(r.final.kl > 0 for r in tables["one_shot"])  # every method's cut changed the model (measured anew)
    assert len(tables["recovery"]) == 2 * 3 * 2  # best method and frequency x router/lora/full x distillation
    for r in tables["recovery"]:
        cut = next(c for c in tables["one_shot"] if c.method == r.method and c.experts == 4)
        assert r.cut == cut.final  # the same cut through the same round, measured again
        assert [p.tokens for p in r.points] == [0, 64, 128, 256, 640]  # 0.5, 1, 2, 5 % of 12,800
    assert len(tables["staged"]) % 3 == 0 and {r.schedule for r in tables["staged"]} == {ONE_SHOT, STAGED}
    assert [r.option for r in tables["top1"]] == [None, "router", "router", "lora", "lora", "full", "full"]
    assert [r.experts for r in tables["final"]] == [6, 4] and all(r.top_k == 1 for r in tables["final"])
    assert [s.name for s in res.speeds] == [BASE_SPEED, TOP1_SPEED, *(r.name for r in tables["final"])]
    for export in res.exports:  # transformers loads the smaller top-1 Mixtral with our validation NLL
        assert export.rel < 1e-4
        assert json.loads((Path(export.path) / "config.json").read_text())["num_experts_per_tok"] == 1
    text = (run_dir / "compression.md").read_text()
    assert text.count("<!-- compress:start -->") == 1 and "### (e)" in text and "### Targets" in text
    assert (run_dir / "compression_quality.png").is_file()
    cells = len((run_dir / "cells.jsonl").read_text().splitlines())
    assert cells == len(res.runs) and first.stdout.count("measured before") == 0


class FakeBench:
    """The session's surface a study's cells use; counts the cells it measures."""

    def __init__(self) -> None:
        self.measured: list[str] = []
        self.said: list[str] = []

    def run(self, name, method, path, option, distill, top_k, steps, marks) -> Run:
        self.measured.append(name)
        return Run(name, method and method.name, ONE_SHOT, top_k or 2, distill, [Point(steps, 6, q(2.125))])

    def export_check(self, name, quality) -> ExportCheck:
        return ExportCheck(name, f"/x/{name}", quality.nll, quality.nll)

    def say(self, line: str) -> None:
        self.said.append(line)

    def minutes(self) -> float:
        return 0.5


def test_a_rerun_in_the_same_folder_reads_every_finished_cell_and_measures_the_rest(tmp_path):
    from moetrain.interop.compress_bench import METHODS, Study

    def cells(study: Study, upto: int) -> list[Run]:
        return [study.cell("one_shot", f"m{i}", METHODS[i], [6], export=i == 0) for i in range(upto)]

    first_bench = FakeBench()
    first = cells(Study(first_bench, CellCache(tmp_path / "cells.jsonl")), 2)  # a study stopped after two cells
    again_bench = FakeBench()
    again = Study(again_bench, CellCache(tmp_path / "cells.jsonl"))
    runs = cells(again, 3)
    assert first_bench.measured == ["m0", "m1"] and again_bench.measured == ["m2"]  # only the missing cell
    assert runs[:2] == [replace(r, table="one_shot") for r in first] and again.exports == [
        ExportCheck("m0", "/x/m0", 2.125, 2.125)
    ]
    assert sum("measured before" in line for line in again_bench.said) == 2
