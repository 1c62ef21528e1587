"""The compression study (``python launch/bench.py compress``): what it measures, in which order, on the session
of :mod:`moetrain.interop.bench_session`; the document is written by :mod:`moetrain.metrics.compression_bench`.

(a) One-shot, before recovery: every method (:data:`METHODS`) cuts to 25 % and 50 % fewer experts (and to the
    plot's other counts, 7/8 ... 1/4). MoNE's constants have no Hugging Face form: it is measured here only, and
    "the best method" of the later tables is the best of the others.
(c) Recovery at 50 % removed, for the best method of (a) and for frequency: router, LoRA and full training, each
    with and without distillation from the base, measured at 0.5, 1, 2 and 5 % of the base's pretraining tokens.
(b) Staged (8 -> 6 -> 4) against one-shot (8 -> 4), for frequency and the two best methods, recovered with the
    best recovery of (c) at 2 % (split evenly after each cut); the same recovery after one-shot 8 -> 6 too (the
    plot's after-recovery lines).
(d) Top-2 -> top-1: one-shot, then after each recovery option of (c) at 2 %.
(e) The full recipe: top-1 with 25 % and 50 % fewer experts by the best method, recovered with the best recovery
    at 5 %, each exported to the base's family and evaluated by transformers; training tokens/s of the base, of
    top-1 and of these models timed in the same rounds.

Every cell starts from the base, so cells are independent: each finished cell is appended to ``cells.jsonl`` in
the run folder and a rerun with the same ``--run-dir`` reads it instead of measuring it again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moetrain.config import ConfigError, Trainable, TrainConfig, plain, register_configs
from moetrain.interop.bench_session import CompressBench, Method, RecoveryOption
from moetrain.interop.entry import resolve_config
from moetrain.metrics.compression_results import (
    BASE_SPEED,
    FREQUENCY,
    LONG,
    RECOVERY_SHARES,
    SHORT,
    TOP1_SPEED,
    BaseInfo,
    BenchResults,
    ExportCheck,
    Run,
    best_recovery,
    ranked_methods,
    recovery_label,
    share_tokens,
)
from moetrain.metrics.flops import forward_flops_per_token
from moetrain.train.model_state import count_parameters

ROOT = Path(__file__).resolve().parents[2]
# what every benchmark run sets (before the user's overrides): the compress recipe's pieces, one process reading
# the global batch of the 2-rank pretraining (2 x 8 sequences), and its 16 validation batches (the same tokens);
# no recipe budget (each cell sets prune.keep; the recipe's [6, 4] fits 8 experts only)
BENCH_OVERRIDES = ("+recipe=compress", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                   "trainer.micro_batch_size=16", "trainer.eval_batches=16", "prune.keep=[]")  # fmt: skip


def compose_bench(overrides: list[str]) -> TrainConfig:
    """The resolved config of the benchmark's trainer: ``BENCH_OVERRIDES``, then ``overrides``, then
    ``distill.teacher=base`` (the measurements need the base as the reference), for one process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "recipes"), version_base="1.3"):
        composed = compose(config_name="train", overrides=[*BENCH_OVERRIDES, *overrides, "distill.teacher=base"])
    return resolve_config(composed, world_size=1, cuda=torch.cuda.is_available())


# the methods of table (a): each criterion dropping the cut experts, then the structure methods
METHODS = (
    Method("frequency", "frequency"),
    Method("gate_mass", "gate_mass"),
    Method("reap", "reap"),
    Method("ean", "ean"),
    Method("random", "random"),
    Method("reconstruction", "reconstruction"),
    Method("merge", "frequency", mode="merge"),  # HC-SMoE / M-SMoE: the most routed survive, the rest fold in
    Method("merge_ream", "reap", mode="merge_ream"),
    Method("reap, global ranking", "reap", ranking="global"),  # uneven per-layer budgets
    Method("mone", "reap", mode="mone"),  # REAP's cut experts become constants (no Hugging Face export)
)
# methods whose models only the native export holds: table (a) only (the other tables recover and export)
NATIVE_ONLY = {"mone"}
OPTIONS = (
    RecoveryOption("router", Trainable.router),
    RecoveryOption("lora", lora=("router", "experts", "attention")),
    RecoveryOption("full", Trainable.all),
)


@dataclass
class BenchPlan:
    """What the study measures. ``pretrain_tokens``: the base's pretraining tokens (recovery budgets are shares of
    them); ``timing_rounds``: rounds of the one-run tokens/s timing."""

    pretrain_tokens: int
    methods: tuple[Method, ...] = METHODS
    options: tuple[RecoveryOption, ...] = OPTIONS
    distill: tuple[bool, ...] = (False, True)
    timing_rounds: int = 5
    plot_counts: bool = True  # the plot's extra one-shot counts besides 25 % and 50 %


def plot_keeps(experts: int, floor: int) -> list[int]:
    """Experts kept per layer for the plot: 7/8 ... 1/4 of ``experts`` (8: 7, 6, 5, 4, 3, 2), never below
    ``floor`` (the top-k and ``prune.min_experts``), and always the 25 % and 50 % cuts of the table."""
    keeps = {max(floor, round(experts * f / 8)) for f in range(7, 1, -1)} | {experts - experts // 4, experts // 2}
    return sorted((k for k in keeps if floor <= k < experts), reverse=True)


def staged_path(experts: int, kept: int) -> list[int]:
    """Two rounds to ``kept``, halfway first: 8 -> 7 -> 6, 8 -> 6 -> 4."""
    return [(experts + kept + 1) // 2, kept]


def base_info(bench: CompressBench, plan: BenchPlan, meta: dict[str, Any] | None) -> BaseInfo:
    cfg = bench.cfg
    flops = forward_flops_per_token(cfg.model, cfg.moe)
    meta = meta or {}
    flat = meta.get("flatness")
    flatness = None
    if flat:
        flatness = "validation loss flat" if flat.get("passed") else "validation loss NOT flat"
        if "rel_improvement" in flat:
            flatness += f": {100 * flat['rel_improvement']:.2f} % better over the last {100 * flat['window']:.0f} %"
    return BaseInfo(
        path=cfg.model.init_from.removeprefix("hf:") if cfg.model.init_from else "-",
        nll=bench.base_nll,
        top_k=bench.top_k,
        experts=bench.experts,
        params=count_parameters(bench.reference, cfg.parallel.ep_size),
        expert_flops=flops.experts,
        pretrain_tokens=plan.pretrain_tokens,
        steps=meta.get("steps"),
        meta_val_loss=meta.get("final_val_loss"),
        expert_share=flops.expert_share,
        flatness=flatness,
    )


class CellCache:
    """Finished cells of a run folder (``cells.jsonl``, one JSON object a line, appended as each cell ends): a
    rerun of the study with the same folder reads a cell it finds instead of measuring it again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        for n, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) - 1:  # the cell a killed run was writing: measured again
                    break
                raise ConfigError(f"--run-dir {path.parent}: {path.name} line {n + 1} is not a cell ({e}); allowed: "
                                  "the file a study wrote, or a new --run-dir") from None  # fmt: skip
            self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        row = {"key": key, **value}
        with self.path.open("a") as f:  # one line a cell: a run killed mid-write loses at most that cell
            f.write(json.dumps(row) + "\n")
        self.rows[key] = row


class Study:
    """The cells of one study run: measured on ``bench`` or read from ``cache``."""

    def __init__(self, bench: CompressBench, cache: CellCache) -> None:
        self.bench, self.cache = bench, cache
        self.runs: list[Run] = []
        self.exports: list[ExportCheck] = []
        self.cell_seconds = 0.0  # every cell's own measuring time, read from the cache or measured now
        self.measured_now = 0.0

    def seconds(self) -> float:
        """The study's measuring time: every cell's (measured before or now) and this run's other work."""
        return self.cell_seconds + self.bench.minutes() * 60 - self.measured_now

    def cell(self, table: str, name: str, method: Method | None, path: list[int], option: RecoveryOption | None = None,
             distill: bool = False, top_k: int | None = None, steps: int = 0, marks: Iterable[int] = (),
             export: bool = False) -> Run:  # fmt: skip
        """One cell of ``table`` (:meth:`CompressBench.run`; ``export``: then exported and checked)."""
        marks = sorted(set(marks))
        key = json.dumps([table, name, method and asdict(method), path, option and option.label, distill, top_k,
                          steps, marks])  # fmt: skip
        row = self.cache.get(key)
        if row is None:
            t0 = time.monotonic()
            run = self.bench.run(name, method, path, option, distill, top_k, steps, marks)
            run.table = table
            check = self.bench.export_check(name, run.final) if export else None
            row = {"run": asdict(run), "export": asdict(check) if check else None, "seconds": time.monotonic() - t0}
            self.cache.put(key, row)
            self.measured_now += row["seconds"]
        else:
            self.bench.say(f"[{self.bench.minutes():5.1f} min] {name}: measured before ({self.cache.path.name})")
        self.cell_seconds += row.get("seconds", 0.0)
        run = Run.from_dict(row["run"])
        self.runs.append(run)
        if row["export"]:
            self.exports.append(ExportCheck(**row["export"]))
        return run


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def check_same_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """A study's cells are cached by what they do, not by the settings they ran with (the trainer's config, the
    pretraining tokens): a run folder keeps its settings in ``settings.json`` and a rerun with others stops with
    one line instead of mixing cells."""
    path = run_dir / "settings.json"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1, default=str) + "\n")
        return
    before = _flat(json.loads(path.read_text()))
    now = _flat(json.loads(json.dumps(settings, default=str)))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        key = changed[0].rstrip(".")
        raise ConfigError(
            f"--run-dir {run_dir} holds cells measured with {key}={before.get(changed[0])}, not "
            f"{now.get(changed[0])}; allowed: the same settings to resume it, or a new --run-dir"
        )


def run_benchmark(
    cfg: TrainConfig, run_dir: Path, plan: BenchPlan, machine: str, command: str,
    meta: dict[str, Any] | None = None, say: Callable[[str], None] = print, quick: bool = False,
) -> BenchResults:  # fmt: skip
    """Every table of the study, measured (module docstring)."""
    check_same_settings(run_dir, {**plain(cfg), "logging": None, "pretrain_tokens": plan.pretrain_tokens})
    bench = CompressBench(cfg, run_dir, say)
    study = Study(bench, CellCache(run_dir / "cells.jsonl"))
    cell = study.cell
    E, k = bench.experts, bench.top_k
    tps = bench.trainer.tokens_per_step
    steps = {s: share_tokens(s, plan.pretrain_tokens, tps) // tps for s in RECOVERY_SHARES}
    base = base_info(bench, plan, meta)
    say(f"base: NLL {base.nll:.4f} on {bench.val_tokens} tokens; recovery at {sorted(steps.values())} steps of "
        f"{tps} tokens")  # fmt: skip
    half, quarter = E // 2, E - E // 4
    floor = max(k, cfg.prune.min_experts)
    keeps = plot_keeps(E, floor) if plan.plot_counts else [kept for kept in (quarter, half) if kept >= floor]
    for method in plan.methods:  # (a) one-shot, before recovery
        for kept in keeps:
            if method.ranking != "global" or kept > k:  # a global ranking keeps top_k + 1 in every layer
                cell("one_shot", method.name, method, [kept])
    ranked = [m for m in ranked_methods(study.runs, half) if m not in NATIVE_ONLY]
    methods = {m.name: m for m in plan.methods}
    best = methods[ranked[0]]
    # (c) recovery at 50 % removed: the best method and frequency, every option with and without distillation
    recovery_methods = list(dict.fromkeys([best.name, FREQUENCY]))
    recoveries = [
        cell("recovery", f"{m} {E} -> {half}", methods[m], [half], option, distill, steps=steps[LONG],
             marks=steps.values())
        for m in recovery_methods if m in methods
        for option in plan.options
        for distill in plan.distill
    ]  # fmt: skip
    chosen = best_recovery([r for r in recoveries if r.method == best.name], steps[SHORT] * tps, bench.base_nll)
    option = next(o for o in plan.options if o.label == chosen.option)
    # (b) staged vs one-shot at equal recovery tokens, frequency and the two best; one-shot 25 % for the plot
    for m in dict.fromkeys([FREQUENCY, *ranked[:2]]):
        if m not in methods:
            continue
        for path in ([half], staged_path(E, half), [quarter]):
            cell("staged", f"{m} {' -> '.join(map(str, [E, *path]))}", methods[m], path, option, chosen.distill,
                 steps=steps[SHORT])  # fmt: skip
    # (d) top-2 -> top-1: one-shot, then every recovery option at 2 %
    top1 = [cell("top1", "top-1", None, [], top_k=1)]
    for o in plan.options:
        for distill in plan.distill:
            top1.append(cell("top1", "top-1 + recovery", None, [], o, distill, 1, steps[SHORT]))
    # (e) the full recipe: top-1 and 25 % / 50 % fewer experts by the best method, the best recovery at 5 %
    finals = [
        cell("final", f"top-1, {' -> '.join(map(str, [E, *path]))} + recovery", best, path, option, chosen.distill,
             1, steps[LONG], export=True)
        for path in ([quarter], [half])
    ]  # fmt: skip
    # one-run speed: the base at its top-k and at top-1, and each final model's shape (its cut, no training: the
    # time of a step depends on the shape only)
    ids = bench.state.distiller.teacher_expert_ids
    bench.keep_for_timing(BASE_SPEED, bench.reference, ids, k)
    bench.keep_for_timing(TOP1_SPEED, bench.reference, ids, 1)
    for run in top1:
        run.speed = TOP1_SPEED
    for run, path in zip(finals, ([quarter], [half])):
        bench.run(run.name, best, path, top_k=1)
        bench.keep_for_timing(run.name, bench.state.model, bench.state.expert_ids(), 1)
        run.speed = run.name
    speeds = bench.time_models(plan.timing_rounds)
    bench.load.append(os.getloadavg()[0])
    return BenchResults(
        machine=machine, command=command, seconds=study.seconds(), load=bench.load, val_tokens=bench.val_tokens,
        tokens_per_step=tps, base=base, best_method=best.name,
        best_option=f"{best.name}'s best at {100 * SHORT:g} %: {recovery_label(chosen)}", runs=study.runs,
        speeds=speeds, exports=study.exports, quick=quick,
    )  # fmt: skip
