"""DeepSpeed's Triton grouped GEMM (``deepspeed.ops.triton_ops.group_gemm_triton``): a drop-in for
``torch._grouped_mm`` on every CUDA GPU Triton supports (sm80/86 included) in fp16, bf16 and fp32, with autograd
and its group offsets read on the device (no host sync). It is what ``auto`` runs on CUDA where
``torch._grouped_mm`` has no fused kernel (any dtype but bf16, or a GPU older than sm90).

DeepSpeed defines the kernels only when a Triton driver is active (``deepspeed/ops/triton_ops/_triton.py``): on a
machine without a GPU they do not exist, even under ``TRITON_INTERPRET=1``.

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch

from moetrain.kernels.aten import GroupSizes


def triton_unavailable() -> str | None:
    """Why DeepSpeed's Triton grouped GEMM cannot run here (None: it can)."""
    try:
        from deepspeed.ops.triton_ops._triton import is_triton_available
    except ImportError as e:  # a DeepSpeed without triton_ops
        return f"deepspeed.ops.triton_ops is missing ({e})"
    if not is_triton_available():
        return "Triton is not installed or no Triton driver (GPU) is active"
    return None


def triton_gemm(x_SD: torch.Tensor, w_EDF: torch.Tensor, sizes: GroupSizes) -> torch.Tensor:
    """``out[s] = x[s] @ w[e(s)]`` with DeepSpeed's Triton grouped GEMM; rows grouped by expert, ``sizes`` each."""
    from deepspeed.ops.triton_ops.group_gemm_triton import group_gemm_triton

    return group_gemm_triton(x_SD.contiguous(), w_EDF.contiguous(), sizes.offsets)
