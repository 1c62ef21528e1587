"""Validation cross-entropy, one definition for the trainer (any engine, all-reduced) and exported models."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


def cross_entropy_sums(
    forward: Callable[[torch.Tensor], object], batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device
) -> torch.Tensor:
    """``[sum of next-token cross-entropy (nats), number of tokens]`` over ``batches`` as float64: sums, so
    ranks (or simulated ranks) add them up before the one division. ``forward`` returns a ``ModelOutput``."""
    totals = torch.zeros(2, dtype=torch.float64)
    for inputs, labels in batches:
        logits_BSV = forward(inputs.to(device)).logits_BSV
        ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels.to(device).flatten(), reduction="sum")
        totals += torch.tensor([ce.item(), labels.numel()], dtype=torch.float64)
    return totals
