"""What one implementation of the expert FFN provides (the entries of :mod:`moetrain.kernels.registry`).

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (x_SD, w1_EDF, w3_EDF, w2_EFD, tokens_per_expert_E) -> y_SD
SwiGLU = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertKernel:
    """One implementation: ``swiglu`` maps rows sorted by expert to their experts' outputs (y_SD)."""

    name: str
    swiglu: SwiGLU
