"""The CPU kernel as an entry of the implementation registry (``moe.expert_impl=cpu_kernel``).

Shape legend: T tokens, A kept assignments, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moetrain.config import ConfigError
from moetrain.kernels.cpu import experts as cpu_experts
from moetrain.kernels.cpu import router as cpu_router
from moetrain.kernels.kernel import ExpertKernel


def _require_build() -> None:
    reason = cpu_experts.build_error()
    if reason is not None:
        raise ConfigError(
            f"moe.expert_impl=cpu_kernel: the CPU expert kernel does not build here ({reason}); "
            "allowed: auto, grouped_mm, loop"
        )


def _swiglu_tokens(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, assignment_A, tokens_per_expert_E):
    # the kernel weights in fp32, or fp64 for fp64 activations (the router's gates are fp32)
    gates_TK = gates_TK.to(torch.float64 if x_TD.dtype == torch.float64 else torch.float32)
    return cpu_experts.FusedMoEExperts.apply(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, assignment_A, tokens_per_expert_E)


def _softmax_route(logits_TE, bias_E, active_E, top_k: int, renormalize: bool, scale: float):
    """The fused softmax pass where it runs (fp32 logits, the kernel's AVX-512 code), else None."""
    if not cpu_router.supported(logits_TE):
        return None
    return cpu_router.FusedSoftmaxRouter.apply(logits_TE, bias_E, active_E, top_k, renormalize, scale)


def cpu_expert_kernel() -> ExpertKernel:
    """The registry entry; stops with one line naming ``moe.expert_impl`` where the kernel does not build."""
    _require_build()
    return ExpertKernel(
        "cpu_kernel",
        swiglu=cpu_experts.FusedSwiGLUExperts.apply,
        linear=cpu_experts.linear,
        swiglu_tokens=_swiglu_tokens,
        softmax_route=_softmax_route,
    )


def build_on_first_local_rank(local_rank: int, barrier: Callable[[], None]) -> None:
    """Each node's first rank builds (or loads) the kernel while the others wait at the barrier; then every
    rank loads it. A build failure stops the run here, naming ``moe.expert_impl``."""
    if local_rank == 0:
        cpu_experts.fused_kernel_available()
    barrier()
    _require_build()
