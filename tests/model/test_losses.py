"""Aux and z losses against hand computation."""

from __future__ import annotations

import math

import torch

from moetrain.model.router import load_balancing_loss, router_z_loss


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    idx = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])  # counts: e0=3, e1=3, e2=2 over 8 assignments
    f = [3 / 8, 3 / 8, 2 / 8]
    P = [(0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.6 + 0.25 + 0.2) / 4, (0.1 + 0.3 + 0.25 + 0.6) / 4]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, P))
    assert math.isclose(float(load_balancing_loss(probs, idx, 3)), expected, rel_tol=1e-6)


def test_load_balancing_loss_extremes():
    E, T = 4, 8
    uniform = torch.full((T, E), 1 / E)
    balanced_idx = torch.arange(T).remainder(E).unsqueeze(1)
    assert math.isclose(float(load_balancing_loss(uniform, balanced_idx, E)), 1.0, rel_tol=1e-6)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0
    assert math.isclose(float(load_balancing_loss(collapsed, torch.zeros(T, 1, dtype=torch.long), E)), E)


def test_load_balancing_gradient_flows_through_probs_only():
    logits = torch.randn(6, 4, requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    load_balancing_loss(probs, idx, 4).backward()
    counts = torch.bincount(idx.flatten(), minlength=4).float() / 12
    # d/dP_i = E * f_i / T for every token row; chain through softmax by hand
    dP = (4 * counts / 6).expand(6, 4)
    p = probs.detach()
    expected = p * (dP - (dP * p).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.e + math.e**2 + math.e**3), math.log(3.0)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert math.isclose(float(router_z_loss(logits)), expected, rel_tol=1e-6)
