"""`python launch/bench.py compress`: the document's tables, targets and plot written from fake measurements (every
rendered number checked against a value worked out by hand), the benchmark's pieces (cut counts, the measuring
ops), and one run of the whole driver on a tiny imported Mixtral through the real command line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.launch import BIN, ROOT, run_launcher
from torch import nn

from moetrain.interop.bench_session import MeasuringOps
from moetrain.interop.compress_bench import plot_keeps, staged_path
from moetrain.metrics import compression_bench as doc
from moetrain.metrics.compression_results import (
    BASE_SPEED,
    ONE_SHOT,
    STAGED,
    TOP1_RECOVERED,
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


def run(name: str, points: list[tuple[int, int, float]], schedule: str = ONE_SHOT, **kw) -> Run:
    return Run(name, kw.pop("criterion", "reap"), schedule, kw.pop("top_k", 2), kw.pop("distill", False),
               [Point(t, e, q(nll)) for t, e, nll in points], **kw)  # fmt: skip


def fake_results() -> BenchResults:
    cuts = []
    for criterion, per_expert in (("frequency", 0.0625), ("reap", 0.03125)):  # gap = per_expert x experts removed
        for kept in (7, 6, 5, 4, 3, 2):
            cuts.append(run(criterion, [(0, kept, BASE + per_expert * (8 - kept))], criterion=criterion))
        for path, gap in (([7, 6], per_expert), ([6, 4], 2 * per_expert)):
            points = [(0, path[0], BASE + per_expert * (8 - path[0])), (0, path[1], BASE + gap)]
            cuts.append(run(criterion, points, STAGED, criterion=criterion))
    full = run("full training", [(0, 4, 2.125), (5000, 4, 2.0625), (10000, 4, 2.03125), (20000, 4, 2.015625)])
    router = run("router only", [(0, 4, 2.125), (5000, 4, 2.125), (10000, 4, 2.25), (20000, 4, 2.09375)], distill=True)
    staged = run("full training", [(0, 6, 2.0625), (10000, 6, 2.03), (10000, 4, 2.1), (20000, 4, 2.0078125)], STAGED)
    top1 = [
        run("top-1", [(0, 8, 2.25)], "none", top_k=1, criterion=None, speed=TOP1_SPEED, params=1000, expert_flops=2048),
        run(TOP1_RECOVERED, [(0, 8, 2.25), (20000, 8, 2.015625)], "none", top_k=1, criterion=None, speed=TOP1_SPEED,
            params=1000, expert_flops=2048),
        run("top-1, 8 -> 6 + recovery", [(0, 6, 2.5), (20000, 6, 2.015625)], top_k=1, params=800, expert_flops=2048,
            speed="top-1, 8 -> 6 + recovery"),
        run("top-1, 8 -> 6 -> 4 + recovery", [(0, 6, 2.5), (10000, 6, 2.1), (10000, 4, 2.3), (20000, 4, 2.0625)],
            STAGED, top_k=1, params=600, expert_flops=2048),
    ]  # fmt: skip
    speeds = [
        Speed(BASE_SPEED, 1000.0, (1.0, 1.0, 1.0)),
        Speed(TOP1_SPEED, 1500.0, (1.5, 1.4, 1.625)),
        Speed("top-1, 8 -> 6 + recovery", 1600.0, (1.6, 1.5, 1.75)),
    ]
    exports = [ExportCheck("a", "/x/a", 2.0, 2.0001), ExportCheck("b", "/x/b", 2.0, 2.0004)]
    base = BaseInfo("/base", BASE, 2, 8, 1000, 4096.0, 1_000_000, 100, 2.0000001, 0.75, "validation loss flat")
    return BenchResults(
        machine="test machine", command="python launch/bench.py compress", seconds=600.0, load=[1.0, 3.0, 2.0],
        val_tokens=32768, tokens_per_step=1000, budget_tokens=20000, budget_fraction=0.02, base=base,
        best_criterion="reap", best_option="full training", cuts=cuts, recoveries=[full, router],
        staged=[full, staged], top1=top1, speeds=speeds, exports=exports,
    )  # fmt: skip


def rows(lines: list[str]) -> list[list[str]]:
    """A Markdown table's body rows as stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_the_criterion_table_shows_each_cut_as_gap_kl_and_agreement():
    table = rows(doc.criterion_table(fake_results()))
    assert [r[:2] for r in table] == [
        ["frequency", "25 % (8 -> 6)"],
        ["frequency", "50 % (8 -> 4)"],
        ["reap", "25 % (8 -> 6)"],
        ["reap", "50 % (8 -> 4)"],
    ]
    # frequency, 50 %: one-shot gap 4 x 0.0625 = 0.25 (12.5 % of 2.0), KL 0.125, agreement 0.75; staged 2 x 0.0625
    assert table[1][2:] == ["+0.2500 (+12.50 %)", "0.1250", "75.0 %", "+0.1250 (+6.25 %)", "0.0625", "87.5 %",
                            "8 -> 6 -> 4"]  # fmt: skip
    # reap, 25 %: one-shot 2 x 0.03125; staged 8 -> 7 -> 6 ends at 0.03125
    assert table[2][2:] == ["+0.0625 (+3.12 %)", "0.0312", "93.8 %", "+0.0312 (+1.56 %)", "0.0156", "96.9 %",
                            "8 -> 7 -> 6"]  # fmt: skip


def test_the_recovery_table_shows_the_gap_and_the_fraction_recovered_at_each_share_of_the_budget():
    lines = doc.recovery_table(fake_results())
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[3:6] == ["gap at 5,000 tokens (25 %)", "gap at 10,000 tokens (50 %)", "gap at 20,000 tokens (100 %)"]
    assert header[-1] == "gap recovered at 25 / 50 / 100 %"
    full, router = rows(lines)
    # cut +0.125, then +0.0625, +0.03125, +0.015625: (0.125 - gap) / 0.125 = 50, 75, 87.5 %
    assert full == ["full training", "no", "+0.1250", "+0.0625", "+0.0312", "+0.0156", "0.0078", "98.4 %",
                    "50 % / 75 % / 88 %"]  # fmt: skip
    # no better at 25 %, worse at 50 % (the gap doubled), 25 % recovered at the end
    assert router[1] == "yes" and router[-1] == "0 % / -100 % / 25 %"
    assert fraction_recovered(2.125, 2.125, 2.125) != fraction_recovered(2.125, 2.125, 2.125)  # NaN: nothing was cut


def test_the_staged_table_lists_the_gap_after_every_cut():
    one, staged = rows(doc.staged_table(fake_results()))
    assert one == ["one-shot", "8 -> 4", "20,000", "+0.1250", "+0.0156 (+0.78 %)", "0.0078", "98.4 %"]
    assert staged[:5] == ["staged", "8 -> 6 -> 4", "20,000", "+0.0625, +0.1000", "+0.0078 (+0.39 %)"]


def test_the_top1_table_joins_each_model_with_the_speed_timed_for_its_shape():
    base, top1, recovered, final6, final4 = rows(doc.top1_table(fake_results()))
    assert base == ["base", "8", "2", "-", "2.0000", "-", "-", "-", "4.1e+03", "1,000", "1,000", "1.00x (1.00-1.00)"]
    assert top1[:6] == ["top-1", "8", "1", "0", "2.2500", "+0.2500 (+12.50 %)"]
    assert recovered[-2:] == top1[-2:] == ["1,500", "1.50x (1.40-1.62)"]
    assert final6[1] == "8 -> 6" and final6[-2:] == ["1,600", "1.60x (1.50-1.75)"]
    assert final4[1] == "8 -> 6 -> 4" and final4[-2:] == ["-", "-"]  # not timed
    assert [r[-3] for r in (final6, final4)] == ["800", "600"]


def test_every_target_is_judged_with_what_it_missed_by():
    res = fake_results()
    got = {t.target.split(":")[0].split(" at ")[0]: t for t in targets(res)}
    assert len(got) == 7
    one_shot = got["one-shot 8 -> 4"]  # reap 0.125 vs frequency 0.25: 0.5x, on the line
    assert (one_shot.met, one_shot.missed_by) == (True, "-")
    assert one_shot.measured == "reap +0.1250 vs frequency +0.2500: 0.50x"
    recovery = got["recovery"]  # the best option recovered 87.5 % (router only: 25 %)
    assert recovery.met and recovery.measured == "full training: 87.5 % at 2.00 % of pretraining"
    final = got["the final model (top-1, >= 25 % fewer experts) within 1 % of the base's NLL"]
    assert final.met and final.measured.startswith("top-1, 8 -> 6 + recovery: +0.0156 (+0.78 %)")
    assert got["top-1 after recovery"].met  # +0.015625 <= 0.02
    staged = got["staged pruning ends with a >= 15 % smaller gap than one-shot"]
    assert staged.met and staged.measured == "staged +0.0078 vs one-shot +0.0156: 0.50x"
    speed = got["speed"]  # 1.5x against 1.6x
    assert (speed.met, speed.missed_by) == (False, "0.1x")
    export = got["export"]  # the worst of the two: 2e-4 relative
    assert (export.met, export.missed_by, export.measured) == (False, "0.0001", "2.00e-04 (worst: b)")

    # just over each line the other way
    res.cuts = [r for r in res.cuts if not (r.criterion == "reap" and r.schedule == ONE_SHOT and r.experts == 4)]
    res.cuts.append(run("reap", [(0, 4, 2.1875)], criterion="reap"))  # 0.1875 / 0.25 = 0.75x
    res.recoveries = [res.recoveries[1]]  # only router only: 25 %
    res.top1[1] = run(TOP1_RECOVERED, [(0, 8, 2.25), (20000, 8, 2.03125)], "none", top_k=1, criterion=None)
    res.top1 = [r for r in res.top1 if "8 -> 6 +" not in r.name]  # the final left is 3.125 % worse
    res.staged[1] = run("full training", [(0, 6, 2.0625), (20000, 4, 2.015625)], STAGED)  # equal: 1.0x
    res.speeds[1] = Speed(TOP1_SPEED, 1700.0, (1.75, 1.5, 2.0))
    res.exports = res.exports[:1]
    got = {t.target.split(":")[0].split(" at ")[0]: t for t in targets(res)}
    assert (got["one-shot 8 -> 4"].met, got["one-shot 8 -> 4"].missed_by) == (False, "0.25x")
    assert (got["recovery"].met, got["recovery"].missed_by) == (False, "55 %-points")
    final = got["the final model (top-1, >= 25 % fewer experts) within 1 % of the base's NLL"]
    assert (final.met, final.missed_by) == (False, "2.12 %-points")
    assert (got["top-1 after recovery"].met, got["top-1 after recovery"].missed_by) == (False, "0.0112 nats/token")
    staged = got["staged pruning ends with a >= 15 % smaller gap than one-shot"]
    assert (staged.met, staged.missed_by) == (False, "0.15x")
    assert got["speed"].met and got["export"].met  # 1.75x; 5e-5 relative


def test_a_target_with_nothing_to_judge_it_by_is_a_miss_that_says_so():
    res = fake_results()
    res.recoveries, res.staged, res.speeds, res.exports = [], [], [], []
    missed = [t for t in targets(res) if not t.met]
    assert len(missed) == 4 and {t.missed_by for t in missed} == {"not measured"}


def test_the_document_puts_machine_command_and_base_first_and_every_table_after():
    text = doc.render(fake_results(), "compression_quality.png")
    lines = text.splitlines()
    assert lines[0].startswith("Machine: test machine; 1-minute load average 1.0-3.0 (median 2.0) during the run")
    assert lines[2] == "Command: `python launch/bench.py compress`"
    assert lines[4].startswith("Base model: `/base` (100 steps, 1,000,000 pretraining tokens, validation loss flat)")
    assert "validation NLL **2.0000** nats/token on 32,768 validation tokens" in lines[4]
    assert "its pretraining run's final validation loss 2.0000; 8 experts per layer, top-2" in lines[4]
    assert "1,000 parameters, 4.1e+03 expert FLOPs/token, 75 % of the forward FLOPs." in lines[4]
    assert lines[6] == ("Recovery budget: 20,000 tokens (20 steps of 1,000) = 2.00 % of the pretraining tokens "
                        "(asked: 2 %).")  # fmt: skip
    headings = [line for line in lines if line.startswith("###")]
    assert [h.split(".")[0] for h in headings[:3]] == ["### 1", "### 2", "### 3"]
    assert headings[3:] == ["### Export", "### Targets"]
    assert "![NLL gap against experts kept](compression_quality.png)" in lines
    assert sum(line.startswith("| ") for line in lines) == 4 + 1 + 2 + 1 + 2 + 1 + 5 + 1 + 2 + 1 + 7 + 1  # + headers


def test_the_measurements_round_trip_through_json():
    res = fake_results()
    again = BenchResults.from_json(res.to_json())
    assert again == res
    assert doc.render(again, "p.png") == doc.render(res, "p.png")


def test_the_plot_draws_each_criterion_against_the_experts_kept(tmp_path):
    series = doc.plot_series(fake_results())
    assert list(series) == ["frequency", "reap"]
    xs, ys = series["frequency"][ONE_SHOT]
    assert xs == [2, 3, 4, 5, 6, 7] and ys == pytest.approx([0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625])
    assert series["reap"][STAGED] == ([4, 6], [0.0625, 0.03125])
    path = doc.plot_quality(fake_results(), tmp_path / "docs" / "plot.png")
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (462, 770)  # 7 x 4.2 inches at 110 dpi


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


def test_the_benchmark_runs_end_to_end_on_a_tiny_imported_mixtral(tmp_path):
    """The real command line on a 2-layer, 4-expert Mixtral: the base's NLL is transformers' NLL of the directory on
    the same validation batches, the recovery table's cut is the criterion table's cut, the budget and its marks
    are the asked share of the pretraining tokens, and the document and the plot are written."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moetrain.config import DataConfig
    from moetrain.interop.export import validation_loss

    cfg = MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the default init so routing matters
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(str(tmp_path / "hf"))
    out, run_dir = tmp_path / "docs" / "compression.md", tmp_path / "run"
    glob = "[a-c]*.py"
    # 4 steps of 2 x 32 tokens = 2 % of 12,800
    cmd = [str(BIN / "python"), str(ROOT / "launch" / "bench.py"), "compress", f"model.init_from=hf:{tmp_path}/hf",
           "--pretrain-tokens", "12800", "--criteria", "frequency,reap", "--options", "full training", "--distill",
           "off", "--timing-rounds", "1", "--run-dir", str(run_dir), "--doc", str(out), "model.seq_len=32",
           "trainer.micro_batch_size=2", "trainer.eval_batches=2", "prune.profile_tokens=128", "prune.merge_tokens=128",
           f"data.stdlib_glob='{glob}'"]  # fmt: skip
    run_launcher(cmd, tmp_path, timeout=300)
    res = BenchResults.from_json((run_dir / "results.json").read_text())

    data = DataConfig(stdlib_glob=glob, tokenizer="byte", cache_dir=str(ROOT / ".pytest_cache" / "moetrain-data"))
    ours = validation_loss(HFForward(hf), data, 32, 2, 1, 2, seed=1234)
    assert res.base.nll == pytest.approx(ours, rel=1e-5)
    assert res.val_tokens == 2 * 2 * 32
    assert (res.budget_tokens, res.tokens_per_step) == (256, 64)
    cut = next(r for r in res.cuts if r.criterion == res.best_criterion and r.schedule == ONE_SHOT and r.experts == 2)
    (recovery,) = res.recoveries
    assert recovery.cut == cut.final  # the same cut through the same round, measured again
    assert [p.tokens for p in recovery.points] == [0, 64, 128, 256]  # after the cut, 25 %, 50 %, 100 % of the budget
    assert [r.schedule for r in res.staged] == [ONE_SHOT, STAGED] and res.staged[1].path(4) == "4 -> 3 -> 2"
    assert [r.experts for r in res.top1] == [4, 4, 3, 2] and all(r.top_k == 1 for r in res.top1)
    assert [s.name for s in res.speeds] == [BASE_SPEED, TOP1_SPEED, *(r.name for r in res.top1[2:])]
    for export in res.exports:  # transformers loads the smaller top-1 Mixtral with our validation NLL
        assert export.rel < 1e-4
        assert json.loads((Path(export.path) / "config.json").read_text())["num_experts_per_tok"] == 1
    text = out.read_text()
    assert text.count("<!-- compress:start -->") == 1 and "### Targets" in text
    assert (out.parent / "compression_quality.png").is_file()
