"""The compression benchmark's session: one trainer in one process, the base snapshot, and the cells it runs
(:class:`CompressBench`); what the benchmark measures and in which order is :mod:`moetrain.interop.compress_bench`.

Every cell runs on one trainer (world size 1), built once by the composition root
(:func:`moetrain.interop.assemble.build_trainer`) with ``distill.teacher=base``: the model as loaded is the frozen
base, the reference of every measurement and the distillation teacher. Why one process: a cell (a cut, or a cut
and its recovery) costs a few seconds here, a launched run 20-40 s of start-up alone, and the benchmark has
about a hundred cells.

A cell: back to the base (:meth:`ModelState.restore` of a snapshot taken at step 0: structure, weights, a fresh
optimizer at step 0 of the cell's LR schedule, the data position and the RNG), the cell's stage applied (top-k,
trainable set), then pruning rounds through the trainer's own :class:`~moetrain.surgery.pruning.PruneHook` acting
on the trainer's ``StructureOps`` (profile, criterion, budget ``prune.keep``, removal or merge), recovery steps
through the trainer's own ``train_step`` (LoRA through ``StructureOps.attach_adapters``), and measurements on the
fixed validation batches against the base's logits (:func:`moetrain.train.evaluation.comparison_sums`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from moetrain.config import LoRATarget, StageConfig, StageMoEConfig, Trainable, TrainConfig
from moetrain.interop.assemble import build_trainer
from moetrain.interop.hf.api import save_hf
from moetrain.metrics.comparison import training_loss
from moetrain.metrics.compression_results import (
    ONE_SHOT,
    STAGED,
    ExportCheck,
    Point,
    Quality,
    Run,
    Speed,
    recovery_label,
)
from moetrain.metrics.flops import forward_flops_per_token
from moetrain.metrics.timing import Entry, median_ratio, one_loss_bwd, time_in_rounds
from moetrain.surgery.pruning import PruneHook
from moetrain.train.engine import set_schedule_step
from moetrain.train.evaluation import COMPARISON, comparison_sums, cross_entropy_sums

log = logging.getLogger("moetrain")
DROPLESS = {"capacity_factor": None, "eval_capacity_factor": None}
# the reference logits are kept in memory (one copy of the validation set's logits, fp32): above this, say so
MAX_REFERENCE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Method:
    """How a cut chooses the experts it removes and what becomes of them: ``prune.criterion``, ``prune.mode``
    and ``prune.ranking`` (global: uneven per-layer counts, so ``prune.equal_per_layer`` is off)."""

    name: str
    criterion: str = "frequency"
    mode: str = "drop"
    ranking: str = "layer"


@dataclass(frozen=True)
class RecoveryOption:
    """What trains during recovery: a stage's ``trainable`` set, or LoRA adapters on ``lora`` (merged at the end
    of each recovery segment)."""

    label: str
    trainable: Trainable = Trainable.all
    lora: tuple[str, ...] = ()


class MeasuringOps:
    """The trainer's ``StructureOps`` with one change: ``validate()`` is the benchmark's full measurement against
    the base (its NLL is what the pruning round records), computed once per model state. Every structure change
    through these ops forgets it; the benchmark calls :meth:`forget` after it trains or changes the top-k."""

    def __init__(self, ops: Any, measure: Callable[[], Quality]) -> None:
        self._ops, self._measure = ops, measure
        self.last: Quality | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def forget(self) -> None:
        self.last = None

    def quality(self) -> Quality:
        if self.last is None:
            self.last = self._measure()
        return self.last

    def validate(self) -> float:
        return self.quality().nll

    def remove_experts(self, keep: list[list[int]]) -> None:
        self.forget()
        self._ops.remove_experts(keep)

    def merge_experts(self, groups: list[list[list[int]]], weights: list[torch.Tensor]) -> None:
        self.forget()
        self._ops.merge_experts(groups, weights)

    def make_constants(self, keep: list[list[int]], means: list[torch.Tensor]) -> None:
        self.forget()
        self._ops.make_constants(keep, means)

    def restore(self, snapshot: Path) -> None:
        self.forget()
        self._ops.restore(snapshot)

    def attach_adapters(self) -> int:
        self.forget()
        return self._ops.attach_adapters()

    def merge_adapters(self) -> None:
        self.forget()
        self._ops.merge_adapters()


class CompressBench:
    """One trainer, the base snapshot, the fixed validation batches and the base's logits on them."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, say: Callable[[str], None] = print) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.run_dir, self.say, self.t0 = cfg, run_dir, say, time.monotonic()
        self.load = [os.getloadavg()[0]]
        # the recipe's stages are replaced by each cell's own; the trainer starts on one at the base's top-k
        cfg.schedule.stages, cfg.trainer.max_steps = [StageConfig(name="bench", steps=1)], 1
        self.trainer = build_trainer(cfg, run_dir)
        self.state = self.trainer.state
        self.reference = self.state.distiller.reference
        if self.reference is None:
            raise ValueError("the benchmark needs distill.teacher=base (the base model as the reference)")
        self.batches = list(self.trainer.data.val_batches(cfg.trainer.eval_batches))
        tokens = sum(labels.numel() for _, labels in self.batches)
        size = tokens * cfg.model.vocab_size * 4
        if size > MAX_REFERENCE_BYTES:
            raise ValueError(
                f"trainer.eval_batches={cfg.trainer.eval_batches}: the base's logits on {tokens} validation tokens "
                f"take {size / 2**30:.1f} GiB; allowed: at most {MAX_REFERENCE_BYTES / 2**30:.0f} GiB (fewer batches)"
            )
        with torch.no_grad():
            self.ref_logits = [self.state.distiller.teacher_forward(x).logits_BSV.float() for x, _ in self.batches]
        self.val_tokens = tokens
        self.ops = MeasuringOps(self.trainer.ops, self.measure)
        self.experts, self.top_k = cfg.moe.num_experts, cfg.moe.top_k
        self.snapshot = self.state.save(tag="bench_base")
        self.base = self.measure()
        self.base_nll = self.base_ref_nll
        self.timed: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def measure(self) -> Quality:
        """The current model against the base on the validation batches (sums over tokens, one division)."""
        engine = self.state.engine
        engine.eval()
        sums = torch.zeros(len(COMPARISON), dtype=torch.float64)
        for (inputs, labels), ref in zip(self.batches, self.ref_logits):
            sums += comparison_sums(engine(inputs.to(engine.device)).logits_BSV, ref, labels.to(engine.device))
        s = dict(zip(COMPARISON, sums.tolist()))
        self.base_ref_nll = s["ce_ref"] / s["tokens"]
        return Quality(s["ce"] / s["tokens"], s["kl"] / s["tokens"], s["agree"] / s["tokens"])

    def minutes(self) -> float:
        return (time.monotonic() - self.t0) / 60

    def tell(self, run: Run) -> None:
        self.load.append(os.getloadavg()[0])
        q = run.final
        self.say(
            f"[{self.minutes():5.1f} min] {run.name} ({run.method or '-'}, {recovery_label(run)}, "
            f"{run.path(self.experts)}, top-{run.top_k}, {run.tokens} tokens): NLL {q.nll:.4f} "
            f"(gap {q.nll - self.base_nll:+.4f}), KL {q.kl:.4f}, agreement {q.agree:.3f}"
        )

    # ------------------------------------------------------------------ cells
    def reset(self, top_k: int, option: RecoveryOption | None, distill: bool, steps: int) -> None:
        """Back to the base with a fresh optimizer at step 0 of a ``steps``-step schedule, at ``top_k``."""
        cfg = self.cfg
        trainable = option.trainable if option else Trainable.all
        stage = StageConfig(name="bench", steps=max(steps, 1), moe=StageMoEConfig(top_k=top_k), trainable=trainable)
        cfg.schedule.stages = [stage]
        cfg.trainer.max_steps = max(steps, 1)
        cfg.distill.enabled = distill
        cfg.lora.targets = [LoRATarget(t) for t in option.lora] if option and option.lora else cfg.lora.targets
        self.state.step = 0
        self.ops.restore(self.snapshot)
        set_schedule_step(self.state.engine.lr_scheduler, 0)  # the cell's own schedule, not the snapshot's
        self.trainer.data.load_state_dict({"position": 0})  # every cell reads the same training tokens
        self.trainer.stages.apply(0)
        if top_k == self.top_k:
            self.ops.last = self.base  # the restored base itself: its measurement is known

    def train(self, steps: int, option: RecoveryOption | None, marks: set[int], points: list[Point]) -> None:
        """``steps`` recovery steps, measured at the global steps in ``marks`` and at the end (after merging
        LoRA adapters into the weights)."""
        if steps <= 0:
            return
        lora = bool(option and option.lora)
        if lora:
            self.ops.attach_adapters()
        for i in range(steps):
            self.trainer.train_step(self.trainer.stages.apply(self.state.step))
            self.ops.forget()
            if self.state.step in marks and i < steps - 1:
                points.append(Point(self.tokens(), self.current_experts(), self.ops.quality()))
        if lora:
            self.ops.merge_adapters()
        points.append(Point(self.tokens(), self.current_experts(), self.ops.quality()))

    def tokens(self) -> int:
        return self.state.step * self.trainer.tokens_per_step

    def current_experts(self) -> int:
        """Experts per layer (the mean, rounded: a global ranking leaves layers uneven, with the same total)."""
        counts = self.state.experts_per_layer()
        return round(sum(counts) / len(counts))

    def expert_flops(self, moe) -> float:
        """Forward expert-FFN FLOPs per token of the current structure at ``moe``'s top-k."""
        return forward_flops_per_token(self.cfg.model, moe).experts

    def run(
        self,
        name: str,
        method: Method | None,
        path: list[int],
        option: RecoveryOption | None = None,
        distill: bool = False,
        top_k: int | None = None,
        steps: int = 0,
        marks: Iterable[int] = (),
    ) -> Run:
        """From the base: pruning rounds to ``path`` (experts per layer after each), ``steps`` recovery steps
        split evenly between the rounds (all after the one round of a one-shot cut)."""
        top_k = top_k or self.top_k
        self.reset(top_k, option, distill, steps)
        if method is not None:
            prune = self.cfg.prune
            prune.criterion, prune.mode, prune.ranking = method.criterion, method.mode, method.ranking
            prune.equal_per_layer = method.ranking != "global"
        self.cfg.prune.keep = list(path)
        self.cfg.prune.max_loss_increase = math.inf  # the benchmark measures every cut: nothing rolls back
        hook = PruneHook(self.cfg.prune)
        rounds = max(len(path), 1)
        segments = [steps // rounds + (1 if i < steps % rounds else 0) for i in range(rounds)]
        points: list[Point] = []
        if not path:
            points.append(Point(0, self.current_experts(), self.ops.quality()))
        for i, seg in enumerate(segments):
            if i < len(path):
                record = hook.run_round(self.ops, self.trainer.stages.apply(self.state.step))
                if record["outcome"] not in ("kept", "nothing to prune"):
                    raise RuntimeError(f"pruning round {record['round']} of {name}: {record['outcome']}")
                points.append(Point(self.tokens(), self.current_experts(), self.ops.quality()))
            self.train(seg, option, set(marks), points)
        moe = replace(self.cfg.moe, top_k=top_k)
        schedule = "none" if not path else ONE_SHOT if len(path) == 1 else STAGED
        run = Run(name, method.name if method else None, schedule, top_k, distill, points, self.state.param_count(),
                  self.expert_flops(moe), option=option.label if option and steps else None)  # fmt: skip
        self.tell(run)
        return run

    # ------------------------------------------------------------------ speed and export
    def keep_for_timing(self, name: str, source: nn.Module, expert_ids: list[list[int]], top_k: int) -> None:
        """A copy of ``source`` (outside the engine) to time later with the others, at ``top_k``, dropless."""
        self.timed[name] = self.state.model_copy(source, expert_ids, {"top_k": top_k, **DROPLESS})

    def time_models(self, rounds: int) -> list[Speed]:
        """Forward + backward of the training loss on one training micro-batch through every kept model, in the
        same rounds (reversed every other round, each timed run after an untimed one of its own); the first model
        is the base the ratios are taken against."""
        inputs, labels = next(iter(self.trainer.data.profile_batches(1)))
        names = list(self.timed)
        models = [self.timed[n].train() for n in names]
        entries = [Entry(n, training_loss(m, labels), inputs, m) for n, m in zip(names, models)]
        times = time_in_rounds(entries, iters=rounds, warmup=1, alternate=True, run=one_loss_bwd)
        tokens = inputs.numel()
        speeds = [Speed(n, tokens / sorted(t)[len(t) // 2], median_ratio(times[0], t)) for n, t in zip(names, times)]
        for s in speeds:
            self.say(f"[{self.minutes():5.1f} min] {s.name}: {s.tokens_per_s:,.0f} tokens/s, {s.vs_base[0]:.2f}x base")
        return speeds

    def export_check(self, name: str, quality: Quality) -> ExportCheck:
        """The current model as a Hugging Face directory of the base's family; transformers' NLL on the same
        validation batches against ours."""
        from transformers import AutoModelForCausalLM

        out = self.run_dir / "hf" / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")  # top-1-8-6-recovery
        save_hf(self.state.model, self.cfg.model, self.cfg.moe, out)
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            sums = cross_entropy_sums(lambda x: SimpleNamespace(logits_BSV=hf(x).logits), self.batches, "cpu")
        check = ExportCheck(name, str(out), quality.nll, float(sums[0] / sums[1]))
        self.say(f"[{self.minutes():5.1f} min] export {name}: ours {check.nll_ours:.6f}, transformers "
                 f"{check.nll_hf:.6f} ({check.rel:.1e} relative)")  # fmt: skip
        return check
