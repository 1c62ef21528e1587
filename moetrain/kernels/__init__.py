"""Layer 3, kernels: the one seam between the model and its expert GEMMs.

The model asks it for an implementation of the expert FFN by ``moe.expert_impl``, device and dtype
(:func:`expert_kernel`); the implementations are ATen ops (``torch._grouped_mm``, a per-expert loop) in
``aten``. It may import ``config`` and ``runtime``.
"""

from moetrain.kernels.kernel import ExpertKernel
from moetrain.kernels.registry import expert_kernel

__all__ = ["ExpertKernel", "expert_kernel"]
