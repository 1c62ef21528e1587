"""An independent, deliberately naive MoE reference: one token and one choice at a time, in fp64."""

from __future__ import annotations

import torch


def swiglu(x_D, w1_DF, w3_DF, w2_FD):
    return (torch.nn.functional.silu(x_D @ w1_DF) * (x_D @ w3_DF)) @ w2_FD


def token_scores(x_D, router_ED, score_func, active):
    logits = router_ED @ x_D
    scores = []
    if score_func == "softmax":
        z = sum(torch.exp(logits[e]) for e in range(len(active)) if active[e])
        for e in range(len(active)):
            scores.append(torch.exp(logits[e]) / z if active[e] else logits[e] * 0)
    else:
        for e in range(len(active)):
            scores.append(torch.sigmoid(logits[e]) if active[e] else logits[e] * 0)
    return logits, scores


def reference_choices(x_TD, router_ED, top_k, renormalize=True, score_func="softmax", bias=None, active=None):
    """Per token: [(expert, gate)] best first, the selection ranking of every active expert, and scores."""
    E = router_ED.shape[0]
    active = active or [True] * E
    bias = bias or [0.0] * E
    choices, rankings, all_scores = [], [], []
    for t in range(x_TD.shape[0]):
        _, scores = token_scores(x_TD[t], router_ED, score_func, active)
        ranking = sorted((e for e in range(E) if active[e]), key=lambda e: -(float(scores[e].detach()) + bias[e]))
        chosen = ranking[:top_k]
        gates = [scores[e] for e in chosen]
        if renormalize and top_k > 1:
            total = sum(gates)
            gates = [g / total for g in gates]
        choices.append(list(zip(chosen, gates)))
        rankings.append(ranking)
        all_scores.append(scores)
    return choices, rankings, all_scores


def reference_placement(choices, rankings, num_experts, capacity, policy):
    """{(token, k): expert that computes it} for the assignments that fit, walking the policy's order."""
    T, K = len(choices), len(choices[0])
    if capacity is None:
        return {(t, k): choices[t][k][0] for t in range(T) for k in range(K)}
    if policy == "probs":
        order = sorted(
            ((t, k) for t in range(T) for k in range(K)),
            key=lambda a: (-float(choices[a[0]][a[1]][1].detach()), a[1], a[0]),
        )
    else:  # position, and the first pass of reroute
        order = [(t, k) for k in range(K) for t in range(T)]
    load = [0] * num_experts
    placed = {}
    for t, k in order:
        e = choices[t][k][0]
        if load[e] < capacity:
            load[e] += 1
            placed[(t, k)] = e
    if policy == "reroute":
        pending = sorted((a for a in order if a not in placed), key=lambda a: (a[1], a[0]))
        alternatives = {t: rankings[t][K:] for t in range(T)}
        for r in range(num_experts - K):
            proposed = set()
            for t, k in list(pending):
                if r >= len(alternatives[t]) or t in proposed:
                    continue
                proposed.add(t)
                e = alternatives[t][r]
                if load[e] < capacity:
                    load[e] += 1
                    placed[(t, k)] = e
                    pending.remove((t, k))
    return placed


def reference_moe(
    x_TD,
    router_ED,
    w1_EDF,
    w3_EDF,
    w2_EFD,
    top_k,
    renormalize=True,
    capacity=None,
    policy="probs",
    score_func="softmax",
    bias=None,
    active=None,
):
    choices, rankings, scores = reference_choices(x_TD, router_ED, top_k, renormalize, score_func, bias, active)
    placed = reference_placement(choices, rankings, router_ED.shape[0], capacity, policy)
    gates = [[gate for _, gate in token_choices] for token_choices in choices]
    out, outputs = reference_combine(x_TD, gates, placed, w1_EDF, w3_EDF, w2_EFD)
    return out, choices, placed, scores, outputs


def reference_combine(x_TD, gates, placed, w1_EDF, w3_EDF, w2_EFD):
    """One token at a time: ``out[t] = sum over placed (t, k) of gates[t][k] * SwiGLU_e(x[t])`` with
    ``e = placed[(t, k)]``; unplaced (dropped) assignments add nothing. Returns (out, {(t, k): y})."""
    rows, outputs = [], {}
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for k in range(len(gates[t])):
            if (t, k) in placed:
                e = placed[(t, k)]
                y = swiglu(x_TD[t], w1_EDF[e], w3_EDF[e], w2_EFD[e])
                outputs[(t, k)] = y
                acc = acc + gates[t][k] * y
        rows.append(acc)
    return torch.stack(rows), outputs


# ---------------------------------------------------------------- an MoE layer's parameters through the reference
def params64(layer):
    """The layer's parameters as float64 CPU leaves (wherever and in whatever dtype the layer is)."""
    return {n: p.detach().double().cpu().clone().requires_grad_(True) for n, p in layer.named_parameters()}


def run_reference(layer, x_TD, p64, capacity, **kw):
    """``reference_moe`` with the layer's routing settings and ``params64(layer)``'s weights."""
    return reference_moe(
        x_TD,
        p64["router.weight_ED"],
        p64["experts.w1_EDF"],
        p64["experts.w3_EDF"],
        p64["experts.w2_EFD"],
        layer.top_k,
        layer.router.renormalize,
        capacity,
        layer.drop_policy,
        layer.router.score_func,
        **kw,
    )


def assert_close(ours, ref, what, tol=2e-5):
    """Max error relative to the reference's largest entry (at least 1), below ``tol``; ``ours`` on any device."""
    ref = torch.as_tensor(ref, dtype=torch.float64)
    scale = ref.abs().max().clamp_min(1.0)
    err = (torch.as_tensor(ours).detach().double().cpu() - ref).abs().max() / scale
    assert err < tol, f"{what}: max relative error {err:.2e}"
