"""The native MoE layer against a naive per-token fp64 loop: outputs, gradients, drops, reroutes, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.moe_reference import assert_close, params64, run_reference

from moetrain.config import MoEConfig
from moetrain.model.dispatch import apply_capacity, expert_capacity
from moetrain.model.moe import MoELayer
from moetrain.model.router import balancing_bias_update

D, F, E, T = 16, 24, 8, 40


def make_layer(top_k=2, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, top_k=top_k, min_capacity=1, **overrides)
    layer = MoELayer(D, F, cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


CASES = [
    (k, score, ren, cap, pol)
    for k in (1, 2, 4)
    for score in ("softmax", "sigmoid")
    for ren in (True, False)
    for cap, pol in ((None, "probs"), (0.5, "probs"), (0.5, "position"), (1.0, "reroute"))
]


@pytest.mark.parametrize(("top_k", "score_func", "renormalize", "capacity_factor", "policy"), CASES)
def test_layer_matches_per_token_reference(top_k, score_func, renormalize, capacity_factor, policy):
    layer = make_layer(
        top_k, score_func=score_func, renormalize=renormalize, capacity_factor=capacity_factor, drop_policy=policy
    )
    torch.manual_seed(1)
    x = torch.randn(2, T // 2, D)
    upstream = torch.randn(2, T // 2, D)
    x_ours = x.clone().requires_grad_(True)
    y, stats = layer(x_ours)
    (y * upstream).sum().backward()

    capacity = expert_capacity(T, E, top_k, capacity_factor, layer.min_capacity)
    p64 = params64(layer)
    x64 = x.double().reshape(T, D).requires_grad_(True)
    y_ref, choices, placed, scores, outputs = run_reference(layer, x64, p64, capacity)
    (y_ref * upstream.double().reshape(T, D)).sum().backward()

    assert_close(y.reshape(T, D).detach(), y_ref.detach(), "output")
    assert_close(x_ours.grad.reshape(T, D), x64.grad, "grad x")
    for name, p in layer.named_parameters():
        assert_close(p.grad, p64[name].grad, f"grad {name}")

    # every metric against the same quantity from the reference
    routed, computed = torch.zeros(E), torch.zeros(E)
    gate_mass, saliency = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for t, row in enumerate(choices):
        for k, (e, gate) in enumerate(row):
            routed[e] += 1
            gate_mass[e] += float(gate.detach())
            if (t, k) in placed:
                computed[placed[(t, k)]] += 1
                saliency[placed[(t, k)]] += float(gate.detach()) * float(outputs[(t, k)].detach().norm())
    rerouted = sum(1 for (t, k), e in placed.items() if e != choices[t][k][0])
    entropy = 0.0
    for s in scores:
        p = torch.stack([v.detach() for v in s])
        p = p / p.sum()
        entropy += float(-(p[p > 0] * p[p > 0].log()).sum())
    assert torch.equal(stats.routed_per_expert_E.float(), routed)
    assert torch.equal(stats.tokens_per_expert_E.float(), computed)
    assert stats.dropped == T * top_k - len(placed)
    assert stats.rerouted == rerouted
    assert_close(stats.gate_mass_E, gate_mass, "gate mass")
    assert_close(stats.saliency_sum_E, saliency, "saliency", tol=1e-4)
    assert math.isclose(float(stats.entropy_sum), entropy, rel_tol=1e-4)
    if capacity_factor is not None:
        assert stats.dropped > 0 or stats.rerouted > 0, "the tiny capacity should bite"
    if policy == "reroute" and top_k < 4:
        assert stats.rerouted > 0


@pytest.mark.parametrize("policy", ["probs", "position", "reroute"])
def test_padded_capacity_mode_equals_sorted_mode(policy):
    # fp64: the two paths sum in different orders, and fp32 rounding would blur a real difference
    a = make_layer(2, capacity_factor=0.75, drop_policy=policy).double()
    b = make_layer(2, capacity_factor=0.75, drop_policy=policy, padded=True).double()
    x = torch.randn(2, 20, D, dtype=torch.float64, requires_grad=True)
    ya, sa = a(x)
    yb, sb = b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    assert sa.dropped == sb.dropped > 0
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(a.experts.w2_EFD.grad, b.experts.w2_EFD.grad, rtol=1e-10, atol=1e-12)


def test_policies_differ_where_they_should():
    """probs keeps a high-gate second choice over a low-gate first choice; position never does; reroute moves
    the overflow to the token's next-best expert."""
    expert_idx = torch.tensor([[1, 0], [0, 1], [0, 2]])
    gates = torch.tensor([[0.5, 0.48], [0.35, 0.3], [0.36, 0.2]])
    selection = torch.tensor([[0.3, 0.5, 0.1, 0.2], [0.5, 0.3, 0.1, 0.05], [0.4, 0.1, 0.3, 0.2]])
    # expert 0 (capacity 2) is offered: t0's 2nd choice (0.48), t1's 1st (0.35), t2's 1st (0.36)
    pos = apply_capacity(expert_idx, gates, selection, capacity=2, policy="position", num_experts=4)
    prob = apply_capacity(expert_idx, gates, selection, capacity=2, policy="probs", num_experts=4)
    rer = apply_capacity(expert_idx, gates, selection, capacity=2, policy="reroute", num_experts=4)
    assert pos.keep_TK.tolist() == [[True, False], [True, True], [True, True]]
    assert prob.keep_TK.tolist() == [[True, True], [False, True], [True, True]]
    # t0's overflowed 2nd choice goes to its best unused expert: 3 (0.2) before 2 (0.1)
    assert rer.keep_TK.all() and rer.expert_idx_TK[0].tolist() == [1, 3]
    assert rer.rerouted_TK.tolist() == [[False, True], [False, False], [False, False]]


def test_reroute_without_the_selection_scores_is_an_error_naming_the_policy():
    expert_idx, gates = torch.tensor([[0, 1], [0, 1]]), torch.full((2, 2), 0.5)
    plan = apply_capacity(expert_idx, gates, None, capacity=1, policy="position", num_experts=3)  # not read here
    assert plan.keep_TK.tolist() == [[True, True], [False, False]]
    with pytest.raises(ValueError, match="moe.drop_policy=reroute needs the router's selection scores"):
        apply_capacity(expert_idx, gates, None, capacity=1, policy="reroute", num_experts=3)


def test_expert_mask_and_selection_bias_match_reference():
    layer = make_layer(2, capacity_factor=0.75, drop_policy="reroute")
    active = torch.tensor([True, False, True, True, False, True, True, True])
    layer.set_expert_mask(active)
    bias = torch.linspace(-0.2, 0.2, E)
    layer.router.bias_E.copy_(bias)
    x = torch.randn(T, D)
    y, stats = layer(x.view(1, T, D))
    assert stats.routed_per_expert_E[~active].sum() == 0 and stats.tokens_per_expert_E[~active].sum() == 0
    p64 = params64(layer)
    capacity = expert_capacity(T, int(active.sum()), 2, 0.75, 1)  # slots are shared among active experts
    y_ref, *_ = run_reference(layer, x.double(), p64, capacity, bias=bias.tolist(), active=active.tolist())
    assert_close(y.view(T, D).detach(), y_ref.detach(), "masked + biased output")
    with pytest.raises(ValueError, match="fewer than moe.top_k=2"):
        layer.set_expert_mask(torch.arange(E) == 0)


def test_reroute_never_uses_a_tokens_own_or_a_masked_expert():
    inf = float("-inf")
    expert_idx = torch.tensor([[0, 1], [0, 1], [0, 2]])
    gates = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    masked = [inf, inf, inf]  # experts 3, 4, 5 are masked
    selection = torch.tensor([[0.5, 0.3, 0.1, *masked], [0.5, 0.3, 0.1, *masked], [0.5, 0.2, 0.3, *masked]])
    # capacity 2: token 2's first choice overflows expert 0; its only alternative (expert 1) is full; expert 2
    # has room but is token 2's own second choice, and 3-5 are masked: the assignment must be dropped
    plan = apply_capacity(expert_idx, gates, selection, capacity=2, policy="reroute", num_experts=6)
    assert plan.keep_TK.tolist() == [[True, True], [True, True], [False, True]]
    assert not plan.rerouted_TK.any()


def test_capacity_and_balance_count_only_active_experts():
    layer = make_layer(1, capacity_factor=1.0)
    layer.set_expert_mask(torch.arange(E) < 4)
    x = torch.randn(1, T, D)
    _, stats = layer(x)
    # 40 tokens over 4 active experts: 10 slots each (not 5, as 8 experts would give)
    assert stats.tokens_per_expert_E[:4].max() <= 10 and stats.dropped == T - int(stats.tokens_per_expert_E.sum())
    uniform = torch.zeros(8, E)
    uniform[:, :4] = 0.25
    from moetrain.model.router import load_balancing_loss

    assert float(load_balancing_loss(uniform, torch.arange(8).remainder(4).unsqueeze(1), 4)) == pytest.approx(1.0)


def test_bias_changes_selection_not_gates():
    layer = make_layer(1, renormalize=False)
    x = torch.randn(T, D)
    before = layer.router(x)
    layer.router.bias_E[3] = 10.0  # expert 3 now wins every selection
    after = layer.router(x)
    assert (after.expert_idx_TK == 3).all()
    torch.testing.assert_close(after.gates_TK[:, 0], before.probs_TE[:, 3])


def test_aux_loss_free_bias_update():
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])
    active = torch.tensor([True, True, True, False])
    # mean over active experts = 6: overloaded expert 0 goes down, underloaded 1 up, masked 3 untouched
    assert balancing_bias_update(load, active, 0.01).tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    layer = make_layer(1, bias_update_rate=0.05)
    layer(torch.randn(1, T, D))
    routed = layer._load_since_step_E.clone()
    layer.after_optimizer_step()
    mean = routed.mean()
    assert layer.router.bias_E.tolist() == pytest.approx((0.05 * torch.sign(mean - routed)).tolist())
    assert not any(n.endswith("bias_E") for n, _ in layer.named_parameters()), "bias must not be trained"


def test_eval_capacity_factor_and_jitter_apply_only_as_configured():
    layer = make_layer(2, capacity_factor=0.25, eval_capacity_factor=None, jitter_eps=0.1)
    x = torch.randn(1, T, D)
    _, train_stats = layer.train()(x)
    assert train_stats.dropped > 0
    layer.eval()
    y1, eval_stats = layer(x)
    y2, _ = layer(x)
    assert eval_stats.dropped == 0 and torch.equal(y1, y2)  # dropless and no jitter in eval
    layer.train()
    torch.manual_seed(5)
    r1 = layer.router(x.view(T, D)).probs_TE
    r2 = layer.router(x.view(T, D)).probs_TE
    assert not torch.equal(r1, r2), "jitter perturbs routing in training"


def test_grouped_mm_and_loop_paths_agree():
    a, b = make_layer(2, expert_impl="grouped_mm"), make_layer(2, expert_impl="loop")
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


def test_router_gets_task_gradient_after_switch_to_top1():
    """With renormalised gates, top-1 would make every gate 1.0 and cut the router off from the LM loss.
    Our top-1 gate is the raw probability p1 (Switch), so the task loss alone still trains the router."""
    layer = make_layer(2, renormalize=True)
    x = torch.randn(2, 16, D)
    target = torch.randn(2, 16, D)

    def task_grad_norm():
        layer.zero_grad()
        y, _ = layer(x)
        ((y - target) ** 2).mean().backward()  # task loss only: no aux, no z
        return float(layer.router.weight_ED.grad.norm())

    assert task_grad_norm() > 1e-3
    layer.top_k = 1
    grad_top1 = task_grad_norm()
    assert grad_top1 > 1e-3
    assert torch.allclose(
        layer.router(x.view(-1, D)).gates_TK[:, 0], layer.router(x.view(-1, D)).probs_TE.max(-1).values
    )
    # the trap it avoids: renormalising a single gate gives exactly 1.0 and no router gradient
    layer.zero_grad()
    routing = layer.router(x.view(-1, D))
    renormed = routing.gates_TK / routing.gates_TK.sum(-1, keepdim=True)
    (renormed * torch.randn_like(renormed)).sum().backward()
    assert float(layer.router.weight_ED.grad.norm()) < 1e-6 * grad_top1
