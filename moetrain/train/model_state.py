"""The model a run trains and everything that depends on its structure: the model, the DeepSpeed engine and
its LR schedule, the stage schedule (parameter names), the checkpoint manager, the LoRA adapters and the
distillation teacher. :meth:`ModelState.rebuild` re-makes the structure-dependent parts after a structure
change (pruning, adapters attached or merged, a rollback); structural operations themselves live in
``surgery`` and act through this object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from moetrain.backends import get_backend
from moetrain.config import ConfigError, TrainConfig
from moetrain.runtime.distributed import LaunchEnv, barrier
from moetrain.train.checkpoint import CheckpointManager, resolve_resume
from moetrain.train.components import Adapters, Distillation
from moetrain.train.engine import build_engine, build_model_for_engine, prepare_model_for_engine, set_schedule_step
from moetrain.train.stages import StageSchedule

log = logging.getLogger("moetrain")


def count_parameters(model: nn.Module, ep_size: int) -> int:
    """Parameters of the whole model: expert-parallel shards (tagged ``allreduce=False``) count ``ep_size``
    times, since every rank of an expert-parallel group holds different experts."""
    return sum(p.numel() * (ep_size if getattr(p, "allreduce", True) is False else 1) for p in model.parameters())


class ModelState:
    def __init__(
        self,
        cfg: TrainConfig,
        env: LaunchEnv,
        run_dir: Path,
        adapters: Adapters,
        distiller: Distillation,
        init_weights: Callable[[nn.Module, TrainConfig], None] | None = None,
    ) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        self.adapters, self.distiller = adapters, distiller
        self.backend = get_backend(cfg.moe.backend)
        self.step = 0
        self.engine = None
        self.on_rebuild: list[Callable[[ModelState], None]] = []  # e.g. the stage runner follows the new layers
        # the loop state a checkpoint carries (data position, stage sums, hook states): set by the trainer
        self.client_state: Callable[[], dict[str, Any]] = dict
        # a checkpoint of a pruned or adapted model is resumed into the same structure: rebuild it first
        self.resume_from = resolve_resume(cfg.trainer.resume, run_dir / "checkpoints")
        saved = CheckpointManager.saved_structure(self.resume_from[0] / self.resume_from[1]) if self.resume_from else {}
        if saved.get("expert_ids"):
            cfg.moe.expert_ids = saved["expert_ids"]
        self.model, _ = build_model_for_engine(cfg, init_weights if self.resume_from is None else None)
        if saved.get("lora"):
            self.adapters.attach(self.model)
        teacher = cfg.distill.teacher
        if saved.get("teacher_expert_ids"):
            # checkpoints written before distill.teacher existed hold a pre_prune teacher
            if saved.get("teacher", "pre_prune") != teacher:
                raise ConfigError(
                    f"distill.teacher={teacher} does not match the teacher of the checkpoint "
                    f"{self.resume_from[0] / self.resume_from[1]} ({saved.get('teacher', 'pre_prune')}); "
                    "allowed: the checkpoint's"
                )
            self.distiller.build_teacher(self, saved["teacher_expert_ids"], from_model=False)
        elif teacher == "base" and self.resume_from is not None:
            raise ConfigError(
                f"distill.teacher=base: the checkpoint {self.resume_from[0] / self.resume_from[1]} holds no base "
                "model (it is taken at step 0 of a fresh run); allowed: a checkpoint of a distill.teacher=base run"
            )
        elif teacher == "base":  # the base: the model as loaded (model.init_from), before any training
            self.distiller.build_teacher(self, self.expert_ids(), from_model=True)

    # ---------------------------------------------------------------- structure
    def rebuild(self) -> None:
        """(Re)build everything that depends on the model's structure: the stage schedule (parameter names),
        the DeepSpeed engine with its LR schedule at the current step, the checkpoint manager. Called at start
        and after every structure change. The current model's expert-parallel parameters are declared to
        DeepSpeed again (idempotent), which also gives the component that checkpoints their shards."""
        cfg, t = self.cfg, self.cfg.trainer
        expert_shards = prepare_model_for_engine(self.model, cfg)
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
            "teacher": self.distiller.teacher_kind,
        }
        components = [expert_shards, self.distiller.checkpoint_component(self.env.rank)]
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", self.env, t.keep_checkpoints, layout, components, structure
        )
        self.moe_layers = self.model.moe_layers()
        for listener in self.on_rebuild:
            listener(self)

    def experts_per_layer(self) -> list[int]:
        """Per MoE layer, its experts (FFNs; MoNE constants are router slots, not experts)."""
        moe = self.cfg.moe
        return [moe.experts_in_layer(j) - moe.constants_in_layer(j) for j in range(len(self.model.moe_layers()))]

    def expert_ids(self) -> list[list[int]]:
        """Per MoE layer, the original ids of its current experts."""
        return self.cfg.moe.expert_ids or [list(range(n)) for n in self.experts_per_layer()]  # no constants

    def param_count(self) -> int:
        return count_parameters(self.model, self.cfg.parallel.ep_size)

    def model_copy(self, source: nn.Module | None, expert_ids: list[list[int]], moe: dict[str, Any]) -> nn.Module:
        """A model of this run outside the engine (it joins its expert-parallel groups here): the
        ``expert_ids`` structure, ``moe`` overriding ``moe.*`` values (e.g. a stage's top-k, dropless), and
        ``source``'s weights when given (a distillation teacher, a timing copy)."""
        cfg = replace(self.cfg, moe=replace(self.cfg.moe, expert_ids=expert_ids, **moe))
        model, _ = build_model_for_engine(cfg)
        self.backend.join_groups(model)
        if source is not None:
            model.load_state_dict(source.state_dict())
        return model

    def attach_adapters(self) -> int:
        """Collective: LoRA adapters on the configured targets; returns their trainable parameter count."""
        n = self.adapters.attach(self.model)
        self.rebuild()
        return n

    def merge_adapters(self) -> None:
        self.adapters.merge(self.model)
        self.rebuild()

    # ---------------------------------------------------------------- checkpoints
    def save(self, tag: str | None = None) -> Path:
        """Collective: a checkpoint at the current step (``tag``: a rollback point that never becomes
        ``latest``)."""
        return self.checkpoints.save(self.engine, self.step, self.client_state(), tag=tag)

    def restore(self, path: Path) -> None:
        """Collective: back to a snapshot's structure, weights, optimizer state and RNG, and to its distillation
        teacher: a pre_prune teacher taken after the snapshot goes (the next round that removes experts takes
        it again); the base (taken at step 0, before any snapshot) stays."""
        structure = CheckpointManager.saved_structure(path)
        self.cfg.moe.expert_ids = structure.get("expert_ids") or []
        self.model, _ = build_model_for_engine(self.cfg)
        if not structure.get("teacher_expert_ids") and self.distiller.teacher_kind != "base":
            self.distiller.drop_teacher()
        self.rebuild()
        self.checkpoints.load(self.engine, path.parent, path.name)
        barrier()

    def load_resume(self) -> dict[str, Any] | None:
        """Collective: the checkpoint ``trainer.resume`` names into the engine; returns its client state (None:
        nothing to resume). The step is restored here; the caller restores the rest of its loop state."""
        found = self.resume_from
        if found is None:
            if self.cfg.trainer.resume == "auto" and self.env.is_main:
                log.info("trainer.resume=auto: no checkpoint under %s, starting from step 0", self.checkpoints.root)
            return None
        state, with_optimizer = self.checkpoints.load(self.engine, *found)
        self.step = int(state["step"])
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
        return state
