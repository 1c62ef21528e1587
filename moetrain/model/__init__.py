"""Layer 4, model: the device-agnostic MoE transformer. Router, dispatch (capacity, drop policies,
permutation), experts, expert-parallel exchange, MoE layer and decoder blocks. Kernels come from the registry
(``moetrain.kernels``), a backend's MoE layer from the constructor passed to :func:`build_model`.

It may import ``config``, ``runtime`` and ``kernels``.
"""

from moetrain.model.moe import MoELayer, MoEStats
from moetrain.model.transformer import ModelOutput, MoETransformer, build_model

__all__ = ["MoELayer", "MoEStats", "MoETransformer", "ModelOutput", "build_model"]
