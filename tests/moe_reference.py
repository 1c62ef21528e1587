"""An independent, deliberately naive MoE reference: one token and one choice at a time, in fp64."""

from __future__ import annotations

import torch


def swiglu(x_D, w1_DF, w3_DF, w2_FD):
    return (torch.nn.functional.silu(x_D @ w1_DF) * (x_D @ w3_DF)) @ w2_FD


def reference_choices(x_TD, router_ED, top_k, renormalize):
    """Per token: the chosen experts (best first) and their gates."""
    choices = []
    for t in range(x_TD.shape[0]):
        probs = torch.softmax(router_ED @ x_TD[t], dim=0)
        order = sorted(range(probs.shape[0]), key=lambda e: -float(probs[e].detach()))[:top_k]
        gates = [probs[e] for e in order]
        if renormalize and top_k > 1:
            total = sum(gates)
            gates = [g / total for g in gates]
        choices.append(list(zip(order, gates)))
    return choices


def reference_kept(choices, num_experts, capacity, policy):
    """The set of (token, k) assignments that fit, by walking the policy's priority order."""
    T, K = len(choices), len(choices[0])
    if capacity is None:
        return {(t, k) for t in range(T) for k in range(K)}
    if policy == "position":
        order = [(t, k) for k in range(K) for t in range(T)]
    else:  # probs: highest gate first; ties by choice rank, then token
        order = sorted(
            ((t, k) for t in range(T) for k in range(K)),
            key=lambda a: (-float(choices[a[0]][a[1]][1].detach()), a[1], a[0]),
        )
    load = [0] * num_experts
    kept = set()
    for t, k in order:
        e = choices[t][k][0]
        if load[e] < capacity:
            load[e] += 1
            kept.add((t, k))
    return kept


def reference_moe(x_TD, router_ED, w1_EDF, w3_EDF, w2_EFD, top_k, renormalize=True, capacity=None, policy="probs"):
    choices = reference_choices(x_TD, router_ED, top_k, renormalize)
    kept = reference_kept(choices, router_ED.shape[0], capacity, policy)
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for k, (e, gate) in enumerate(choices[t]):
            if (t, k) in kept:
                acc = acc + gate * swiglu(x_TD[t], w1_EDF[e], w3_EDF[e], w2_EFD[e])
        rows.append(acc)
    return torch.stack(rows), choices, kept
