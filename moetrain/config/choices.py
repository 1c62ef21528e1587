"""The string choices of the schema as Enums: OmegaConf checks them when a recipe is composed, so a bad value
fails there with the allowed values (``Invalid value 'tutel', expected one of [native, deepspeed]``).

Members are named as their values, so recipes and the command line spell them as before. They are ``str``
subclasses: ``cfg.moe.backend == "native"`` and f-strings read as plain strings.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string choice: compares, prints and serialises (JSON) as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class ExpertImpl(Choice):
    """``moe.expert_impl``: how the expert FFN (and the router's logits GEMM) runs (moetrain/kernels)."""

    auto = "auto"  # grouped_mm where device and dtype support it (ATen on CPU; bf16 on sm90+ CUDA), else loop
    cpu_kernel = "cpu_kernel"  # the C++ CPU kernel (moetrain/kernels/cpu), opt-in
    grouped_mm = "grouped_mm"  # torch._grouped_mm
    loop = "loop"  # one GEMM per expert
