"""The MoE transformer: router, dispatch, experts, MoE layer and decoder blocks."""

from moetrain.model.moe import MoELayer, MoEStats
from moetrain.model.transformer import ModelOutput, MoETransformer, build_model

__all__ = ["MoELayer", "MoEStats", "MoETransformer", "ModelOutput", "build_model"]
