"""Capacity enforcement and the sort-based permutation of token->expert assignments.

Shape legend: T tokens, D model dim, E experts, K experts per token, A kept assignments (<= T*K), C capacity.

An *assignment* is one (token, k-th choice) pair; flat assignment index ``a = t * K + k``. Assignments are
sorted by expert so every expert sees one contiguous slice (what grouped GEMM wants); the combine step
scatters the gate-weighted expert outputs back onto their tokens. A dropped assignment contributes zero:
the token keeps only its residual stream for that choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moetrain.config import DROP_POLICIES


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int = 4
) -> int | None:
    """Slots per expert: ``max(min_capacity, ceil(capacity_factor * T * K / E))``; ``None`` when dropless.

    One definition for every k (DeepSpeed's top-1 and top-2 gates differ; see docs/design.md).
    """
    if capacity_factor is None:
        return None
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_counts(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of ``expert_N`` name each expert, (E,) int64, without a device->host sync: a scatter-add
    into a buffer of fixed size (``torch.bincount`` sizes its output from the data, which syncs on CUDA)."""
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=expert_N.device)
    return counts_E.index_add_(0, expert_N.reshape(-1), torch.ones_like(expert_N.reshape(-1)))


def _accept(
    expert_N: torch.Tensor, priority_N: torch.Tensor, room_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes candidates in priority order while it has room.

    ``priority_N`` lists candidate positions, most urgent first. Returns (accepted, rank within its expert
    in priority order), both indexed like ``expert_N``.
    """
    n, E = expert_N.numel(), room_E.numel()
    by_expert = priority_N[torch.sort(expert_N[priority_N], stable=True).indices]
    counts_E = expert_counts(expert_N, E)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(n, device=expert_N.device) - starts_E[expert_N[by_expert]]
    rank = torch.empty_like(rank_sorted)
    rank[by_expert] = rank_sorted
    return rank < room_E[expert_N], rank


@dataclass
class CapacityPlan:
    expert_idx_TK: torch.Tensor  # the expert each assignment is computed by (after rerouting)
    keep_TK: torch.Tensor  # bool: the assignment fits
    slot_TK: torch.Tensor  # its slot inside the expert's capacity buffer (valid where keep)
    rerouted_TK: torch.Tensor  # bool: kept, but on another expert than the router chose


def _priority(policy: str, gates_TK: torch.Tensor) -> torch.Tensor:
    T, K = gates_TK.shape
    rank_major = torch.arange(T * K, device=gates_TK.device).view(T, K).t().reshape(-1)  # k, then token
    if policy == "probs":
        # highest gate first; ties by choice rank, then token (stable sort of the k-major order)
        return rank_major[torch.sort(gates_TK.reshape(-1)[rank_major], descending=True, stable=True).indices]
    return rank_major


def apply_capacity(
    expert_idx_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    selection_TE: torch.Tensor | None,
    capacity: int,
    policy: str,
    num_experts: int,
) -> CapacityPlan:
    """Decide which assignments fit in ``capacity`` slots per expert.

    ``probs``: each expert keeps its highest-gate assignments (ties: choice rank, then token).
    ``position``: each expert keeps assignments in order of choice rank, then token: all first choices
    before any second choice (GShard/DeepSpeed style).
    ``reroute``: ``position`` first; then in rounds r = 1, 2, ... every overflowed, still unplaced assignment
    proposes to its token's r-th best expert outside the token's top-k (ranked by the router's selection
    score; masked experts never). Experts accept proposals in (choice rank, token) order while they have
    room. A token's pending assignments propose to the same expert in a round, so at most one of them is
    accepted there; the others go on to the next round. A rerouted assignment keeps its gate value. What is
    still unplaced after the last alternative is dropped.

    ``selection_TE`` (the router's selection scores, (T, num_experts)) is read by ``reroute`` only; the other
    policies may pass None.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"moe.drop_policy={policy} is not supported; allowed: {', '.join(DROP_POLICIES)}")
    T, K = expert_idx_TK.shape
    E = num_experts
    if policy == "reroute" and selection_TE is None:
        raise ValueError("apply_capacity: moe.drop_policy=reroute needs the router's selection scores")
    device = expert_idx_TK.device
    expert_A = expert_idx_TK.reshape(-1).clone()
    room_E = torch.full((E,), capacity, dtype=torch.long, device=device)
    keep_A, slot_A = _accept(expert_A, _priority(policy, gates_TK), room_E)
    rerouted_A = torch.zeros_like(keep_A)
    if policy == "reroute":
        load_E = expert_counts(expert_A[keep_A], E)
        # each token's experts outside its top-k, best first (masked experts rank last with -inf)
        outside_topk_TE = selection_TE.scatter(1, expert_idx_TK, float("-inf"))
        alternatives_TR = torch.sort(outside_topk_TE, dim=1, descending=True).indices[:, : E - K]
        # -inf marks both the token's own top-k and masked experts: neither is ever an alternative
        alt_valid_TR = torch.isfinite(outside_topk_TE.gather(1, alternatives_TR))
        pending_A = ~keep_A
        token_A = torch.arange(T * K, device=device) // K
        for r in range(E - K):
            room_E = capacity - load_E
            if not bool(pending_A.any()) or not bool((room_E > 0).any()):
                break
            cand = torch.nonzero(pending_A & alt_valid_TR[token_A, r]).squeeze(1)  # in (t, k) order
            if cand.numel() == 0:
                continue
            k_of = cand % K
            cand = cand[torch.sort(k_of, stable=True).indices]  # priority: choice rank, then token
            target = alternatives_TR[token_A[cand], r]
            # one proposal per token per round: the first (lowest k) of the token's pending assignments
            first = torch.ones_like(cand, dtype=torch.bool)
            order = torch.sort(token_A[cand], stable=True)
            tok_sorted = order.values
            dup_sorted = torch.zeros_like(first)
            dup_sorted[1:] = tok_sorted[1:] == tok_sorted[:-1]
            first[order.indices] = ~dup_sorted
            cand, target = cand[first], target[first]
            ok, rank = _accept(target, torch.arange(cand.numel(), device=device), room_E)
            placed = cand[ok]
            expert_A[placed] = target[ok]
            slot_A[placed] = load_E[target[ok]] + rank[ok]
            keep_A[placed] = True
            rerouted_A[placed] = True
            pending_A[placed] = False
            load_E += expert_counts(target[ok], E)
    return CapacityPlan(expert_A.view(T, K), keep_A.view(T, K), slot_A.view(T, K), rerouted_A.view(T, K))


@dataclass
class Permutation:
    assignment_A: torch.Tensor  # flat (t * K + k) index of each kept assignment, sorted by expert
    token_A: torch.Tensor  # the token each sorted assignment reads from and writes to
    expert_A: torch.Tensor  # the expert of each sorted assignment
    tokens_per_expert_E: torch.Tensor  # int64 counts of kept assignments, the grouped GEMM's group sizes


def permute(expert_idx_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None) -> Permutation:
    """Sort the (kept) assignments by expert, stable in token order. Dropless, nothing here waits for the host;
    with ``keep_TK`` the number of kept assignments sizes the result (one sync)."""
    K = expert_idx_TK.shape[1]
    flat_expert = expert_idx_TK.reshape(-1)
    if keep_TK is None:
        assignment_A = torch.sort(flat_expert, stable=True).indices
    else:
        kept = torch.nonzero(keep_TK.reshape(-1)).squeeze(1)
        assignment_A = kept[torch.sort(flat_expert[kept], stable=True).indices]
    expert_A = flat_expert[assignment_A]
    tokens_per_expert_E = expert_counts(expert_A, num_experts)
    return Permutation(assignment_A, assignment_A // K, expert_A, tokens_per_expert_E)


def combine(y_AD: torch.Tensor, perm: Permutation, gates_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Gate-weighted sum of expert outputs back onto their tokens: ``out[t] = sum_k gate[t,k] * y[t,k]``.

    The weighting runs in fp32 or wider (gates come from the fp32 router) and the result is cast to ``y``'s
    dtype. The CPU expert kernel fuses this step (``cpu_experts.FusedMoEExperts``) with the same arithmetic.
    """
    gate_A = gates_TK.reshape(-1)[perm.assignment_A]
    acc_dtype = torch.promote_types(y_AD.dtype, gates_TK.dtype)
    weighted_AD = y_AD.to(acc_dtype) * gate_A.unsqueeze(-1)
    out_TD = torch.zeros(num_tokens, y_AD.shape[-1], dtype=acc_dtype, device=y_AD.device)
    out_TD.index_add_(0, perm.token_A, weighted_AD)
    return out_TD.to(y_AD.dtype)
