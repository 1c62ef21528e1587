"""Capacity enforcement and the sort-based permutation of token->expert assignments.

Shape legend: T tokens, D model dim, E experts, K experts per token, A kept assignments (<= T*K).

An *assignment* is one (token, k-th choice) pair; flat assignment index ``a = t * K + k``. Assignments are
sorted by expert so every expert sees one contiguous slice (what grouped GEMM wants); the combine step
scatters the gate-weighted expert outputs back onto their tokens. A dropped assignment contributes zero:
the token keeps only its residual stream for that choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int = 4
) -> int | None:
    """Slots per expert: ``max(min_capacity, ceil(capacity_factor * T * K / E))``; ``None`` when dropless.

    One definition for every k (DeepSpeed's top-1 and top-2 gates differ; see docs/moe.md).
    """
    if capacity_factor is None:
        return None
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor, num_experts: int, capacity: int, policy: str
) -> torch.Tensor:
    """Which assignments fit in their expert's ``capacity`` slots, as a bool mask of shape (T, K).

    ``probs``: each expert keeps its highest-gate assignments (ties: token order).
    ``position``: each expert keeps assignments in order of choice rank, then token order — all first
    choices before any second choice (GShard/DeepSpeed style).
    """
    T, K = expert_idx_TK.shape
    flat_expert_A = expert_idx_TK.reshape(-1)
    # Priority order: lower position in `priority` = served first.
    rank_major = torch.arange(T * K, device=flat_expert_A.device).view(T, K).t().reshape(-1)  # k-major order
    if policy == "position":
        priority = rank_major
    elif policy == "probs":
        # stable sort of the k-major order by descending gate: ties broken by choice rank, then token
        gates_in_order = gates_TK.reshape(-1)[rank_major]
        priority = rank_major[torch.sort(gates_in_order, descending=True, stable=True).indices]
    else:
        raise ValueError(f"moe.drop_policy={policy} is not supported; allowed: probs, position")
    by_expert = priority[torch.sort(flat_expert_A[priority], stable=True).indices]
    counts_E = torch.bincount(flat_expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot = torch.arange(T * K, device=flat_expert_A.device) - starts_E[flat_expert_A[by_expert]]
    keep_A = torch.empty(T * K, dtype=torch.bool, device=flat_expert_A.device)
    keep_A[by_expert] = slot < capacity
    return keep_A.view(T, K)


@dataclass
class Permutation:
    assignment_A: torch.Tensor  # flat (t * K + k) index of each kept assignment, sorted by expert
    token_A: torch.Tensor  # the token each sorted assignment reads from and writes to
    tokens_per_expert_E: torch.Tensor  # int64 counts of kept assignments, the grouped GEMM's group sizes


def permute(expert_idx_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None) -> Permutation:
    """Sort the (kept) assignments by expert, stable in token order."""
    K = expert_idx_TK.shape[1]
    flat_expert = expert_idx_TK.reshape(-1)
    if keep_TK is None:
        assignment_A = torch.sort(flat_expert, stable=True).indices
    else:
        kept = torch.nonzero(keep_TK.reshape(-1)).squeeze(1)
        assignment_A = kept[torch.sort(flat_expert[kept], stable=True).indices]
    tokens_per_expert_E = torch.bincount(flat_expert[assignment_A], minlength=num_experts)
    return Permutation(assignment_A, assignment_A // K, tokens_per_expert_E)


def combine(y_AD: torch.Tensor, perm: Permutation, gates_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Gate-weighted sum of expert outputs back onto their tokens: ``out[t] = sum_k gate[t,k] * y[t,k]``.

    The weighting runs in fp32 (gates come from the fp32 router) and the result is cast to ``y``'s dtype.
    """
    gate_A = gates_TK.reshape(-1)[perm.assignment_A]
    weighted_AD = y_AD.float() * gate_A.unsqueeze(-1)
    out_TD = torch.zeros(num_tokens, y_AD.shape[-1], dtype=torch.float32, device=y_AD.device)
    out_TD.index_add_(0, perm.token_A, weighted_AD)
    return out_TD.to(y_AD.dtype)
