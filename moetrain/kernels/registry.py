"""The one seam between the model and its kernels: an implementation of the expert FFN and the router's
GEMM, looked up by ``moe.expert_impl``, device and dtype.

Shape legend: T tokens, S rows sorted by expert, A kept assignments, D model dim, F expert hidden dim,
E experts, K experts per token.

``auto`` is ATen: ``torch._grouped_mm`` where it supports the device and dtype (fp32/bf16 on CPU, bf16 on
sm90+ CUDA; rows that are not 16-byte aligned go through the loop), else one GEMM per expert.
``cpu_kernel`` is the C++ CPU kernel (opt-in, frozen): it also fuses the gather and the gate-weighted combine
into the expert FFN (``swiglu_tokens``) and runs the router's logits GEMM and softmax pass (``linear``,
``softmax_route``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moetrain.config import ConfigError
from moetrain.config.choices import ExpertImpl
from moetrain.kernels import aten
from moetrain.kernels.kernel import ExpertKernel

GROUPED_MM = ExpertKernel("grouped_mm", aten.swiglu_with(aten.grouped_gemm))
LOOP = ExpertKernel("loop", aten.swiglu_with(aten.loop_gemm))
AUTO_GROUPED_MM = ExpertKernel("grouped_mm", aten.swiglu_with(aten.aligned_gemm))


@functools.cache
def _cpu_kernel() -> ExpertKernel:
    from moetrain.kernels.cpu.bindings import cpu_expert_kernel  # imports the C++ build only when asked for

    return cpu_expert_kernel()


def expert_kernel(impl: ExpertImpl | str, device: torch.device, dtype: torch.dtype) -> ExpertKernel:
    """The implementation ``moe.expert_impl=impl`` runs on tensors of ``device`` and ``dtype``; a
    ``ConfigError`` (one line, naming the key) where the implementation asked for cannot run them."""
    impl = ExpertImpl(impl)
    if impl is ExpertImpl.cpu_kernel:
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ConfigError(
                f"moe.expert_impl=cpu_kernel runs on CPU tensors (float32, bfloat16, float64), got {device.type} "
                f"{dtype}; allowed elsewhere: auto, grouped_mm, loop"
            )
        return _cpu_kernel()
    if impl is ExpertImpl.grouped_mm:
        return GROUPED_MM
    if impl is ExpertImpl.loop:
        return LOOP
    return AUTO_GROUPED_MM if aten.grouped_mm_runs_on(torch.device(device), dtype) else LOOP


def prepare_process(
    impl: ExpertImpl | str,
    num_threads: int | None,
    local_world_size: int,
    local_rank: int,
    barrier: Callable[[], None],
) -> None:
    """Process settings a run's kernels need, before its first tensor: on CPU the threads per rank, glibc's
    allocator and huge pages (``kernels.cpu.runtime``); with ``cpu_kernel``, the kernel built on each
    node's first rank while the others wait (so a build, or a stale lock, shows in the log at start)."""
    if torch.cuda.is_available():
        return
    from moetrain.kernels.cpu import runtime

    runtime.configure_from_environment(num_threads, local_world_size)
    if ExpertImpl(impl) is ExpertImpl.cpu_kernel:
        from moetrain.kernels.cpu.bindings import build_on_first_local_rank

        build_on_first_local_rank(local_rank, barrier)
