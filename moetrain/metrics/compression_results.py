"""The compression benchmark's measurements (``python launch/bench.py compress``) as data, and the targets of
issue 22 judged on them. The driver (:mod:`moetrain.interop.compress_bench`) fills :class:`BenchResults`; it
round-trips through JSON (a run's ``results.json``), so the document (:mod:`moetrain.metrics.compression_bench`)
can be written again without measuring.

Every quality number compares a model with the base model on the same validation tokens:

- NLL gap = ``L_model - L_base`` (nats/token), and in % of ``L_base``;
- KL = mean over tokens of ``KL(p_base || p_model)`` at temperature 1;
- agreement = the fraction of tokens whose top-1 next token is the base's;
- fraction of the gap recovered = ``(L_cut - L_recovered) / (L_cut - L_base)`` (1: back at the base, 0: no better
  than right after the cut, < 0: worse).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

ONE_SHOT, STAGED = "one-shot", "staged"
# where a target sits (issue 22): these are read by targets() and named in its rows
FREQUENCY = "frequency"
TOP1_RECOVERED = "top-1 + recovery"
FINAL_PREFIX = "top-1, "  # the final models' names: "top-1, 8 -> 6 + recovery", ...
BASE_SPEED, TOP1_SPEED = "base", "base at top-1"


@dataclass
class Quality:
    """A model against the base on the validation tokens."""

    nll: float  # mean next-token cross-entropy (nats/token)
    kl: float  # mean KL(base || model)
    agree: float  # top-1 next-token agreement with the base


@dataclass
class Point:
    """A measurement along a run: after ``tokens`` recovery tokens, with ``experts`` experts per layer."""

    tokens: int
    experts: int
    quality: Quality


@dataclass
class Run:
    """One cell: cuts (pruning rounds) and recovery training from the base, measured at ``points`` (the first
    right after the first cut, or at the start when nothing is cut; the last at the end)."""

    name: str
    criterion: str | None
    schedule: str  # one-shot | staged | none
    top_k: int
    distill: bool
    points: list[Point]
    params: int = 0
    expert_flops: float = 0.0  # forward expert-FFN FLOPs per token
    speed: str | None = None  # the Speed row that timed this model's shape

    @property
    def cut(self) -> Quality:
        return self.points[0].quality

    @property
    def final(self) -> Quality:
        return self.points[-1].quality

    @property
    def experts(self) -> int:
        return self.points[-1].experts

    @property
    def tokens(self) -> int:
        return self.points[-1].tokens

    def path(self, start: int) -> str:
        """The experts per layer from ``start`` through every cut, e.g. ``8 -> 6 -> 4``."""
        counts = [start]
        for p in self.points:
            if p.experts != counts[-1]:
                counts.append(p.experts)
        return " -> ".join(map(str, counts))


@dataclass
class Speed:
    """Training tokens/s (forward + backward of the training loss) of one model, timed in the same rounds as the
    base; ``vs_base``: the median, lowest and highest over rounds of ``t_base / t_model`` in the same round."""

    name: str
    tokens_per_s: float
    vs_base: tuple[float, float, float]


@dataclass
class ExportCheck:
    """A model exported to a Hugging Face directory: its validation NLL computed by transformers and by us."""

    name: str
    path: str
    nll_ours: float
    nll_hf: float

    @property
    def rel(self) -> float:
        return abs(self.nll_hf - self.nll_ours) / self.nll_ours


@dataclass
class BaseInfo:
    path: str
    nll: float
    top_k: int
    experts: int
    params: int
    expert_flops: float
    pretrain_tokens: int
    steps: int | None = None
    meta_val_loss: float | None = None  # the pretraining run's own final validation loss
    expert_share: float | None = None  # the experts' share of the forward FLOPs at the base's top-k
    flatness: str | None = None


@dataclass
class BenchResults:
    machine: str
    command: str
    seconds: float
    load: list[float]  # 1-minute load averages sampled during the run
    val_tokens: int
    tokens_per_step: int
    budget_tokens: int  # the recovery budget actually trained (whole steps)
    budget_fraction: float  # what it was asked to be, of the pretraining tokens
    base: BaseInfo
    best_criterion: str
    best_option: str
    cuts: list[Run] = field(default_factory=list)
    recoveries: list[Run] = field(default_factory=list)
    staged: list[Run] = field(default_factory=list)  # [one-shot, staged] at equal recovery tokens
    top1: list[Run] = field(default_factory=list)
    speeds: list[Speed] = field(default_factory=list)
    exports: list[ExportCheck] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BenchResults:
        raw = json.loads(text)

        def run(r: dict[str, Any]) -> Run:
            points = [Point(p["tokens"], p["experts"], Quality(**p["quality"])) for p in r["points"]]
            return Run(**{**r, "points": points})

        return cls(
            **{
                **raw,
                "base": BaseInfo(**raw["base"]),
                **{key: [run(r) for r in raw[key]] for key in ("cuts", "recoveries", "staged", "top1")},
                "speeds": [Speed(s["name"], s["tokens_per_s"], tuple(s["vs_base"])) for s in raw["speeds"]],
                "exports": [ExportCheck(**e) for e in raw["exports"]],
            }
        )


# ---------------------------------------------------------------------------------------------- numbers
def fraction_recovered(cut: float, recovered: float, base: float) -> float:
    """``(L_cut - L_recovered) / (L_cut - L_base)``; NaN when the cut cost nothing."""
    return (cut - recovered) / (cut - base) if cut != base else math.nan


def one_shot_cut(cuts: list[Run], criterion: str, kept: int) -> Run | None:
    return next((r for r in cuts if r.criterion == criterion and r.schedule == ONE_SHOT and r.experts == kept), None)


def best_criterion(cuts: list[Run], kept: int) -> str:
    """The criterion whose one-shot cut to ``kept`` experts has the lowest NLL."""
    rows = [r for r in cuts if r.schedule == ONE_SHOT and r.experts == kept]
    return min(rows, key=lambda r: r.final.nll).criterion


def best_recovery(runs: list[Run], base_nll: float) -> Run:
    """The recovery run that takes back the largest fraction of its cut's gap by the end."""
    return max(runs, key=lambda r: fraction_recovered(r.cut.nll, r.final.nll, base_nll))


def recovery_label(run: Run) -> str:
    return f"{run.name}{', distilled' if run.distill else ''}"


def signed(x: float, digits: int = 4) -> str:
    return "-" if math.isnan(x) else f"{x:+.{digits}f}"


def gap_text(q: Quality, base: float) -> str:
    """``+0.1234 (+5.67 %)``"""
    return f"{signed(q.nll - base)} ({100 * (q.nll - base) / base:+.2f} %)"


def pct(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.{digits}f} %"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    target: str
    measured: str
    met: bool
    missed_by: str  # "-" when met


def _judge(target: str, measured: str, value: float, limit: float, at_most: bool, unit: str = "") -> Target:
    """``value`` against ``limit`` (``at_most``: value <= limit, else value >= limit); NaN never meets it. Missed
    by ``|value - limit|`` in ``unit``."""
    met = (value <= limit if at_most else value >= limit) if not math.isnan(value) else False
    miss = "-" if met else ("not measured" if math.isnan(value) else f"{abs(value - limit):.3g}{unit}")
    return Target(target, measured, met, miss)


def _criteria_target(res: BenchResults) -> Target:
    b, E = res.base, res.base.experts
    name = f"one-shot {E} -> {E // 2} at top-{b.top_k}: best criterion's NLL gap <= 0.5x frequency's"
    freq = one_shot_cut(res.cuts, FREQUENCY, E // 2)
    others = [r for r in res.cuts if r.schedule == ONE_SHOT and r.experts == E // 2 and r.criterion != FREQUENCY]
    if not (freq and others):
        return _judge(name, "not measured", math.nan, 0.5, at_most=True)
    best = min(others, key=lambda r: r.final.nll)
    g_best, g_freq = best.final.nll - b.nll, freq.final.nll - b.nll
    measured = f"{best.criterion} {signed(g_best)} vs frequency {signed(g_freq)}: {g_best / g_freq:.2f}x"
    return _judge(name, measured, g_best / g_freq, 0.5, at_most=True, unit="x")


def _recovery_target(res: BenchResults) -> Target:
    b = res.base
    name = (f"recovery at 50 % removed with <= {100 * res.budget_fraction:g} % of the pretraining tokens takes back "
            ">= 80 % of the gap")  # fmt: skip
    if not res.recoveries:
        return _judge(name, "not measured", math.nan, 80.0, at_most=False)
    best = best_recovery(res.recoveries, b.nll)
    frac = fraction_recovered(best.cut.nll, best.final.nll, b.nll)
    measured = f"{recovery_label(best)}: {pct(frac)} at {pct(best.tokens / b.pretrain_tokens, 2)} of pretraining"
    return _judge(name, measured, 100 * frac, 80.0, at_most=False, unit=" %-points")


def _final_target(res: BenchResults) -> Target:
    b = res.base
    name = "the final model (top-1, >= 25 % fewer experts) within 1 % of the base's NLL"
    finals = [r for r in res.top1 if r.name.startswith(FINAL_PREFIX) and r.experts <= b.experts * 3 // 4]
    if not finals:
        return _judge(name, "not measured", math.nan, 1.0, at_most=True)
    best = min(finals, key=lambda r: r.final.nll)
    rel = 100 * (best.final.nll - b.nll) / b.nll
    return _judge(name, f"{best.name}: {gap_text(best.final, b.nll)}", rel, 1.0, at_most=True, unit=" %-points")


def _top1_target(res: BenchResults) -> Target:
    name = "top-1 after recovery: at most +0.02 nats/token over the top-2 base"
    top1 = next((r for r in res.top1 if r.name == TOP1_RECOVERED), None)
    if top1 is None:
        return _judge(name, "not measured", math.nan, 0.02, at_most=True)
    gap = top1.final.nll - res.base.nll
    return _judge(name, f"{signed(gap)} nats/token", gap, 0.02, at_most=True, unit=" nats/token")


def _staged_target(res: BenchResults) -> Target:
    name = "staged pruning ends with a >= 15 % smaller gap than one-shot at equal recovery tokens"
    runs = {r.schedule: r for r in res.staged}
    if ONE_SHOT not in runs or STAGED not in runs:
        return _judge(name, "not measured", math.nan, 0.85, at_most=True)
    g1, g2 = runs[ONE_SHOT].final.nll - res.base.nll, runs[STAGED].final.nll - res.base.nll
    measured = f"staged {signed(g2)} vs one-shot {signed(g1)}: {g2 / g1:.2f}x"
    return _judge(name, measured, g2 / g1, 0.85, at_most=True, unit="x")


def _speed_target(res: BenchResults) -> Target:
    name = f"speed: top-1 training tokens/s >= 1.6x top-{res.base.top_k}'s on the base shape, in one run"
    s = next((s for s in res.speeds if s.name == TOP1_SPEED), None)
    if s is None:
        return _judge(name, "not measured", math.nan, 1.6, at_most=False)
    m, lo, hi = s.vs_base
    return _judge(name, f"{m:.2f}x (range over rounds {lo:.2f}-{hi:.2f})", m, 1.6, at_most=False, unit="x")


def _export_target(res: BenchResults) -> Target:
    name = "export: transformers' validation NLL equals ours to 1e-4 relative"
    if not res.exports:
        return _judge(name, "not measured", math.nan, 1e-4, at_most=True)
    worst = max(res.exports, key=lambda e: e.rel)
    return _judge(name, f"{worst.rel:.2e} (worst: {worst.name})", worst.rel, 1e-4, at_most=True)


def targets(res: BenchResults) -> list[Target]:
    """Every target of issue 22, judged on this run; a target with nothing to judge it by is a miss."""
    judges = (_criteria_target, _recovery_target, _final_target, _top1_target, _staged_target, _speed_target,
              _export_target)  # fmt: skip
    return [judge(res) for judge in judges]
