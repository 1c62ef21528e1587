"""The training loop. Features arrive as components (data pipeline, engine, checkpoints, metrics sinks,
routing metrics); the loop only sequences them.

Loop state that resume needs: the optimizer step (DeepSpeed restores model, optimizer and LR schedule), the
data position, and each rank's RNG state. Every schedule is a pure function of the step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moetrain import kernels
from moetrain.config import ConfigError, TrainConfig
from moetrain.metrics.routing import RoutingMetrics
from moetrain.metrics.tracking import build_logger
from moetrain.model import ModelOutput
from moetrain.runtime.distributed import all_reduce_sum, barrier, broadcast_object, init_distributed
from moetrain.surgery.distill import Distiller
from moetrain.surgery.lora import LoRAAdapters, LoRAStageHook
from moetrain.surgery.pruning import PruneHook
from moetrain.surgery.teacher import TeacherState, count_parameters
from moetrain.train.checkpoint import CheckpointManager, resolve_resume
from moetrain.train.data import DataPipeline, default_cache_dir, tokenize_splits
from moetrain.train.engine import build_engine, build_model_for_engine, prepare_model_for_engine, set_schedule_step
from moetrain.train.evaluation import cross_entropy_sums
from moetrain.train.stage_runner import StageRunner
from moetrain.train.stages import StageSchedule, StageState

log = logging.getLogger("moetrain")


def training_loss(
    out: ModelOutput,
    labels_BS: torch.Tensor,
    aux_coef: float,
    z_coef: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``CE + aux_coef * aux + z_coef * z``; CE in fp32 over every label position. With a distillation term
    ``kl`` (already scaled by T^2) the CE part becomes ``(1 - beta) * CE + beta * kl``."""
    ce = F.cross_entropy(out.logits_BSV.float().flatten(0, 1), labels_BS.flatten())
    task = ce if kl is None else (1 - beta) * ce + beta * kl
    total = task + aux_coef * out.aux_loss + z_coef * out.z_loss
    parts = {"ce": ce.detach(), "aux": out.aux_loss.detach(), "z": out.z_loss.detach()}
    if kl is not None:
        parts["kl"] = kl.detach()
    return total, parts


def load_splits_rank0_first(cfg_data, is_main: bool):
    """Rank 0 tokenizes first and fills the datasets cache; the others then read it. A failure on rank 0 is
    broadcast, so the other ranks stop with the same message instead of waiting at a barrier."""
    cache = Path(cfg_data.cache_dir) if cfg_data.cache_dir else default_cache_dir()
    splits, error = None, None
    if is_main:
        try:
            splits = tokenize_splits(cfg_data, cache)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
    failure = broadcast_object(None if error is None else (type(error) is ConfigError, str(error)))
    if error is not None:
        raise error
    if failure is not None:
        is_config, message = failure
        raise (ConfigError if is_config else RuntimeError)(message)
    return splits if is_main else tokenize_splits(cfg_data, cache)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.env = init_distributed()
        t = cfg.trainer
        kernels.prepare_process(
            cfg.moe.expert_impl, t.num_threads, self.env.local_world_size, self.env.local_rank, barrier
        )
        torch.manual_seed(t.seed)  # identical initial weights on every rank

        # a checkpoint of a pruned or adapted model is resumed into the same structure: rebuild it first
        self.resume_from = resolve_resume(t.resume, run_dir / "checkpoints")
        structure = (
            CheckpointManager.saved_structure(self.resume_from[0] / self.resume_from[1]) if self.resume_from else {}
        )
        if structure.get("expert_ids"):
            cfg.moe.expert_ids = structure["expert_ids"]
        self.adapters = LoRAAdapters(cfg.lora, cfg.moe.backend)
        self.distiller = Distiller(cfg.distill)
        self.pruner = PruneHook(cfg.prune)

        splits = load_splits_rank0_first(cfg.data, self.env.is_main)
        self.unigram_baseline = splits.unigram_baseline(cfg.model.vocab_size)
        # Every rank is a data-parallel rank (no tensor or pipeline parallelism).
        self.dp_rank, self.dp_size = self.env.rank, self.env.world_size
        self.data = DataPipeline(splits, cfg.model.seq_len, t.micro_batch_size, self.dp_rank, self.dp_size, t.seed)

        self.model, expert_shards = build_model_for_engine(cfg, load_init=self.resume_from is None)
        if structure.get("lora"):
            self.adapters.attach(self.model)
            expert_shards = prepare_model_for_engine(self.model, cfg)
        if structure.get("teacher_expert_ids"):
            self._make_teacher(structure["teacher_expert_ids"], from_model=False)
        self.engine = None
        self.logger = build_logger(cfg, run_dir, self.env.is_main)
        # routing tables are as wide as the unpruned layers: a pruned layer's missing experts read 0
        self.routing = RoutingMetrics(len(self.model.moe_layers()), cfg.moe.num_experts)
        self.stages = StageRunner(
            StageSchedule(cfg.schedule, cfg.moe, t.max_steps),
            self.model.moe_layers(),
            cfg.model.d_model,
            cfg.model.d_ff,
            self.env.is_main,
            num_experts=cfg.moe.num_experts,
            hooks=[self.pruner, LoRAStageHook()],
        )
        self.step = 0
        self._assemble(expert_shards)
        self.last_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.dp_size * cfg.model.seq_len

    # ---------------------------------------------------------------- structure
    def _assemble(self, expert_shards) -> None:
        """(Re)build everything that depends on the model's structure: the stage schedule (parameter names),
        the DeepSpeed engine with its LR schedule at the current step, the checkpoint manager. Called at start
        and after every structure change (pruning, adapters attached or merged, rollback)."""
        cfg, t = self.cfg, self.cfg.trainer
        if self.engine is not None:
            self.engine.destroy()  # releases the old optimizer's gradient hooks on parameters we keep
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.schedule = StageSchedule(cfg.schedule, cfg.moe, t.max_steps, names)
        self.engine = build_engine(self.model, cfg, self.schedule)
        if self.step:  # the LR schedule is a pure function of the step: put it there
            set_schedule_step(self.engine.lr_scheduler, self.step)
        # what must match for optimizer state to be restored (else: weights only, logged)
        layout = {
            "backend": cfg.moe.backend,
            "ep_size": cfg.parallel.ep_size,
            "zero_stage": cfg.parallel.zero_stage,
            "dtype": cfg.parallel.dtype,
            "world_size": self.env.world_size,
            "param_groups": sorted({"".join(map(str, map(int, self.schedule.param_frozen_pattern(n)))) for n in names}),
            "experts": self.experts_per_layer(),
            "lora": self.adapters.active,
        }
        structure = {
            "expert_ids": cfg.moe.expert_ids,
            "lora": self.adapters.active,
            "teacher_expert_ids": self.distiller.teacher_expert_ids,
        }
        teacher = TeacherState(self.distiller.teacher, self.env.rank) if self.distiller.teacher is not None else None
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", self.env, t.keep_checkpoints, layout, [expert_shards, teacher], structure
        )
        self.moe_layers = self.model.moe_layers()
        self.stages.attach(self.schedule, self.moe_layers)
        self.stages.apply(self.step)

    def experts_per_layer(self) -> list[int]:
        return [self.cfg.moe.experts_in_layer(j) for j in range(len(self.model.moe_layers()))]

    def expert_ids(self) -> list[list[int]]:
        """Per MoE layer, the original ids of its current experts."""
        return self.cfg.moe.expert_ids or [list(range(n)) for n in self.experts_per_layer()]

    def remove_experts(self, keep: list[list[int]]) -> None:
        """Collective. Prune every MoE layer to ``keep[j]`` (current indices), carry the survivors' optimizer
        moments into the rebuilt engine. Takes the distillation teacher first when one is wanted."""
        from moetrain.surgery.experts import prune_model
        from moetrain.train.optim_state import read_moments, write_moments

        if self.cfg.distill.enabled and self.distiller.teacher is None:
            self._make_teacher(self.expert_ids(), from_model=True)
        moments, opt_step = read_moments(self.engine, self.model)
        old_ids = self.expert_ids()
        ep_group = self.moe_layers[0].ep_group if self.cfg.moe.backend == "native" else None
        moments = prune_model(self.model, self.cfg.moe, keep, self.cfg.parallel.ep_size, ep_group, moments)
        self.cfg.moe.expert_ids = [[ids[e] for e in k] for ids, k in zip(old_ids, keep)]
        self._assemble(prepare_model_for_engine(self.model, self.cfg))
        write_moments(self.engine, self.model, moments, opt_step)

    def _make_teacher(self, expert_ids: list[list[int]], from_model: bool) -> None:
        """A frozen copy of the model with ``expert_ids`` structure (weights copied from the live model, or
        loaded later from a checkpoint)."""

        cfg = replace(self.cfg, moe=replace(self.cfg.moe, expert_ids=expert_ids))
        teacher, _ = build_model_for_engine(cfg, load_init=False)
        if cfg.moe.backend == "deepspeed":  # outside an engine: join DeepSpeed's expert-parallel groups here
            from deepspeed.moe.layer import MoE

            for m in teacher.modules():
                if isinstance(m, MoE):
                    m.set_deepspeed_parallelism()
        if from_model:
            teacher.load_state_dict(self.model.state_dict())
        self.distiller.set_teacher(teacher, expert_ids)

    def attach_adapters(self) -> None:
        n = self.adapters.attach(self.model)
        self._assemble(prepare_model_for_engine(self.model, self.cfg))
        if self.env.is_main:
            log.info("LoRA adapters on %s: %d trainable parameters", ", ".join(self.cfg.lora.targets), n)

    def merge_adapters(self) -> None:
        self.adapters.merge(self.model)
        self._assemble(prepare_model_for_engine(self.model, self.cfg))

    def save_snapshot(self, name: str) -> Path:
        """A rollback point: a full checkpoint under ``name`` that never becomes ``latest``."""
        return self.checkpoints.save(self.engine, self.step, self.client_state(), tag=name)

    def restore_snapshot(self, path: Path) -> None:
        """Collective: back to the snapshot's structure, weights, optimizer state and RNG, and to its
        distillation teacher: a teacher taken by the round being rolled back goes with it (the snapshot has
        none to load; the next round that removes experts takes it again)."""
        structure = CheckpointManager.saved_structure(path)
        self.cfg.moe.expert_ids = structure.get("expert_ids") or []
        self.model, expert_shards = build_model_for_engine(self.cfg, load_init=False)
        if not structure.get("teacher_expert_ids"):
            self.distiller.drop_teacher()
        self._assemble(expert_shards)
        self.checkpoints.load(self.engine, path.parent, path.name)
        barrier()

    def log_prune_round(self, record: dict) -> None:
        if self.env.is_main:
            self.logger.log(
                {
                    "event": "prune_round",
                    "prune/round": record["round"],
                    "prune/outcome": record["outcome"],
                    "prune/val_loss_before": record["val_loss_before"],
                    "prune/val_loss_after": record["val_loss_after"],
                    # per-layer lists of different lengths: logged as JSON text, shares as histograms
                    "prune/experts_after": {"per_layer": record["experts_after"]},
                    "prune/removed": {"per_layer": record["removed"]},
                    **{f"prune/layer{j}/share": sh for j, sh in enumerate(record["shares"])},
                },
                step=self.step,
            )

    # ---------------------------------------------------------------- state
    def client_state(self) -> dict:
        """Collective (the stage runner sums its interval over ranks)."""
        return {
            "step": self.step,
            "data": self.data.state_dict(),
            "stages": self.stages.state_dict(),
            "prune": self.pruner.state_dict(),
            "config": asdict(self.cfg),
        }

    def resume(self) -> None:
        found = self.resume_from
        if found is None:
            if self.cfg.trainer.resume == "auto" and self.env.is_main:
                log.info("trainer.resume=auto: no checkpoint under %s, starting from step 0", self.checkpoints.root)
            return
        state, with_optimizer = self.checkpoints.load(self.engine, *found)
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"])
        if "stages" in state:
            self.stages.load_state_dict(state["stages"])
        self.pruner.load_state_dict(state.get("prune", {}))
        self.stages.apply(self.step)
        if not with_optimizer:
            # the LR schedule is a pure function of the step: put it where the checkpoint left it
            set_schedule_step(self.engine.lr_scheduler, self.step)
        if self.env.is_main:
            log.info("resumed from %s/%s at step %d", *found, self.step)
            if not with_optimizer:
                log.warning(
                    "the checkpoint was written with another layout (%s): loaded the weights only; "
                    "optimizer state is re-initialized",
                    json.dumps(self.checkpoints.saved_layout(found[0] / found[1])),
                )

    def save(self) -> None:
        self.last_checkpoint = self.checkpoints.save(self.engine, self.step, self.client_state())

    # ---------------------------------------------------------------- steps
    def train_step(self, stage: StageState) -> dict[str, float]:
        t0 = time.perf_counter()
        self.engine.train()
        sums = torch.zeros(4, dtype=torch.float64)
        grad_norm = float("nan")
        step_stats = []
        for _ in range(self.cfg.trainer.grad_accum_steps):
            inputs, labels = (x.to(self.engine.device) for x in self.data.next_train_batch())
            out = self.engine(inputs)
            kl = self.distiller.kl(out.logits_BSV, inputs) if self.distiller.active else None
            loss, parts = training_loss(out, labels, stage.aux_loss_coef, stage.z_loss_coef, kl, self.cfg.distill.beta)
            self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                grad_norm = self._grad_norm()
            self.engine.step()
            if boundary:
                for layer in self.moe_layers:
                    layer.after_optimizer_step()
            self.routing.update(out.moe_stats)
            step_stats.append(out.moe_stats)
            kl_part = parts.get("kl", torch.zeros((), device=parts["ce"].device))
            sums += torch.stack([parts["ce"], parts["aux"], parts["z"], kl_part]).double().cpu()
        self.step += 1
        if grad_norm != grad_norm:  # NaN: the engine's optimizer measured it during step()
            measured = self.engine.get_global_grad_norm()
            grad_norm = float(measured) if measured is not None else float("nan")
        sums = all_reduce_sum(sums) / (self.cfg.trainer.grad_accum_steps * self.dp_size)
        dt = time.perf_counter() - t0
        self.stages.record(step_stats, dt, self.tokens_per_step)
        distill = {"train/distill_kl": float(sums[3])} if self.distiller.active else {}
        return {
            **distill,
            "train/loss": float(sums[0]),
            "train/aux_loss": float(sums[1]),
            "train/z_loss": float(sums[2]),
            "train/lr": float(self.engine.get_lr()[0]),
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": self.tokens_per_step / dt,
            "train/epoch": self.data.epoch,
            "train/aux_loss_coef": stage.aux_loss_coef,
            "train/z_loss_coef": stage.z_loss_coef,
            "stage/index": stage.index,
        }

    def _grad_norm(self) -> float:
        """Global L2 norm of the gradients before clipping, read after DeepSpeed's gradient all-reduce.

        ZeRO/bf16 optimizers compute it themselves (``get_global_grad_norm`` is then only valid after
        ``step``). For plain fp32 ZeRO-0 the averaged gradients are on every rank: replicated parameters
        count once, expert-parallel shards are summed over their expert-parallel group.
        """
        if self.cfg.parallel.zero_stage > 0 or self.cfg.parallel.dtype != "fp32":
            return float("nan")  # filled in after engine.step()
        sq = torch.zeros(2, dtype=torch.float64)
        for p in self.model.parameters():
            if p.grad is not None:
                sq[int(getattr(p, "allreduce", True) is False)] += p.grad.detach().double().pow(2).sum().cpu()
        ep_group = self.moe_layers[0].ep_group if self.moe_layers else None
        if ep_group is not None:
            expert_sq = sq[1:].clone()
            torch.distributed.all_reduce(expert_sq, group=ep_group)
            sq[1] = expert_sq[0]
        return float(sq.sum().sqrt())

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token cross-entropy (nats) over the fixed validation batches of all ranks."""
        self.engine.eval()
        batches = self.data.val_batches(self.cfg.trainer.eval_batches)
        totals = all_reduce_sum(cross_entropy_sums(self.engine, batches, self.engine.device))
        self.last_val_loss = float(totals[0] / totals[1])
        return self.last_val_loss

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        t = self.cfg.trainer
        self.resume()
        if self.env.is_main:
            log.info(
                "run folder: %s | params: %.2fM | unigram baseline: %.4f nats/token | %d train sequences",
                self.run_dir,
                sum(p.numel() for p in self.model.parameters()) / 1e6,
                self.unigram_baseline,
                len(self.data.train),
            )
            self.logger.log({"data/unigram_baseline": self.unigram_baseline}, step=self.step)
        bar = self._progress_bar()
        self.stages.apply(self.step)
        while self.step < t.max_steps:
            stage = self.stages.apply(self.step)
            metrics = self.train_step(stage)
            if self.step % t.expert_stats_every == 0:
                metrics.update(self.routing.reduce_and_reset())
            stage_end = self.stages.is_stage_end(self.step)
            if self.step % t.eval_every == 0 or stage_end:
                metrics["val/loss"] = self.validate()
            if self.step % t.log_every == 0 or "val/loss" in metrics:
                self.logger.log(metrics, step=self.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
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
        self.adapters.merge(self.model)  # a run that stops inside a LoRA stage exports merged weights
        self.export_dir = self._export()
        return self._finish()

    def _export(self) -> Path:
        """Collective: the final model (pruned, adapters merged) as safetensors + config in ``export/``."""
        from moetrain.interop.export import export_model

        # the routing in force at the end (top-k, capacities, drop policy) is what the exported model runs
        final = self.schedule.at(max(self.step - 1, 0)).moe
        moe = replace(self.cfg.moe, **final)
        directory = export_model(self.model, self.cfg.model, moe, self.run_dir / "export", self.env.is_main)
        barrier()
        if self.env.is_main:
            log.info("exported the final model to %s (moetrain.interop.export.load_exported)", directory)
        return directory

    def _end_stage(self) -> None:
        """At a stage boundary (and at the end): summarise the stage; if another follows, switch to it and
        record what changed (log line, ``metrics.jsonl`` and W&B event)."""
        summary = self.stages.close_stage(self.step, self.last_val_loss)
        self.stages.end_stage(self, self.step)  # hooks: e.g. LoRA adapters merged
        summary["experts_per_layer"] = self.experts_per_layer()
        summary["params"] = count_parameters(self.model, self.cfg.parallel.ep_size)
        summary["prune_rounds"] = [r["round"] for r in self.pruner.rounds if r["stage"] == summary["stage"]]
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
        event = self.stages.begin_stage(self, self.step)
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

    def _report(self) -> None:
        from moetrain.metrics.report import COLUMNS, table_rows, write_report

        if not self.stages.summaries:  # resumed at the very end: nothing ran
            return
        extra = {
            "steps": self.step,
            "unigram baseline (nats/token)": f"{self.unigram_baseline:.4f}",
            "backend": self.cfg.moe.backend,
            "ranks": self.env.world_size,
            "ep_size": self.cfg.parallel.ep_size,
        }
        baseline = None
        if self.cfg.logging.baseline_run:  # a reference run (e.g. top2_baseline at the same total steps)
            path = Path(self.cfg.logging.baseline_run)
            baseline = {"name": path.name, **json.loads((path / "summary.json").read_text())}
        rounds = [{k: v for k, v in r.items() if k != "profile"} for r in self.pruner.rounds]
        files = write_report(self.run_dir, self.stages.summaries, extra, rounds, baseline)
        self.logger.log_report(
            {k: v for k, v in files.items() if v.suffix == ".png"},
            [c for c, _, _ in COLUMNS],
            table_rows(self.stages.summaries),
        )
        log.info("report: %s", files["report"])

    def _progress_bar(self):
        if not (self.env.is_main and self.cfg.logging.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.trainer.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _finish(self) -> dict:
        summary = {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "val_loss": self.last_val_loss,
            "unigram_baseline": self.unigram_baseline,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "export": str(self.export_dir),
            "experts_per_layer": self.experts_per_layer(),
            "params": count_parameters(self.model, self.cfg.parallel.ep_size),
            "prune_rounds": [{k: v for k, v in r.items() if k != "profile"} for r in self.pruner.rounds],
            "wandb": self.logger.wandb_location(),
        }
        if self.env.is_main:
            summary["stages"] = self.stages.summaries
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._report()
            log.info(
                "done: val loss %s (unigram baseline %.4f) | checkpoint %s | W&B %s",
                summary["val_loss"],
                self.unigram_baseline,
                summary["checkpoint"],
                summary["wandb"],
            )
        self.logger.finish()
        return summary
