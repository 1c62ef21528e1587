"""The compression study's measurements (``python launch/bench.py compress``) as data, and its targets judged on
them. The driver (:mod:`moetrain.interop.compress_bench`) fills :class:`BenchResults`; it round-trips through JSON
(a run's ``results.json``; every finished cell also goes to ``cells.jsonl`` as it ends), so the document
(:mod:`moetrain.metrics.compression_bench`) can be written again without measuring.

Every quality number compares a model with the base model on the same validation tokens:

- NLL gap = ``L_model - L_base`` (nats/token), and in % of ``L_base``;
- KL = mean over tokens of ``KL(p_base || p_model)`` at temperature 1;
- agreement = the fraction of tokens whose top-1 next token is the base's;
- fraction of the gap recovered = ``(L_cut - L_recovered) / (L_cut - L_base)`` (1: back at the base, 0: no better
  than right after the cut, < 0: worse).

The study's tables (``Run.table``): ``one_shot`` (a), ``staged`` (b), ``recovery`` (c), ``top1`` (d), ``final`` (e).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

ONE_SHOT, STAGED = "one-shot", "staged"
FREQUENCY = "frequency"
BASE_SPEED, TOP1_SPEED = "base", "base at top-1"
# the shares of the base's pretraining tokens recovery is measured at (table c), and the two the targets name
RECOVERY_SHARES = (0.005, 0.01, 0.02, 0.05)
SHORT, LONG = 0.02, 0.05


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
    """One cell: cuts (pruning rounds by ``method``) and recovery training (``option``, with or without
    distillation from the base) from the base, measured at ``points`` (the first right after the first cut, or at
    the start when nothing is cut; the last at the end)."""

    name: str
    method: str | None
    schedule: str  # one-shot | staged | none
    top_k: int
    distill: bool
    points: list[Point]
    params: int = 0
    expert_flops: float = 0.0  # forward expert-FFN FLOPs per token
    speed: str | None = None  # the Speed row that timed this model's shape
    table: str = ""
    option: str | None = None  # the recovery option's label (router | lora | full); None: no recovery

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

    def at(self, tokens: int) -> Quality | None:
        """The measurement after ``tokens`` recovery tokens (None: not measured there)."""
        return next((p.quality for p in reversed(self.points) if p.tokens == tokens), None)

    def path(self, start: int) -> str:
        """The experts per layer from ``start`` through every cut, e.g. ``8 -> 6 -> 4``."""
        counts = [start]
        for p in self.points:
            if p.experts != counts[-1]:
                counts.append(p.experts)
        return " -> ".join(map(str, counts))

    @classmethod
    def from_dict(cls, r: dict[str, Any]) -> Run:
        points = [Point(p["tokens"], p["experts"], Quality(**p["quality"])) for p in r["points"]]
        return cls(**{**r, "points": points})


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
    base: BaseInfo
    best_method: str  # the method with the lowest one-shot NLL at 50 % removed
    best_option: str  # the recovery (option, distillation) that takes back most of the gap at 2 %
    runs: list[Run] = field(default_factory=list)
    speeds: list[Speed] = field(default_factory=list)
    exports: list[ExportCheck] = field(default_factory=list)
    quick: bool = False

    def table(self, name: str) -> list[Run]:
        return [r for r in self.runs if r.table == name]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BenchResults:
        raw = json.loads(text)
        return cls(
            **{
                **raw,
                "base": BaseInfo(**raw["base"]),
                "runs": [Run.from_dict(r) for r in raw["runs"]],
                "speeds": [Speed(s["name"], s["tokens_per_s"], tuple(s["vs_base"])) for s in raw["speeds"]],
                "exports": [ExportCheck(**e) for e in raw["exports"]],
            }
        )


# ---------------------------------------------------------------------------------------------- numbers
def fraction_recovered(cut: float, recovered: float, base: float) -> float:
    """``(L_cut - L_recovered) / (L_cut - L_base)``; NaN when the cut cost nothing."""
    return (cut - recovered) / (cut - base) if cut != base else math.nan


def share_tokens(share: float, pretrain_tokens: int, tokens_per_step: int) -> int:
    """The recovery tokens of ``share`` of the pretraining tokens, in whole steps (at least one)."""
    return max(1, round(share * pretrain_tokens / tokens_per_step)) * tokens_per_step


def one_shot(runs: list[Run], method: str, kept: int) -> Run | None:
    return next((r for r in runs if r.table == "one_shot" and r.method == method and r.experts == kept), None)


def ranked_methods(runs: list[Run], kept: int) -> list[str]:
    """The methods by their one-shot NLL at ``kept`` experts, best first."""
    rows = [r for r in runs if r.table == "one_shot" and r.experts == kept]
    return [r.method for r in sorted(rows, key=lambda r: r.final.nll)]


def recovered_at(run: Run, tokens: int, base: float) -> float:
    """The fraction of ``run``'s cut gap recovered after ``tokens`` recovery tokens (NaN: not measured)."""
    q = run.at(tokens)
    return fraction_recovered(run.cut.nll, q.nll, base) if q is not None else math.nan


def best_recovery(runs: list[Run], tokens: int, base: float) -> Run:
    """The recovery run that takes back the largest fraction of its cut's gap after ``tokens`` tokens."""
    return max(runs, key=lambda r: _finite(recovered_at(r, tokens, base)))


def _finite(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def recovery_label(run: Run) -> str:
    return f"{run.option or 'none'}{', distilled' if run.distill else ''}"


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


def _one_shot_target(res: BenchResults, kept: int) -> Target:
    b, E = res.base, res.base.experts
    name = f"one-shot {E} -> {kept}: the best method's NLL gap <= 0.6x frequency's"
    freq = one_shot(res.runs, FREQUENCY, kept)
    others = [r for r in res.table("one_shot") if r.experts == kept and r.method != FREQUENCY]
    if not (freq and others):
        return _judge(name, "not measured", math.nan, 0.6, at_most=True)
    best = min(others, key=lambda r: r.final.nll)
    g_best, g_freq = best.final.nll - b.nll, freq.final.nll - b.nll
    measured = f"{best.method} {signed(g_best)} vs frequency {signed(g_freq)}: {g_best / g_freq:.2f}x"
    return _judge(name, measured, g_best / g_freq, 0.6, at_most=True, unit="x")


def _recovery_target(res: BenchResults, share: float, limit: float) -> Target:
    b = res.base
    name = (f"recovery at 50 % removed takes back >= {100 * limit:.0f} % of the gap with <= {100 * share:g} % of "
            "the pretraining tokens")  # fmt: skip
    runs = res.table("recovery")
    if not runs:
        return _judge(name, "not measured", math.nan, 100 * limit, at_most=False)
    tokens = share_tokens(share, b.pretrain_tokens, res.tokens_per_step)
    best = best_recovery(runs, tokens, b.nll)
    frac = recovered_at(best, tokens, b.nll)
    measured = f"{best.method}, {recovery_label(best)}: {pct(frac)} at {tokens:,} tokens"
    return _judge(name, measured, 100 * frac, 100 * limit, at_most=False, unit=" %-points")


def _top1_target(res: BenchResults) -> Target:
    name = (f"top-1 after recovery with <= {100 * SHORT:g} % of the pretraining tokens: at most +0.01 nats/token "
            f"over the top-{res.base.top_k} base")  # fmt: skip
    recovered = [r for r in res.table("top1") if r.option]
    if not recovered:
        return _judge(name, "not measured", math.nan, 0.01, at_most=True)
    best = min(recovered, key=lambda r: r.final.nll)
    gap = best.final.nll - res.base.nll
    return _judge(
        name, f"{recovery_label(best)}: {signed(gap)} nats/token", gap, 0.01, at_most=True, unit=" nats/token"
    )


def _staged_target(res: BenchResults) -> Target:
    name = "staged pruning ends with a >= 15 % smaller gap than one-shot at equal recovery tokens (best method)"
    runs = {
        r.schedule: r for r in res.table("staged") if r.method == res.best_method and r.experts == res.base.experts // 2
    }
    if ONE_SHOT not in runs or STAGED not in runs:
        return _judge(name, "not measured", math.nan, 0.85, at_most=True)
    g1, g2 = runs[ONE_SHOT].final.nll - res.base.nll, runs[STAGED].final.nll - res.base.nll
    measured = f"{res.best_method}: staged {signed(g2)} vs one-shot {signed(g1)}: {g2 / g1:.2f}x"
    return _judge(name, measured, g2 / g1, 0.85, at_most=True, unit="x")


def _final_target(res: BenchResults, removed: float, limit_pct: float) -> Target:
    b = res.base
    kept = b.experts - round(removed * b.experts)
    name = (f"top-1 with {100 * removed:.0f} % fewer experts, <= {100 * LONG:g} % of the pretraining tokens: "
            f"within {limit_pct:g} % of the base's NLL")  # fmt: skip
    run = next((r for r in res.table("final") if r.experts == kept), None)
    if run is None:
        return _judge(name, "not measured", math.nan, limit_pct, at_most=True)
    rel = 100 * (run.final.nll - b.nll) / b.nll
    return _judge(name, f"{run.name}: {gap_text(run.final, b.nll)}", rel, limit_pct, at_most=True, unit=" %-points")


def _speed_target(res: BenchResults) -> Target:
    name = "the final models' training tokens/s >= 1.6x the base's, in one run"
    finals = [s for s in res.speeds if s.name in {r.speed for r in res.table("final")}]
    if not finals:
        return _judge(name, "not measured", math.nan, 1.6, at_most=False)
    slowest = min(finals, key=lambda s: s.vs_base[0])
    m, lo, hi = slowest.vs_base
    measured = f"slowest {slowest.name}: {m:.2f}x (range over rounds {lo:.2f}-{hi:.2f})"
    return _judge(name, measured, m, 1.6, at_most=False, unit="x")


def _export_target(res: BenchResults) -> Target:
    name = "export: transformers' validation NLL equals ours to 1e-4 relative"
    if not res.exports:
        return _judge(name, "not measured", math.nan, 1e-4, at_most=True)
    worst = max(res.exports, key=lambda e: e.rel)
    return _judge(name, f"{worst.rel:.2e} (worst: {worst.name})", worst.rel, 1e-4, at_most=True)


def targets(res: BenchResults) -> list[Target]:
    """Every target of the study, judged on this run; a target with nothing to judge it by is a miss."""
    E = res.base.experts
    return [
        _one_shot_target(res, E - E // 4),
        _one_shot_target(res, E // 2),
        _recovery_target(res, SHORT, 0.8),
        _recovery_target(res, LONG, 0.9),
        _top1_target(res),
        _staged_target(res),
        _final_target(res, 0.25, 2.0),
        _final_target(res, 0.5, 5.0),
        _speed_target(res),
        _export_target(res),
    ]
