"""The compression benchmark (``python launch/bench.py compress``): what it measures, in which order, on the
session of :mod:`moetrain.interop.bench_session`; the document is written by :mod:`moetrain.metrics.compression_bench`.

1. Criteria, at the base's top-k: every criterion cuts one-shot to 7/8 ... 1/4 of the experts (the plot), and
   in two rounds to 75 % and 50 % (staged: 8 -> 7 -> 6, 8 -> 6 -> 4), before any recovery.
2. Recovery at 50 % removed, one-shot by the best criterion of (1) at 50 %: every option with and without
   distillation from the base for the budget (``budget_fraction`` of the base's pretraining tokens), measured at
   25, 50 and 100 % of it; then the best option once more, staged (8 -> 6 -> 4, the budget split evenly after
   each cut), against its one-shot run at equal recovery tokens.
3. Top-2 -> top-1 with the best option: top-1 one-shot, top-1 recovered, and the final models (top-1 with
   25 % and 50 % fewer experts, recovered), each exported to the base's Hugging Face family and evaluated by
   transformers; training tokens/s of the base at top-2, at top-1 and of the final models in the same rounds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrain.config import Trainable, TrainConfig, register_configs
from moetrain.interop.bench_session import CompressBench, RecoveryOption
from moetrain.interop.entry import resolve_config
from moetrain.metrics.compression_results import (
    BASE_SPEED,
    TOP1_RECOVERED,
    TOP1_SPEED,
    BaseInfo,
    BenchResults,
    best_criterion,
    best_recovery,
    recovery_label,
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


OPTIONS = (
    RecoveryOption("router only", Trainable.router),
    RecoveryOption("LoRA: router + experts", lora=("router", "experts")),
    RecoveryOption("LoRA: attention", lora=("attention",)),
    RecoveryOption("LoRA: router + experts + attention", lora=("router", "experts", "attention")),
    RecoveryOption("full training", Trainable.all),
)


@dataclass
class BenchPlan:
    """What the benchmark measures. ``pretrain_tokens``: the base's pretraining tokens (the budget is
    ``budget_fraction`` of them); ``timing_rounds``: rounds of the one-run tokens/s timing."""

    pretrain_tokens: int
    budget_fraction: float = 0.02
    criteria: tuple[str, ...] = ("frequency", "gate_mass", "reap", "ean", "random", "reconstruction")
    options: tuple[RecoveryOption, ...] = OPTIONS
    distill: tuple[bool, ...] = (False, True)
    timing_rounds: int = 5


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


def run_benchmark(
    cfg: TrainConfig, run_dir: Path, plan: BenchPlan, machine: str, command: str,
    meta: dict[str, Any] | None = None, say: Callable[[str], None] = print,
) -> BenchResults:  # fmt: skip
    """Every table of docs/compression.md, measured (module docstring)."""
    bench = CompressBench(cfg, run_dir, say)
    E, k = bench.experts, bench.top_k
    tps = bench.trainer.tokens_per_step
    steps = max(4, round(plan.budget_fraction * plan.pretrain_tokens / tps))
    marks = {round(steps / 4), round(steps / 2)}
    base = base_info(bench, plan, meta)
    say(f"base: NLL {base.nll:.4f} on {bench.val_tokens} tokens; recovery budget {steps} steps of {tps} tokens")
    half, quarter = E // 2, E - E // 4
    floor = max(k, cfg.prune.min_experts)
    cuts = []
    for criterion in plan.criteria:  # 1. criteria: one-shot at every plotted count, staged at 25 % and 50 %
        for kept in plot_keeps(E, floor):
            cuts.append(bench.run(criterion, criterion, [kept]))
        for kept in (quarter, half):
            if kept >= floor and staged_path(E, kept)[0] < E:
                cuts.append(bench.run(criterion, criterion, staged_path(E, kept)))
    best = best_criterion(cuts, half)
    recoveries = [  # 2. recovery options at 50 % removed, one-shot by the best criterion
        bench.run(option.label, best, [half], option, distill, steps=steps, marks=marks)
        for option in plan.options
        for distill in plan.distill
    ]
    chosen = best_recovery(recoveries, bench.base_nll)
    option = next(o for o in plan.options if o.label == chosen.name)
    staged = [chosen, bench.run(chosen.name, best, staged_path(E, half), option, chosen.distill, steps=steps)]
    # 3. top-2 -> top-1: one-shot, recovered, and the final models (top-1 and fewer experts, recovered)
    ids = bench.state.distiller.teacher_expert_ids
    bench.keep_for_timing(BASE_SPEED, bench.reference, ids, k)
    bench.keep_for_timing(TOP1_SPEED, bench.reference, ids, 1)
    top1 = [bench.run("top-1", None, [], top_k=1)]
    top1.append(bench.run(TOP1_RECOVERED, None, [], option, chosen.distill, 1, steps))
    for run in top1:
        run.speed = TOP1_SPEED
    exports = []
    for path in ([quarter], staged_path(E, half)):
        name = f"top-1, {' -> '.join(map(str, [E, *path]))} + recovery"
        run = bench.run(name, best, path, option, chosen.distill, 1, steps)
        run.speed = name
        top1.append(run)
        bench.keep_for_timing(name, bench.state.model, bench.state.expert_ids(), 1)
        exports.append(bench.export_check(name, run.final))
    speeds = bench.time_models(plan.timing_rounds)
    bench.load.append(os.getloadavg()[0])
    return BenchResults(
        machine=machine, command=command, seconds=bench.minutes() * 60, load=bench.load, val_tokens=bench.val_tokens,
        tokens_per_step=tps, budget_tokens=steps * tps, budget_fraction=plan.budget_fraction, base=base,
        best_criterion=best, best_option=recovery_label(chosen), cuts=cuts, recoveries=recoveries, staged=staged,
        top1=top1, speeds=speeds, exports=exports,
    )  # fmt: skip
