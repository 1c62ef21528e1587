"""The native MoE layer against a naive per-token fp64 loop: outputs, gradients, drops and counts."""

from __future__ import annotations

import pytest
import torch
from moe_reference import reference_moe

from moetrain.model.dispatch import capacity_keep_mask, expert_capacity
from moetrain.model.moe import MoELayer

D, F, E, T = 16, 24, 8, 40


def make_layer(top_k, capacity_factor=None, policy="probs", renormalize=True, impl="auto", seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(
        D, F, E, top_k, capacity_factor, policy, min_capacity=1, renormalize=renormalize, grouped_mm_impl=impl
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def run_both(layer, top_k, capacity, policy, renormalize):
    torch.manual_seed(1)
    x = torch.randn(2, T // 2, D)
    upstream = torch.randn(2, T // 2, D)

    x_ours = x.clone().requires_grad_(True)
    y, stats = layer(x_ours)
    (y * upstream).sum().backward()

    params64 = {n: p.detach().double().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x64 = x.double().reshape(T, D).requires_grad_(True)
    y_ref, choices, kept = reference_moe(
        x64,
        params64["router.weight_ED"],
        params64["experts.w1_EDF"],
        params64["experts.w3_EDF"],
        params64["experts.w2_EFD"],
        top_k,
        renormalize,
        capacity,
        policy,
    )
    (y_ref * upstream.double().reshape(T, D)).sum().backward()
    return x_ours, y, stats, x64, y_ref, params64, choices, kept


def assert_close(ours, ref, what):
    scale = ref.abs().max().clamp_min(1.0)
    err = (ours.double() - ref).abs().max() / scale
    assert err < 2e-5, f"{what}: max relative error {err:.2e}"


CASES = [
    (k, cap, pol, ren)
    for k in (1, 2, 4)
    for ren in (True, False)
    for cap, pol in ((None, "probs"), (0.5, "probs"), (0.5, "position"))
]


@pytest.mark.parametrize(("top_k", "capacity_factor", "policy", "renormalize"), CASES)
def test_outputs_and_gradients_match_per_token_reference(top_k, capacity_factor, policy, renormalize):
    layer = make_layer(top_k, capacity_factor, policy, renormalize)
    capacity = expert_capacity(T, E, top_k, capacity_factor, layer.min_capacity)
    x_ours, y, stats, x64, y_ref, p64, choices, kept = run_both(layer, top_k, capacity, policy, renormalize)

    assert_close(y.reshape(T, D), y_ref.detach(), "output")
    assert_close(x_ours.grad.reshape(T, D), x64.grad, "grad x")
    for name, p in layer.named_parameters():
        assert_close(p.grad, p64[name].grad, f"grad {name}")

    # counts: before capacity = every choice; after = the reference's kept set
    routed = torch.zeros(E, dtype=torch.long)
    computed = torch.zeros(E, dtype=torch.long)
    for t, row in enumerate(choices):
        for k, (e, _) in enumerate(row):
            routed[e] += 1
            computed[e] += int((t, k) in kept)
    assert torch.equal(stats.routed_per_expert_E, routed)
    assert torch.equal(stats.tokens_per_expert_E, computed)
    assert stats.dropped == T * top_k - len(kept)
    if capacity_factor is not None:
        assert stats.dropped > 0, "the tiny capacity should drop something"


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_exact_dropped_set_per_policy(policy, top_k):
    layer = make_layer(top_k, 0.5, policy)
    torch.manual_seed(3)
    x = torch.randn(T, D)
    routing = layer.router(x)
    capacity = expert_capacity(T, E, top_k, 0.5, 1)
    keep = capacity_keep_mask(routing.expert_idx_TK, routing.gates_TK, E, capacity, policy)
    _, choices, kept = reference_moe(
        x.double(),
        layer.router.weight_ED.detach().double(),
        *(w.detach().double() for w in (layer.experts.w1_EDF, layer.experts.w3_EDF, layer.experts.w2_EFD)),
        top_k,
        True,
        capacity,
        policy,
    )
    ours = {(t, k) for t, k in torch.nonzero(keep).tolist()}
    assert ours == kept
    # the expert choices themselves agree with the reference
    assert [[e for e, _ in row] for row in choices] == routing.expert_idx_TK.tolist()


def test_policies_differ_where_they_should():
    """probs keeps high-gate second choices over low-gate first choices; position never does."""
    expert_idx = torch.tensor([[1, 0], [0, 1], [0, 2]])
    gates = torch.tensor([[0.5, 0.48], [0.35, 0.3], [0.36, 0.2]])
    # expert 0 (capacity 2) is offered: t0's 2nd choice (0.48), t1's 1st (0.35), t2's 1st (0.36)
    pos = capacity_keep_mask(expert_idx, gates, 3, capacity=2, policy="position")
    prob = capacity_keep_mask(expert_idx, gates, 3, capacity=2, policy="probs")
    assert pos.tolist() == [[True, False], [True, True], [True, True]]
    assert prob.tolist() == [[True, True], [False, True], [True, True]]


def test_grouped_mm_and_loop_paths_agree():
    a, b = make_layer(2, impl="grouped"), make_layer(2, impl="loop")
    x = torch.randn(3, 11, D, requires_grad=True)
    ya, _ = a(x)
    yb, _ = b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(a.experts.w1_EDF.grad, b.experts.w1_EDF.grad, rtol=1e-5, atol=1e-6)


def test_top_k_switch_at_run_time_equals_a_layer_built_with_that_k():
    switched = make_layer(2)
    built = make_layer(1)
    built.load_state_dict(switched.state_dict())
    switched.top_k = 1
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(switched(x)[0], built(x)[0])
    with pytest.raises(ValueError, match="moe.top_k=9"):
        switched.top_k = 9


def test_empty_experts_and_bf16_run():
    layer = make_layer(1).to(torch.bfloat16)
    x = torch.randn(1, 3, D, dtype=torch.bfloat16, requires_grad=True)  # 3 tokens: most experts get none
    y, stats = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and int(stats.tokens_per_expert_E.sum()) == 3
