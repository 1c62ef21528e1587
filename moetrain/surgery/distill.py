"""Distillation from a frozen teacher: ``distill.teacher=pre_prune``, a copy taken just before the first pruning
round; ``distill.teacher=base``, the model at step 0 of a fresh run (after ``model.init_from`` is loaded, before
any training), at its own top-k and dropless. The base is also the *reference* every validation compares with
(:mod:`moetrain.train.reference`), whether or not ``distill.enabled``.

``loss = (1 - beta) * CE + beta * T^2 * KL(teacher || student)``, both distributions at temperature T, KL
summed over the vocabulary and averaged over tokens (the T^2 keeps gradient magnitudes comparable across T,
as in Hinton et al.). Applies in every step while a teacher exists and ``distill.enabled``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import DistillConfig
from moetrain.config.choices import DistillTeacher
from moetrain.model import ModelOutput
from moetrain.surgery.teacher import TeacherState
from moetrain.train.model_state import ModelState


def distillation_kl(student_BSV: torch.Tensor, teacher_BSV: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_tokens sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(logits / T)``."""
    t = temperature
    log_p_s = F.log_softmax(student_BSV.float().flatten(0, 1) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_BSV.float().flatten(0, 1) / t, dim=-1)
    return t * t * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


class Distiller:
    """Holds the teacher and its structure (per MoE layer, the original ids of its experts: what a checkpoint
    records to rebuild it); ``kl`` is the distillation term against the teacher."""

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.teacher: nn.Module | None = None
        self.teacher_expert_ids: list[list[int]] | None = None

    @property
    def active(self) -> bool:
        return self.cfg.enabled and self.teacher is not None

    @property
    def teacher_kind(self) -> str | None:
        """``distill.teacher`` of the teacher held now (None: no teacher); a checkpoint records it."""
        return str(self.cfg.teacher) if self.teacher is not None else None

    @property
    def reference(self) -> nn.Module | None:
        """The frozen base model every validation compares with (``distill.teacher=base``), else None."""
        return self.teacher if self.cfg.teacher == DistillTeacher.base else None

    def set_teacher(self, teacher: nn.Module, expert_ids: list[list[int]]) -> None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self.teacher_expert_ids = [list(ids) for ids in expert_ids]

    def build_teacher(self, state: ModelState, expert_ids: list[list[int]], from_model: bool) -> None:
        """A frozen copy of the run's model with the ``expert_ids`` structure: weights copied from the live
        model (``from_model``), or loaded later from a checkpoint (:meth:`checkpoint_component`). The base runs
        at the model's own ``moe.top_k`` and dropless, whatever the stages later set."""
        dropless = {"capacity_factor": None, "eval_capacity_factor": None}
        overrides = dropless if self.cfg.teacher == DistillTeacher.base else {}
        teacher = state.model_copy(state.model if from_model else None, expert_ids, overrides)
        self.set_teacher(teacher, expert_ids)

    def checkpoint_component(self, rank: int) -> TeacherState | None:
        """What saves and loads this rank's teacher weights in a checkpoint (None: no teacher)."""
        return TeacherState(self.teacher, rank) if self.teacher is not None else None

    def drop_teacher(self) -> None:
        """No teacher again (a pruning round that took it was rolled back)."""
        self.teacher = None
        self.teacher_expert_ids = None

    @torch.no_grad()
    def teacher_forward(self, inputs_BS: torch.Tensor) -> ModelOutput:
        """The teacher's forward on ``inputs_BS``'s device (the teacher is built on the host before the engine
        moves the model; it follows the inputs the first time)."""
        device = inputs_BS.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher(inputs_BS)

    def teacher_logits(self, inputs_BS: torch.Tensor) -> torch.Tensor:
        return self.teacher_forward(inputs_BS).logits_BSV

    def kl(self, student_BSV: torch.Tensor, inputs_BS: torch.Tensor) -> torch.Tensor:
        """The distillation term of one micro-batch (differentiable in the student)."""
        return distillation_kl(student_BSV, self.teacher_logits(inputs_BS), self.cfg.temperature)
