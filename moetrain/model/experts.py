"""Stacked SwiGLU experts computed for all experts at once.

Shape legend: T tokens, S tokens sorted by expert, A kept assignments, D model dim, F expert hidden dim,
E experts, C capacity slots.

``GroupedExperts.forward`` is the one seam for the expert FFN: it asks the kernel registry
(:func:`moetrain.kernels.expert_kernel`) for the implementation ``moe.expert_impl`` names on the input's
device and dtype. Gather and gate-weighted combine are the caller's (:mod:`moetrain.model.dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.choices import ExpertImpl
from moetrain.kernels import expert_kernel


class GroupedExperts(nn.Module):
    """E SwiGLU FFNs ``w2(silu(x w1) * (x w3))`` with weights stacked along a leading expert dim."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, impl: ExpertImpl | str = ExpertImpl.auto) -> None:
        super().__init__()
        self.impl = ExpertImpl(impl)
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))

    def forward(self, x_SD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (``tokens_per_expert_E`` rows each) -> their experts' outputs y_SD."""
        kernel = expert_kernel(self.impl, x_SD.device, x_SD.dtype)
        return kernel.swiglu(x_SD, self.w1_EDF, self.w3_EDF, self.w2_EFD, tokens_per_expert_E)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Fixed shapes: every expert computes its C slots (padding included) with one batched GEMM."""
        h_ECF = F.silu(torch.bmm(x_ECD, self.w1_EDF)) * torch.bmm(x_ECD, self.w3_EDF)
        return torch.bmm(h_ECF, self.w2_EFD)
