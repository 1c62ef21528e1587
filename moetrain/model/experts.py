"""Stacked SwiGLU experts computed for all experts at once.

Shape legend: S tokens sorted by expert, D model dim, F expert hidden dim, E experts, C capacity slots.

``GroupedExperts.forward`` is the one seam for the expert FFN (called with a permutation and gates it also does the
gather and the gate-weighted combine, or hands all three to the CPU kernel's token-level entry): on CPU the kernel of
``cpu_experts.py`` (``moe.grouped_mm=fused``; what ``auto`` picks when it builds), else SwiGLU over
``grouped_mm``: ``torch._grouped_mm`` where the device and dtype support it (``grouped``), else a loop over
``W.unbind(0)`` (``loop``). (Indexing ``W[e]`` inside a Python loop would make autograd
build a full-size zero gradient of W per expert; ``unbind`` gives each slice its own gradient view.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.kernels.cpu import experts as cpu_experts
from moetrain.model.dispatch import Permutation, combine


def _grouped_mm_supported(x_SD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # _grouped_mm needs 16-byte aligned row strides for both operands.
    if (x_SD.shape[-1] * x_SD.element_size()) % 16 or (w_EDF.shape[-1] * w_EDF.element_size()) % 16:
        return False
    if x_SD.device.type == "cpu":
        return x_SD.dtype in (torch.float32, torch.bfloat16)
    if x_SD.device.type == "cuda":
        return x_SD.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_SD.device)[0] >= 9
    return False


def grouped_mm(
    x_SD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """``out[s] = x[s] @ w[e(s)]`` where rows are grouped by expert in order, ``tokens_per_expert`` per group."""
    if impl == "grouped" or (impl == "auto" and _grouped_mm_supported(x_SD, w_EDF)):
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_SD.contiguous(), w_EDF, offs=offs_E)
    counts = tokens_per_expert_E.tolist()
    chunks = [x_e @ w_e for x_e, w_e in zip(torch.split(x_SD, counts), w_EDF.unbind(0)) if x_e.shape[0]]
    if not chunks:
        return x_SD.new_zeros(0, w_EDF.shape[-1])
    return torch.cat(chunks)


class GroupedExperts(nn.Module):
    """E SwiGLU FFNs ``w2(silu(x w1) * (x w3))`` with weights stacked along a leading expert dim."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, impl: str = "auto") -> None:
        super().__init__()
        self.impl = impl
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
        outputs in sorted order. On the CPU kernel gather and combine run inside it, on blocks in cache.
        Both modes go through this one ``forward``, so wrappers of the module (peft's LoRA on the expert
        weights, hooks) apply to both."""
        if perm is not None:
            return self._forward_tokens(x, tokens_per_expert_E, perm, gates_TK)
        if self._use_fused(x):
            return cpu_experts.FusedSwiGLUExperts.apply(x, self.w1_EDF, self.w3_EDF, self.w2_EFD, tokens_per_expert_E)
        h_SF = F.silu(grouped_mm(x, self.w1_EDF, tokens_per_expert_E, self.impl))
        h_SF = h_SF * grouped_mm(x, self.w3_EDF, tokens_per_expert_E, self.impl)
        return grouped_mm(h_SF, self.w2_EFD, tokens_per_expert_E, self.impl)

    def _forward_tokens(
        self, x_TD: torch.Tensor, tokens_per_expert_E: torch.Tensor, perm: Permutation, gates_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._use_fused(x_TD):
            # the kernel weights in fp32, or fp64 for fp64 activations (the router's gates are fp32)
            gates_TK = gates_TK.to(torch.float64 if x_TD.dtype == torch.float64 else torch.float32)
            return cpu_experts.FusedMoEExperts.apply(
                x_TD, gates_TK, self.w1_EDF, self.w3_EDF, self.w2_EFD, perm.assignment_A, tokens_per_expert_E
            )
        y_AD = self.forward(x_TD.index_select(0, perm.token_A), tokens_per_expert_E)
        return combine(y_AD, perm, gates_TK, x_TD.shape[0]), y_AD

    def _use_fused(self, x_SD: torch.Tensor) -> bool:
        if self.impl == "fused":
            if not cpu_experts.fused_supported(x_SD):
                raise ValueError(
                    f"moe.grouped_mm=fused runs on CPU tensors (float32, bfloat16, float64), got {x_SD.device.type} "
                    f"{x_SD.dtype}; allowed elsewhere: auto, grouped, loop"
                )
            return True
        return self.impl == "auto" and cpu_experts.fused_supported(x_SD) and cpu_experts.fused_kernel_available()

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Fixed shapes: every expert computes its C slots (padding included) with one batched GEMM."""
        h_ECF = F.silu(torch.bmm(x_ECD, self.w1_EDF)) * torch.bmm(x_ECD, self.w3_EDF)
        return torch.bmm(h_ECF, self.w2_EFD)
