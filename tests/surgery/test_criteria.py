"""Pruning criteria (surgery/criteria.py) from a layer's own statistics against a per-token float64 loop over
the same routing: counts, gate mass, REAP (gate * ||expert output||) and EAN (||expert output||) per expert."""

from __future__ import annotations

import pytest
import torch
from helpers.moe_reference import swiglu

from moetrain.config import MoEConfig
from moetrain.model.moe import MoELayer
from moetrain.surgery import criteria
from moetrain.surgery.pruning import ExpertProfile

D, F, E, T = 16, 24, 6, 40


@pytest.fixture(params=[{}, {"score_func": "sigmoid", "routed_scaling_factor": 2.5}], ids=["softmax", "sigmoid"])
def layer_and_tokens(request):
    torch.manual_seed(0)
    layer = MoELayer(D, F, MoEConfig(num_experts=E, top_k=2, min_capacity=1, **request.param))
    layer.reset_parameters(0.3, 0.3)
    layer.eval()
    return layer, torch.randn(1, T, D)


def per_token_sums(layer: MoELayer, x_TD: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: the router's choices and gates (the family's gate convention), each chosen expert's output
    token by token in float64."""
    with torch.no_grad():
        routing = layer.router(x_TD)
    w1, w3, w2 = (w.detach().double() for w in (layer.experts.w1_EDF, layer.experts.w3_EDF, layer.experts.w2_EFD))
    sums = {k: torch.zeros(E, dtype=torch.float64) for k in ("routed", "mass", "saliency", "norm")}
    for t in range(x_TD.shape[0]):
        for k in range(routing.expert_idx_TK.shape[1]):
            e, g = int(routing.expert_idx_TK[t, k]), float(routing.gates_TK[t, k])
            norm = float(swiglu(x_TD[t].double(), w1[e], w3[e], w2[e]).norm())
            sums["routed"][e] += 1
            sums["mass"][e] += g
            sums["saliency"][e] += g * norm
            sums["norm"][e] += norm
    return sums


def test_criteria_from_layer_stats_equal_the_per_token_loop(layer_and_tokens):
    layer, x = layer_and_tokens
    with torch.no_grad():
        _, stats = layer(x)
    ref = per_token_sums(layer, x.reshape(T, D))
    got = {
        "frequency": criteria.frequency(stats.routed_per_expert_E),
        "gate_mass": criteria.gate_mass(stats.gate_mass_E),
        "reap": criteria.reap(stats.saliency_sum_E, stats.routed_per_expert_E),
        "ean": criteria.ean(stats.output_norm_sum_E, stats.routed_per_expert_E),
    }
    count = ref["routed"].clamp_min(1.0)
    expected = {
        "frequency": ref["routed"],
        "gate_mass": ref["mass"],
        "reap": ref["saliency"] / count,
        "ean": ref["norm"] / count,
    }
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(got["reap"] / got["reap"].sum(), got["ean"] / got["ean"].sum())  # the gate matters


def test_profile_shares_use_the_criteria_and_sum_to_one(layer_and_tokens):
    layer, x = layer_and_tokens
    with torch.no_grad():
        _, s = layer(x)
    profile = ExpertProfile(
        [s.routed_per_expert_E], [s.gate_mass_E], [s.saliency_sum_E], tokens=T, output_norm_sum_E=[s.output_norm_sum_E]
    )
    for name in ("frequency", "gate_mass", "reap", "ean", "random"):
        (share,) = profile.shares(name, seed=3)
        assert float(share.sum()) == pytest.approx(1.0)
    ean = s.output_norm_sum_E.double() / s.routed_per_expert_E.double().clamp_min(1.0)
    torch.testing.assert_close(profile.shares("ean")[0], ean / ean.sum())
    # the names before the papers' names still mean the same criteria
    torch.testing.assert_close(profile.shares("saliency")[0], profile.shares("reap")[0])
    torch.testing.assert_close(profile.shares("gate_weighted")[0], profile.shares("gate_mass")[0])


def test_random_scores_are_seeded_per_layer():
    a, b = criteria.random_scores(8, seed=1, layer=0), criteria.random_scores(8, seed=1, layer=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, criteria.random_scores(8, seed=1, layer=1))
    assert not torch.equal(a, criteria.random_scores(8, seed=2, layer=0))


def test_ean_without_output_norms_is_refused():
    profile = ExpertProfile([torch.ones(4)], [torch.ones(4)], [torch.ones(4)], tokens=4)
    with pytest.raises(ValueError, match="prune.criterion=ean needs the profile's output-norm sums"):
        profile.shares("ean")
