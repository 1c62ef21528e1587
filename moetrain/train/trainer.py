"""The training loop. Features arrive as components (data pipeline, model state, stage runner and its hooks,
validation and its reference, metrics sinks, routing statistics, exporter, reporter); the loop only sequences
them.

Loop state that resume needs: the optimizer step (DeepSpeed restores model, optimizer and LR schedule), the
data position, the stage runner's sums, each hook's state, the base measurement and each rank's RNG state.
Every schedule is a pure function of the step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moetrain.config import TrainConfig, plain
from moetrain.runtime.cpu_process import configure_cpu_process
from moetrain.runtime.distributed import LaunchEnv, all_reduce_sum, barrier
from moetrain.train.components import RunComponents
from moetrain.train.data import DataPipeline
from moetrain.train.engine import grad_norm_before_clipping
from moetrain.train.losses import training_loss
from moetrain.train.model_state import ModelState
from moetrain.train.progress import Progress
from moetrain.train.reference import Validation
from moetrain.train.run_summary import finish_run, hook_records
from moetrain.train.splits import load_splits_rank0_first
from moetrain.train.stage_runner import StageRunner
from moetrain.train.stages import StageSchedule, StageState

log = logging.getLogger("moetrain")


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, env: LaunchEnv, parts: RunComponents) -> None:
        self.cfg, self.run_dir, self.env, self.parts = cfg, run_dir, env, parts
        t = cfg.trainer
        configure_cpu_process(t.num_threads, env.local_world_size)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.state = ModelState(cfg, env, run_dir, parts.adapters, parts.distiller, parts.init_weights)
        splits = load_splits_rank0_first(cfg.data, env.is_main)
        self.unigram_baseline = splits.unigram_baseline(cfg.model.vocab_size)
        # Every rank is a data-parallel rank (no tensor or pipeline parallelism).
        self.dp_size = env.world_size
        self.data = DataPipeline(splits, cfg.model.seq_len, t.micro_batch_size, env.rank, self.dp_size, t.seed)
        self.logger = parts.logger
        # routing tables are as wide as the unpruned layers: a pruned layer's missing experts read 0
        layers = self.state.model.moe_layers()
        self.routing = parts.routing_table(len(layers), cfg.moe.num_experts)
        schedule = StageSchedule(cfg.schedule, cfg.moe, t.max_steps)
        self.stages = StageRunner(
            schedule, layers, cfg.model.d_model, cfg.model.d_ff, env.is_main, cfg.moe.num_experts,
            parts.routing_table, parts.hooks,
        )  # fmt: skip
        self.state.on_rebuild.append(self._follow_structure)
        self.state.client_state = self.client_state
        self.ops = parts.structure_ops(self.state, self.validate, self.data, self.logger)
        self.validation = Validation(self.state, self.data, cfg, parts.routing_table, parts.throughput)
        self.state.rebuild()
        self.last_checkpoint: Path | None = None
        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.dp_size * cfg.model.seq_len

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def last_val_loss(self) -> float | None:
        return self.validation.last.get("val/loss")

    def _follow_structure(self, state: ModelState) -> None:
        """After a structure change: the stage runner follows the new layers and schedule, at this step."""
        self.stages.attach(state.schedule, state.moe_layers)
        self.stages.apply(state.step)

    # ---------------------------------------------------------------- state
    def client_state(self) -> dict[str, Any]:
        """Collective (the stage runner sums its interval over ranks)."""
        hooks = {h.state_key: h.state_dict() for h in [*self.parts.hooks, self.validation] if h.state_key}
        return {
            "step": self.step,
            "data": self.data.state_dict(),
            "stages": self.stages.state_dict(),
            **hooks,
            "config": plain(self.cfg),
        }

    def resume(self) -> None:
        state = self.state.load_resume()
        if state is None:
            return
        self.data.load_state_dict(state["data"])
        if "stages" in state:
            self.stages.load_state_dict(state["stages"])
        for hook in [*self.parts.hooks, self.validation]:
            if hook.state_key:
                hook.load_state_dict(state.get(hook.state_key, {}))
        self.stages.apply(self.step)

    def save(self) -> None:
        self.last_checkpoint = self.state.save()

    # ---------------------------------------------------------------- steps
    def train_step(self, stage: StageState) -> dict[str, float]:
        t0 = time.perf_counter()
        engine, distiller = self.state.engine, self.parts.distiller
        engine.train()
        sums = torch.zeros(4, dtype=torch.float64)
        grad_norm = float("nan")
        step_stats = []
        for _ in range(self.cfg.trainer.grad_accum_steps):
            inputs, labels = (x.to(engine.device) for x in self.data.next_train_batch())
            out = engine(inputs)
            kl = distiller.kl(out.logits_BSV, inputs) if distiller.active else None
            loss, parts = training_loss(out, labels, stage.aux_loss_coef, stage.z_loss_coef, kl, self.cfg.distill.beta)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                grad_norm = grad_norm_before_clipping(self.state.model, self.state.moe_layers, self.cfg.parallel)
            engine.step()
            if boundary:
                for layer in self.state.moe_layers:
                    layer.after_optimizer_step()
            self.routing.update(out.moe_stats)
            step_stats.append(out.moe_stats)
            kl_part = parts.get("kl", torch.zeros((), device=parts["ce"].device))
            sums += torch.stack([parts["ce"], parts["aux"], parts["z"], kl_part]).double().cpu()
        self.state.step += 1
        if grad_norm != grad_norm:  # NaN: the engine's optimizer measured it during step()
            measured = engine.get_global_grad_norm()
            grad_norm = float(measured) if measured is not None else float("nan")
        sums = all_reduce_sum(sums) / (self.cfg.trainer.grad_accum_steps * self.dp_size)
        dt = time.perf_counter() - t0
        self.stages.record(step_stats, dt, self.tokens_per_step)
        distill = {"train/distill_kl": float(sums[3])} if distiller.active else {}
        return {
            **distill,
            "train/loss": float(sums[0]),
            "train/aux_loss": float(sums[1]),
            "train/z_loss": float(sums[2]),
            "train/lr": float(engine.get_lr()[0]),
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": self.tokens_per_step / dt,
            **self._mfu(self.tokens_per_step / dt, stage.moe.get("top_k", self.cfg.moe.top_k), "train/mfu"),
            "train/epoch": self.data.epoch,
            "train/aux_loss_coef": stage.aux_loss_coef,
            "train/z_loss_coef": stage.z_loss_coef,
            "stage/index": stage.index,
        }

    def validate(self) -> float:
        """Mean next-token cross-entropy (nats) over the fixed validation batches of all ranks; with a reference
        the comparisons too (``self.validation.last``)."""
        return self.validation.run()["val/loss"]

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        t = self.cfg.trainer
        self.resume()
        if self.env.is_main:
            log.info(
                "run folder: %s | params: %.2fM | unigram baseline: %.4f nats/token | %d train sequences",
                self.run_dir,
                sum(p.numel() for p in self.state.model.parameters()) / 1e6,
                self.unigram_baseline,
                len(self.data.train),
            )
            self.logger.log({"data/unigram_baseline": self.unigram_baseline}, step=self.step)
        bar = self._progress_bar()
        self.stages.apply(self.step)
        if base := self.validation.measure_base(self.step):  # step 0 of a run with a reference
            self.logger.log(base, step=self.step)
        while self.step < t.max_steps:
            stage = self.stages.apply(self.step)
            metrics = self.train_step(stage)
            if self.step % t.expert_stats_every == 0:
                metrics.update(self.routing.reduce_and_reset())
            stage_end = self.stages.is_stage_end(self.step)
            if self.step % t.eval_every == 0 or stage_end:
                self.validate()
                metrics.update(self.validation.last)
            if self.step % t.log_every == 0 or "val/loss" in metrics:
                self.logger.log(metrics, step=self.step)
            if bar is not None:
                bar.update(
                    self.step,
                    stage=stage.name,
                    loss=f"{metrics['train/loss']:.3f}",
                    val=f"{self.last_val_loss or float('nan'):.3f}",
                    tok_s=f"{metrics['train/tokens_per_s']:.0f}",
                )
            if stage_end:
                self._end_stage()
            if self.step % t.save_every == 0 or stage_end:
                self.save()
        if bar is not None:
            bar.close()
        self.parts.adapters.merge(self.state.model)  # a run that stops inside a LoRA stage exports merged weights
        self.export_dir = self._export()
        self.family_export = self._export_family()
        return self._finish()

    def _export(self) -> Path:
        """Collective: the final model (pruned, adapters merged) as safetensors + config in ``export/``."""
        # the routing in force at the end (top-k, capacities, drop policy) is what the exported model runs
        moe = replace(self.cfg.moe, **self.state.schedule.at(max(self.step - 1, 0)).moe)
        export = self.parts.exporter(self.state.model, self.cfg.model, moe, self.run_dir / "export", self.env.is_main)
        barrier()
        if self.env.is_main:
            log.info("exported the final model to %s (moetrain.interop.export.load_exported)", export)
        return export

    def _mfu(self, tokens_per_s: float, top_k: int, key: str) -> dict[str, float]:
        """Model FLOPs utilisation: ``tokens/s x training FLOPs per token at top_k / peak FLOP/s of all devices``
        (``{key: mfu}``; nothing when the peak is unknown)."""
        parts = self.parts
        if not parts.peak_flops or parts.train_flops_per_token is None:
            return {}
        return {key: tokens_per_s * parts.train_flops_per_token(int(top_k)) / parts.peak_flops}

    def _export_family(self) -> dict[str, Any] | None:
        """Collective (``export.hf``): the final model in its family's layout in ``hf/``, loaded back and, with a
        reference, compared with the base on the validation tokens (the report's export row)."""
        family = self.parts.family_export
        if family is None:
            return None
        out = self.run_dir / "hf"
        if self.env.is_main:
            family.write(self.export_dir, out)
            log.info("exported the final model as a %s directory to %s", family.family, out)
        barrier()
        row: dict[str, Any] = {"dir": str(out), "family": family.family}
        if self.validation.reference is not None:
            row.update(self.validation.compare(family.load(out, self.state.engine.device)))
        return row

    def _end_stage(self) -> None:
        """At a stage boundary (and at the end): summarise the stage; if another follows, switch to it and
        record what changed (log line, ``metrics.jsonl`` and W&B event)."""
        summary = self.stages.close_stage(self.step, self.last_val_loss, self.validation.stage_summary())
        self.stages.end_stage(self.ops, self.step)  # hooks: e.g. LoRA adapters merged
        summary.update(self._mfu(summary["tokens_per_s"], summary.get("moe.top_k", self.cfg.moe.top_k), "mfu"))
        summary["experts_per_layer"] = self.state.experts_per_layer()
        summary["params"] = self.state.param_count()
        for key, rows in hook_records(self.parts).items():
            summary[key] = [r["round"] for r in rows if r["stage"] == summary["stage"]]
        if self.env.is_main:
            log.info(
                "stage '%s' done at step %d: val loss %.4f, %.0f tokens/s, %.3g expert FLOPs/token, dropped %.4f",
                summary["stage"],
                self.step,
                summary["val_loss"],
                summary["tokens_per_s"],
                summary["expert_flops_per_token"],
                summary["dropped_frac"],
            )
        if self.step >= self.cfg.trainer.max_steps:
            return
        event = self.stages.begin_stage(self.ops, self.step)
        if self.env.is_main:
            changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in event["changes"].items()) or "nothing"
            log.info("stage %d '%s' begins at step %d: %s", event["index"], event["stage"], self.step, changes)
            self.logger.log(
                {
                    "event": "stage_start",
                    "stage/name": event["stage"],
                    "stage/index": event["index"],
                    "stage/changes": event["changes"],
                },
                step=self.step,
            )

    def _progress_bar(self) -> Progress | None:
        if not (self.env.is_main and self.cfg.logging.progress_bar):
            return None
        return Progress(self.cfg.trainer.max_steps, self.step)

    def _finish(self) -> dict:
        fields = {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "val_loss": self.last_val_loss,
            "unigram_baseline": self.unigram_baseline,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "export": str(self.export_dir),
            "family_export": self.family_export,
        }
        return finish_run(
            self.cfg, self.run_dir, self.env, self.parts, self.state, self.stages, self.validation, fields
        )
