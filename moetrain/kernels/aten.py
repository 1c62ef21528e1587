"""Expert FFNs on ATen ops: ``torch._grouped_mm`` (one grouped GEMM per weight) or a loop of one GEMM per expert.

Shape legend: S rows sorted by expert, D model dim, F expert hidden dim, E experts.

``torch._grouped_mm`` is tuned by the vendor for each CPU and GPU and needs no compiler: it is what
``moe.expert_impl=auto`` picks wherever it supports the device and dtype. The loop runs over ``W.unbind(0)``:
indexing ``W[e]`` inside a Python loop would make autograd build a full-size zero gradient of W per expert;
``unbind`` gives each slice its own gradient view.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` supports this device and dtype: fp32/bf16 on CPU, bf16 on sm90+ CUDA."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return False


def _aligned(x_SD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    """``_grouped_mm`` needs 16-byte aligned row strides for both operands."""
    return (x_SD.shape[-1] * x_SD.element_size()) % 16 == 0 and (w_EDF.shape[-1] * w_EDF.element_size()) % 16 == 0


class GroupSizes:
    """Rows per expert of a grouped product: on the device for ``torch._grouped_mm``, read on the host (one sync)
    only when a per-expert loop needs them, and then once for all three products of a SwiGLU."""

    def __init__(self, tokens_per_expert_E: torch.Tensor) -> None:
        self.device_E = tokens_per_expert_E
        self._host: list[int] | None = None

    @property
    def offsets(self) -> torch.Tensor:
        """Each group's end row, int32 on the device: what ``torch._grouped_mm`` and its drop-ins take."""
        return torch.cumsum(self.device_E, 0, dtype=torch.int32)

    @property
    def host(self) -> list[int]:
        if self._host is None:
            self._host = self.device_E.tolist()
        return self._host


def grouped_gemm(x_SD: torch.Tensor, w_EDF: torch.Tensor, sizes: GroupSizes) -> torch.Tensor:
    """``out[s] = x[s] @ w[e(s)]`` on ``torch._grouped_mm``; rows grouped by expert, ``sizes`` each."""
    return torch._grouped_mm(x_SD.contiguous(), w_EDF, offs=sizes.offsets)


def loop_gemm(x_SD: torch.Tensor, w_EDF: torch.Tensor, sizes: GroupSizes) -> torch.Tensor:
    """The same product with one GEMM per expert that has rows."""
    chunks = [x_e @ w_e for x_e, w_e in zip(torch.split(x_SD, sizes.host), w_EDF.unbind(0)) if x_e.shape[0]]
    if not chunks:
        return x_SD.new_zeros(0, w_EDF.shape[-1])
    return torch.cat(chunks)


def aligned_gemm(x_SD: torch.Tensor, w_EDF: torch.Tensor, sizes: GroupSizes) -> torch.Tensor:
    """``grouped_gemm`` where both operands' rows are 16-byte aligned, else ``loop_gemm`` (what auto runs)."""
    gemm = grouped_gemm if _aligned(x_SD, w_EDF) else loop_gemm
    return gemm(x_SD, w_EDF, sizes)


def swiglu_with(gemm):
    """SwiGLU experts ``w2(silu(x w1) * (x w3))`` on the grouped product ``gemm``."""

    def swiglu(x_SD, w1_EDF, w3_EDF, w2_EFD, tokens_per_expert_E):
        sizes = GroupSizes(tokens_per_expert_E)
        h_SF = F.silu(gemm(x_SD, w1_EDF, sizes)) * gemm(x_SD, w3_EDF, sizes)
        return gemm(h_SF, w2_EFD, sizes)

    return swiglu
