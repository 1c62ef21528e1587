"""The softmax router after its logits GEMM on the CPU kernel (``csrc/softmax_router.cpp``): one pass each way.

Shape legend: T tokens, E experts, K experts per token.

``FusedSoftmaxRouter`` computes, from the (T, E) logits, what ``router.TopKRouter`` otherwise computes with ~15
ATen calls (why in ``softmax_router.h``): softmax scores, the top-k of score + bias among the active experts,
the combine gates, and the inputs of the losses and metrics (``lse_T`` for the z-loss, ``psum_E`` = sum of the
scores over tokens for the aux loss, the entropy). It runs where the router's logits GEMM runs on the kernel:
softmax scoring without group-limited routing, fp32 CPU logits, a CPU with AVX-512 (``supported``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moetrain.kernels.cpu import experts as cpu_experts


def supported(logits_TE: torch.Tensor) -> bool:
    """Whether ``logits_TE`` can go through the fused pass: fp32 on CPU, the kernel built with its AVX-512 code."""
    return (
        cpu_experts.fused_supported(logits_TE)
        and logits_TE.dtype == torch.float32
        and cpu_experts.fused_kernel_available()
        and cpu_experts.f32_gemm_active()
    )


class FusedSoftmaxRouter(torch.autograd.Function):
    """``(probs_TE, idx_TK, gates_TK, lse_T, psum_E, entropy_sum)`` from ``logits_TE``; ``gates_TK``, ``lse_T`` and
    ``psum_E`` are differentiable, the scores, indices and entropy are not (the losses reach the scores through
    ``psum_E`` and ``lse_T``). ``renormalize``: whether the gates are renormalised over the k (already resolved for
    k = 1); ``scale``: ``routed_scaling_factor``. Ties in the top-k go to the lower expert index."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, active_E, top_k: int, renormalize: bool, scale: float):
        kernel = cpu_experts._build()
        probs, idx, gates, lse, psum, entropy = kernel.router_forward(
            logits_TE.contiguous(), bias_E.float().contiguous(), active_E, top_k, renormalize, scale
        )
        ctx.save_for_backward(probs, idx)
        ctx.renormalize, ctx.scale = renormalize, scale
        ctx.mark_non_differentiable(probs, idx, entropy)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors to read
        return probs, idx, gates, lse, psum, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, _dprobs, _didx, dgates_TK, dlse_T, dpsum_E, _dentropy):
        if not ctx.needs_input_grad[0] or (dgates_TK is None and dlse_T is None and dpsum_E is None):
            return None, None, None, None, None, None
        probs, idx = ctx.saved_tensors

        def contiguous(t):
            return None if t is None else t.float().contiguous()

        dlogits = cpu_experts._build().router_backward(
            probs, idx, contiguous(dgates_TK), contiguous(dlse_T), contiguous(dpsum_E), ctx.renormalize, ctx.scale
        )
        return dlogits, None, None, None, None, None
