"""The one seam between the model and its kernels: an implementation of the expert FFN, looked up by
``moe.expert_impl``, device and dtype.

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.

``auto`` runs, in this order: ``torch._grouped_mm`` where it supports the device and dtype (fp32/bf16 on CPU,
bf16 on sm90+ CUDA; rows that are not 16-byte aligned go through the loop); on any other CUDA GPU or dtype,
DeepSpeed's Triton grouped GEMM (:mod:`moetrain.kernels.triton`); else one GEMM per expert, with a one-time
warning naming the reason. ``grouped_mm``, ``triton`` and ``loop`` force one.
"""

from __future__ import annotations

import logging

import torch

from moetrain.config.choices import ExpertImpl
from moetrain.kernels import aten, triton
from moetrain.kernels.kernel import ExpertKernel

GROUPED_MM = ExpertKernel("grouped_mm", aten.swiglu_with(aten.grouped_gemm))
LOOP = ExpertKernel("loop", aten.swiglu_with(aten.loop_gemm))
AUTO_GROUPED_MM = ExpertKernel("grouped_mm", aten.swiglu_with(aten.aligned_gemm))
TRITON = ExpertKernel("triton", aten.swiglu_with(triton.triton_gemm))

log = logging.getLogger("moetrain")
_warned: set[tuple[str, str]] = set()


def expert_kernel(impl: ExpertImpl | str, device: torch.device, dtype: torch.dtype) -> ExpertKernel:
    """The implementation ``moe.expert_impl=impl`` runs on tensors of ``device`` and ``dtype``."""
    impl = ExpertImpl(impl)
    if impl is ExpertImpl.grouped_mm:
        return GROUPED_MM
    if impl is ExpertImpl.loop:
        return LOOP
    if impl is ExpertImpl.triton:
        return TRITON
    device = torch.device(device)
    if aten.grouped_mm_runs_on(device, dtype):
        return AUTO_GROUPED_MM
    why = "torch._grouped_mm has no kernel for it"
    if device.type == "cuda":
        unavailable = triton.triton_unavailable()
        if unavailable is None:
            return TRITON
        why += f" and DeepSpeed's Triton grouped GEMM cannot run: {unavailable}"
    key = (str(device.type), str(dtype))
    if key not in _warned:  # once per device type and dtype: the loop is the last resort, and slow
        _warned.add(key)
        log.warning("moe.expert_impl=auto: one GEMM per expert on %s %s (%s)", device.type, dtype, why)
    return LOOP
