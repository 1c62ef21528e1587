"""Stacked SwiGLU experts computed for all experts at once.

Shape legend: T tokens, S tokens sorted by expert, A kept assignments, D model dim, F expert hidden dim,
E experts, C capacity slots.

``GroupedExperts.forward`` is the one seam for the expert FFN: it asks the kernel registry
(:func:`moetrain.kernels.expert_kernel`) for the implementation ``moe.expert_impl`` names on the input's
device and dtype. Called with a permutation and gates it also does the gather and the gate-weighted combine,
or hands all three to an implementation that fuses them (``swiglu_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.choices import ExpertImpl
from moetrain.kernels import expert_kernel
from moetrain.model.dispatch import Permutation, combine


class GroupedExperts(nn.Module):
    """E SwiGLU FFNs ``w2(silu(x w1) * (x w3))`` with weights stacked along a leading expert dim."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, impl: ExpertImpl | str = ExpertImpl.auto) -> None:
        super().__init__()
        self.impl = ExpertImpl(impl)
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))

    def forward(
        self,
        x: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        *,
        perm: Permutation | None = None,
        gates_TK: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows sorted by expert (x_SD, ``tokens_per_expert_E`` per expert) -> their experts' outputs y_SD.

        With ``perm`` and ``gates_TK`` (no expert parallelism): tokens in, tokens out. ``x`` is x_TD, every
        kept assignment of ``perm`` runs through its expert and the outputs are combined per token:
        returns ``(out_TD, y_AD)`` with ``out[t] = sum_k gates[t, k] * y[t, k]`` and ``y_AD`` the unweighted
        outputs in sorted order; an implementation with ``swiglu_tokens`` runs gather and combine inside it, on
        blocks in cache. Both modes go through this one ``forward``, so wrappers of the module (peft's LoRA on
        the expert weights, hooks) apply to both."""
        kernel = expert_kernel(self.impl, x.device, x.dtype)
        if perm is None:
            return kernel.swiglu(x, self.w1_EDF, self.w3_EDF, self.w2_EFD, tokens_per_expert_E)
        if kernel.swiglu_tokens is not None:
            return kernel.swiglu_tokens(
                x, gates_TK, self.w1_EDF, self.w3_EDF, self.w2_EFD, perm.assignment_A, tokens_per_expert_E
            )
        y_AD = self.forward(x.index_select(0, perm.token_A), tokens_per_expert_E)
        return combine(y_AD, perm, gates_TK, x.shape[0]), y_AD

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Fixed shapes: every expert computes its C slots (padding included) with one batched GEMM."""
        h_ECF = F.silu(torch.bmm(x_ECD, self.w1_EDF)) * torch.bmm(x_ECD, self.w3_EDF)
        return torch.bmm(h_ECF, self.w2_EFD)
