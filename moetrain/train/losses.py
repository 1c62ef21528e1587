"""The training objective of one micro-batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetrain.model import ModelOutput


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
