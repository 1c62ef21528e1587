"""What one implementation of the expert FFN provides (the entries of :mod:`moetrain.kernels.registry`).

Shape legend: T tokens, S rows sorted by expert, A kept assignments, D model dim, F expert hidden dim,
E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SwiGLU = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, assignment_A, tokens_per_expert_E) -> (out_TD, y_AD)
TokenSwiGLU = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# (logits_TE, bias_E, active_E, top_k, renormalize, scale) ->
#   (probs_TE, idx_TK, gates_TK, lse_T, psum_E, entropy_sum), or None where the pass does not apply
SoftmaxRoute = Callable[..., tuple[torch.Tensor, ...] | None]


@dataclass(frozen=True)
class ExpertKernel:
    """What one implementation provides. ``swiglu``: sorted rows -> their experts' outputs (y_SD). The optional
    parts, where an implementation has them: ``swiglu_tokens`` (tokens in, gate-combined tokens out, the
    gather and combine inside), ``softmax_route`` (the softmax router after its logits in one pass)."""

    name: str
    swiglu: SwiGLU
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
    swiglu_tokens: TokenSwiGLU | None = None
    softmax_route: SoftmaxRoute | None = None
