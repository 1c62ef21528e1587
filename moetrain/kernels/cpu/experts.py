"""The CPU expert kernel (``moe.expert_impl=cpu_kernel``, opt-in and frozen): ``csrc/swiglu_experts.cpp`` built
on first use.

Built with ``torch.utils.cpp_extension.load`` (the way DeepSpeed builds its ops) into
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); concurrent ranks wait on the build's
lock file. Where it does not build (no C++ compiler), a run that asks for it stops at start with the reason.

Two entries: ``FusedSwiGLUExperts`` (rows already sorted by expert; the expert-parallel path) and
``FusedMoEExperts`` (tokens in, tokens out: gather, experts and gate-weighted combine in one kernel call).

On a CPU with AVX-512 the fp32 GEMMs run on the kernel's own GEMM (``csrc/f32_gemm.cpp``; why in its header),
elsewhere and for bfloat16 / float64 on ATen's.

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / n for n in ("swiglu_experts.cpp", "f32_gemm.cpp", "f32_swiglu.cpp", "softmax_router.cpp")]


def use_environment_ninja() -> None:
    """Put this Python environment's ``bin`` first on PATH when it has a ``ninja`` (pip installs one with
    DeepSpeed's requirements). Why: ninja's build log hashes commands differently across versions (the pip
    1.13 and a system 1.11 here), so an activated shell and a ``make`` target would each see the other's build
    as stale and rebuild this kernel and DeepSpeed's ops (~25 s each) every time they alternate."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=bin_dir) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


@functools.cache
def _build() -> ModuleType:
    from torch.utils.cpp_extension import get_default_build_root, load

    use_environment_ninja()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    # the build runs under a lock file there; a build killed midway leaves it behind and the next one waits
    log.info("loading the CPU expert kernel (built once, ~35 s) from %s; a stale 'lock' there blocks this", root)
    return load(
        name="moetrain_swiglu_experts",
        sources=[str(s) for s in SOURCES],
        # at::parallel_for is OpenMP code inlined from ATen's headers; no FMA contraction, so the fused combine
        # rounds exactly as the unfused multiply-then-add does
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch already loaded (same soname)
        verbose=False,
    )


@functools.cache
def fused_kernel_available() -> bool:
    """Whether the kernel builds (or is built) here; the reason is logged once when it does not."""
    return build_error() is None


@functools.cache
def build_error() -> str | None:
    """Why the kernel does not build here (None: it does)."""
    try:
        _build()
        return None
    except Exception as err:  # noqa: BLE001 - any build failure: the run is told why at start
        log.warning("the CPU expert kernel did not build: %s", err)
        return str(err).splitlines()[0] if str(err) else type(err).__name__


def f32_gemm_active() -> bool:
    """Whether the kernel's fp32 GEMMs run on its own AVX-512 GEMM (``csrc/f32_gemm.cpp``) rather than ATen's
    (MKL): where the CPU has AVX-512 and ``aten_gemms`` is not in force."""
    return _build().f32_gemm_active()


@contextlib.contextmanager
def aten_gemms() -> Iterator[None]:
    """Within the block the kernel runs its GEMMs on ATen's (MKL), as on a CPU without AVX-512: for tests and
    the benchmark, which compare the two."""
    kernel = _build()
    before = kernel.set_f32_gemm(False)
    try:
        yield
    finally:
        kernel.set_f32_gemm(before)


def fused_supported(x_SD: torch.Tensor) -> bool:
    return x_SD.device.type == "cpu" and x_SD.dtype in (torch.float32, torch.bfloat16, torch.float64)


def kernel_linear_supported(x_TD: torch.Tensor, w_ED: torch.Tensor) -> bool:
    """Whether ``x_TD @ w_ED.T`` can run on the kernel's own GEMM: fp32 CPU matrices with contiguous rows, and the
    kernel built here with its AVX-512 GEMM active."""
    return (
        fused_supported(x_TD)
        and x_TD.dtype == w_ED.dtype == torch.float32
        and x_TD.dim() == w_ED.dim() == 2
        and x_TD.stride(-1) == 1
        and w_ED.stride(-1) == 1
        and fused_kernel_available()
        and f32_gemm_active()
    )


class KernelLinear(torch.autograd.Function):
    """``out_TE = x_TD @ w_ED.T`` and its two gradients on the kernel's own fp32 GEMM (the router's logits).

    Why: these shapes have a long and a short side (T x D times D x E, E = 8-64), where MKL was measured slow
    on the development machine (docs/benchmarks.md, "CPU process settings"). The GEMM reads B by contiguous
    rows, so the forward transposes the small weight (E x D) once."""

    @staticmethod
    def forward(ctx, x_TD, w_ED):
        kernel = _build()
        out_TE = x_TD.new_empty(x_TD.shape[0], w_ED.shape[0])
        kernel.f32_mm(out_TE, x_TD, w_ED.t().contiguous(), False, False)
        ctx.save_for_backward(x_TD, w_ED)
        return out_TE

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_TE):
        x_TD, w_ED = ctx.saved_tensors
        kernel = _build()
        dx_TD = dw_ED = None
        if ctx.needs_input_grad[0]:  # dx = dout w: the GEMM reads dout by broadcasts (any strides)
            dx_TD = x_TD.new_empty(x_TD.shape)
            kernel.f32_mm(dx_TD, dout_TE, w_ED, False, False)
        if ctx.needs_input_grad[1]:  # dw = dout^T x
            dw_ED = w_ED.new_empty(w_ED.shape)
            kernel.f32_mm(dw_ED, dout_TE.t(), x_TD, False, False)
        return dx_TD, dw_ED


def linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """``F.linear(x_TD, w_ED)`` (no bias), on the kernel's own GEMM where ``kernel_linear_supported``."""
    if kernel_linear_supported(x_TD, w_ED):
        return KernelLinear.apply(x_TD, w_ED)
    return torch.nn.functional.linear(x_TD, w_ED)


class FusedSwiGLUExperts(torch.autograd.Function):
    """``y = (silu(x w1) * (x w3)) w2`` per expert; saves ``x``, ``h1 = x w1``, ``h3 = x w3`` for the backward,
    which skips the gradients nobody needs (frozen experts, inputs that need no gradient)."""

    @staticmethod
    def forward(ctx, x_SD, w1_EDF, w3_EDF, w2_EFD, tokens_per_expert_E):
        counts = tokens_per_expert_E.tolist()
        x_SD = x_SD.contiguous()
        y_SD, h1_SF, h3_SF = _build().swiglu_forward(x_SD, w1_EDF, w3_EDF, w2_EFD, counts)
        # x only feeds the w1 / w3 gradients: frozen experts (a LoRA stage) need not keep it
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(x_SD if keep_x else None, w1_EDF, w3_EDF, w2_EFD, h1_SF, h3_SF)
        ctx.counts = counts
        return y_SD

    @staticmethod
    @once_differentiable  # the backward runs outside autograd: no double backward through it
    def backward(ctx, dy_SD):
        x_SD, w1_EDF, w3_EDF, w2_EFD, h1_SF, h3_SF = ctx.saved_tensors
        if x_SD is None:  # not read by the kernel when neither w1 nor w3 needs a gradient
            x_SD = h1_SF.new_empty(h1_SF.shape[0], w1_EDF.shape[1])
        dx, dw1, dw3, dw2 = _build().swiglu_backward(
            dy_SD.contiguous(), x_SD, w1_EDF, w3_EDF, w2_EFD, h1_SF, h3_SF, ctx.counts, *ctx.needs_input_grad[:4]
        )
        return dx, dw1, dw3, dw2, None  # the kernel returns None for every gradient not asked for


class FusedMoEExperts(torch.autograd.Function):
    """The token-level expert FFN of one rank: ``out[t] = sum_k gates[t, k] * SwiGLU_{e(t,k)}(x[t])`` over the
    kept assignments. Each expert gathers its rows of ``x`` and the combine runs per token on the kernel's
    output, so the (A, D) gather, the gate multiply and the scatter-add of the unfused path (and their
    backward passes) never run as separate passes. Same arithmetic as ``dispatch.combine`` (which sums a token's
    terms in expert order, this in k order: the same result for k <= 2).

    Inputs: ``gates_TK`` in float32 (float64 with float64 ``x``), ``assignment_A`` (flat ``t * K + k`` of each
    kept assignment, sorted by expert) and ``tokens_per_expert_E``, as in ``dispatch.Permutation``. Returns
    ``(out_TD, y_AD)``; ``y_AD`` (the experts' unweighted outputs in sorted order, no gradient) is what the
    routing statistics measure."""

    @staticmethod
    def forward(ctx, x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, assignment_A, tokens_per_expert_E):
        counts = tokens_per_expert_E.tolist()
        x_TD, gates_TK = x_TD.contiguous(), gates_TK.contiguous()
        out_TD, y_AD, h1_AF, h3_AF = _build().moe_forward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, assignment_A, counts)
        ctx.save_for_backward(x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, h1_AF, h3_AF, y_AD, assignment_A)
        ctx.counts = counts
        ctx.mark_non_differentiable(y_AD)
        return out_TD, y_AD

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_TD, _dy_AD):
        x_TD, gates_TK, w1_EDF, w3_EDF, w2_EFD, h1_AF, h3_AF, y_AD, assignment_A = ctx.saved_tensors
        dx, dgates, dw1, dw3, dw2 = _build().moe_backward(
            dout_TD.contiguous(),
            x_TD,
            gates_TK,
            w1_EDF,
            w3_EDF,
            w2_EFD,
            h1_AF,
            h3_AF,
            y_AD,
            assignment_A,
            ctx.counts,
            *ctx.needs_input_grad[:5],
        )
        return dx, dgates, dw1, dw3, dw2, None, None
