"""Routing statistics accumulated over a logging interval and all-reduced across ranks.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import torch

from moetrain.distributed import all_reduce_sum
from moetrain.model.moe import MoEStats


class RoutingMetrics:
    """Per-layer expert token counts (before and after capacity) summed over an interval."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.routed_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.computed_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)

    def update(self, stats: list[MoEStats]) -> None:
        for i, s in enumerate(stats):
            self.routed_LE[i] += s.routed_per_expert_E.detach().to("cpu", torch.float64)
            self.computed_LE[i] += s.tokens_per_expert_E.detach().to("cpu", torch.float64)

    def reduce_and_reset(self) -> dict[str, float | list[float]]:
        """Collective: every rank must call it at the same step. Returns the interval's metrics."""
        both = all_reduce_sum(torch.stack([self.routed_LE, self.computed_LE]))
        routed_LE, computed_LE = both[0], both[1]
        out: dict[str, float | list[float]] = {}
        for i in range(routed_LE.shape[0]):
            counts = computed_LE[i]
            out[f"moe/layer{i}/tokens_per_expert"] = counts.tolist()
            out[f"moe/layer{i}/imbalance"] = float(counts.max() / counts.mean().clamp_min(1e-9))
        total = routed_LE.sum()
        out["moe/dropped_frac"] = float((total - computed_LE.sum()) / total.clamp_min(1.0))
        self.routed_LE.zero_()
        self.computed_LE.zero_()
        return out
