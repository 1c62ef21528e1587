"""Interval routing metrics equal the same quantities computed directly from the layer's forward calls."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import MoEConfig
from moetrain.metrics.routing import RoutingMetrics
from moetrain.model.moe import MoELayer


def test_interval_metrics_from_two_forwards():
    torch.manual_seed(0)
    layer = MoELayer(
        8, 12, MoEConfig(num_experts=4, top_k=2, capacity_factor=0.6, min_capacity=1, drop_policy="reroute")
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    metrics = RoutingMetrics(num_layers=1, num_experts=4)
    calls = [layer(torch.randn(1, n, 8))[1] for n in (10, 14)]
    for s in calls:
        metrics.update([s])
    out = metrics.reduce_and_reset()

    routed = sum(s.routed_per_expert_E for s in calls).double()
    computed = sum(s.tokens_per_expert_E for s in calls).double()
    assert out["moe/layer0/routed_per_expert"] == routed.tolist()
    assert out["moe/layer0/tokens_per_expert"] == computed.tolist()
    assert sum(out["moe/layer0/routed_per_expert"]) == 2 * 24
    dropped = sum(s.dropped for s in calls)
    assert out["moe/layer0/dropped_frac"] == pytest.approx(dropped / 48)
    assert out["moe/dropped_frac"] == pytest.approx(dropped / 48)
    assert out["moe/layer0/rerouted_frac"] == pytest.approx(sum(s.rerouted for s in calls) / 48)
    assert out["moe/layer0/entropy"] == pytest.approx(sum(float(s.entropy_sum) for s in calls) / 24)
    assert out["moe/layer0/gate_mass"] == pytest.approx((sum(s.gate_mass_E for s in calls) / 24).tolist())
    assert sum(out["moe/layer0/gate_mass"]) == pytest.approx(1.0)  # renormalised gates sum to 1 per token
    assert out["moe/layer0/imbalance"] == pytest.approx(float(computed.max() / computed.mean()))
    sal = sum(s.saliency_sum_E for s in calls).double() / computed.clamp_min(1)
    assert out["moe/layer0/saliency"] == pytest.approx(sal.tolist())
    # the interval is reset
    assert metrics.reduce_and_reset()["moe/layer0/tokens_per_expert"] == [0.0] * 4
