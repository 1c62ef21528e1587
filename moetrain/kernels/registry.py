"""The one seam between the model and its kernels: an implementation of the expert FFN, looked up by
``moe.expert_impl``, device and dtype.

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.

``auto`` is ATen: ``torch._grouped_mm`` where it supports the device and dtype (fp32/bf16 on CPU, bf16 on
sm90+ CUDA; rows that are not 16-byte aligned go through the loop), else one GEMM per expert. ``grouped_mm``
and ``loop`` force one of the two.
"""

from __future__ import annotations

import torch

from moetrain.config.choices import ExpertImpl
from moetrain.kernels import aten
from moetrain.kernels.kernel import ExpertKernel

GROUPED_MM = ExpertKernel("grouped_mm", aten.swiglu_with(aten.grouped_gemm))
LOOP = ExpertKernel("loop", aten.swiglu_with(aten.loop_gemm))
AUTO_GROUPED_MM = ExpertKernel("grouped_mm", aten.swiglu_with(aten.aligned_gemm))


def expert_kernel(impl: ExpertImpl | str, device: torch.device, dtype: torch.dtype) -> ExpertKernel:
    """The implementation ``moe.expert_impl=impl`` runs on tensors of ``device`` and ``dtype``."""
    impl = ExpertImpl(impl)
    if impl is ExpertImpl.grouped_mm:
        return GROUPED_MM
    if impl is ExpertImpl.loop:
        return LOOP
    return AUTO_GROUPED_MM if aten.grouped_mm_runs_on(torch.device(device), dtype) else LOOP
