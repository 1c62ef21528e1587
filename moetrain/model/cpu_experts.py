"""The CPU expert kernel (``moe.grouped_mm=fused``): ``csrc/swiglu_experts.cpp`` built on first use.

Built with ``torch.utils.cpp_extension.load`` (the way DeepSpeed builds its ops) into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); concurrent ranks wait on the build's
lock file. When no C++ compiler is at hand ``moe.grouped_mm=auto`` warns once and uses ``torch._grouped_mm``;
an explicit ``moe.grouped_mm=fused`` fails instead.

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "swiglu_experts.cpp"


@functools.cache
def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(
        name="moetrain_swiglu_experts",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-fopenmp"],  # at::parallel_for is OpenMP code inlined from ATen's headers
        extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch already loaded (same soname)
        verbose=False,
    )


@functools.cache
def fused_kernel_available() -> bool:
    """Whether the kernel builds (or is built) here; the reason is logged once when it does not."""
    try:
        _build()
        return True
    except Exception as err:  # noqa: BLE001 - any build failure means: use the ATen path
        log.warning("moe.grouped_mm=auto: the CPU expert kernel did not build (%s); using torch._grouped_mm", err)
        return False


def fused_supported(x_SD: torch.Tensor) -> bool:
    return x_SD.device.type == "cpu" and x_SD.dtype in (torch.float32, torch.bfloat16, torch.float64)


class FusedSwiGLUExperts(torch.autograd.Function):
    """``y = (silu(x w1) * (x w3)) w2`` per expert; saves ``x``, ``h1 = x w1``, ``h3 = x w3`` for the backward,
    which skips the gradients nobody needs (frozen experts, inputs that need no gradient)."""

    @staticmethod
    def forward(ctx, x_SD, w1_EDF, w3_EDF, w2_EFD, tokens_per_expert_E):
        counts = tokens_per_expert_E.tolist()
        y_SD, h1_SF, h3_SF = _build().swiglu_forward(x_SD.contiguous(), w1_EDF, w3_EDF, w2_EFD, counts)
        ctx.save_for_backward(x_SD, w1_EDF, w3_EDF, w2_EFD, h1_SF, h3_SF)
        ctx.counts = counts
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        x_SD, w1_EDF, w3_EDF, w2_EFD, h1_SF, h3_SF = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        dx, dw1, dw3, dw2 = _build().swiglu_backward(
            dy_SD.contiguous(), x_SD.contiguous(), w1_EDF, w3_EDF, w2_EFD, h1_SF, h3_SF, ctx.counts, *need
        )
        return (
            dx if need[0] else None,
            dw1 if need[1] else None,
            dw3 if need[2] else None,
            dw2 if need[3] else None,
            None,
        )
