"""Layer 3, kernels: the implementation registry for the expert FFN and the router's GEMM.

The model asks it for an implementation by ``moe.expert_impl``, device and dtype (:func:`expert_kernel`);
ATen ops (``torch._grouped_mm``, a per-expert loop) live in ``aten``, the opt-in C++ CPU kernel with its
bindings and the CPU process settings in ``cpu/``. It may import ``config`` and ``runtime``.
"""

from moetrain.kernels.kernel import ExpertKernel
from moetrain.kernels.registry import expert_kernel, prepare_process

__all__ = ["ExpertKernel", "expert_kernel", "prepare_process"]
