"""Top-k token router and its auxiliary losses.

Shape legend: T tokens, D model dim, E experts, K experts per token (top-k).

The router runs in fp32 whatever the model dtype: the score function and the aux losses are sensitive to
rounding. ``top_k`` is a plain attribute, so a schedule can switch it at run time without rebuilding.

Scores: ``softmax`` over experts (Switch, Mixtral) or an independent ``sigmoid`` per expert (DeepSeek-V3).
Selection: the k best ``score + bias`` among unmasked experts. ``bias_E`` is the aux-loss-free balancing
bias (a buffer, never trained by the optimizer; DeepSeek-V3's ``e_score_correction_bias``): it shifts *which*
experts are selected, never the gate values. With group-limited routing (``n_group > 1``) only experts of
the token's ``topk_group`` best groups can be selected (:func:`group_limited_mask`). Gates: the selected
scores, renormalised over the k when ``renormalize`` is on (at k = 1 only with ``renormalize_top1``), times
``routed_scaling_factor`` (:func:`combine_gates`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import SCORE_FUNCS
from moetrain.model.dispatch import expert_counts


def load_balancing_loss(dist_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, without its coefficient.

    ``loss = E * sum_i f_i * P_i`` where ``f_i = (#assignments routed to expert i) / (T * K)`` (a count, no
    gradient) and ``P_i = mean_t dist[t, i]`` (differentiable; ``dist`` is the routing distribution: softmax
    scores, or sigmoid scores normalised per token). It is 1.0 when routing is perfectly uniform and E when
    every token goes to one expert. The trainer multiplies it by ``moe.aux_loss_coef``.

    Computed over the tokens of one forward call: one micro-batch on one data-parallel rank, before any
    expert-parallel exchange (so it does not depend on ``parallel.ep_size``). ``num_experts`` is the number
    of experts that can be selected (masked experts have f_i = P_i = 0), so balance over them scores 1.0.
    The counts are a scatter-add into a fixed-size buffer: no host synchronisation.
    """
    counts_E = expert_counts(expert_idx_TK, dist_TE.shape[1]).to(dist_TE.dtype)
    return num_experts * torch.sum(counts_E / expert_idx_TK.numel() * dist_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE), without its coefficient: ``mean_t (log sum_i exp(logits[t, i]))^2``.

    Keeps router logits small so the score function stays well conditioned. The trainer multiplies it by
    ``moe.z_loss_coef``. Masked experts are excluded from the sum (their logits are -inf).
    """
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def router_entropy(dist_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``-sum_i p_i log p_i`` (nats) of a routing distribution: rows of ``dist_TE`` sum to 1
    (softmax scores, or sigmoid scores normalised per token); masked experts have p_i = 0 and add 0."""
    return torch.special.entr(dist_TE).sum(-1).mean()


def balancing_bias_update(load_E: torch.Tensor, active_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step (DeepSeek-V3): ``delta_i = rate * sign(mean_load - load_i)``.

    Underloaded experts get a higher selection bias, overloaded ones a lower; masked experts are left at 0.
    ``load_E`` must be the same on every rank (all-reduced) so biases stay identical.
    """
    mean_load = load_E[active_E].float().mean()
    return rate * torch.sign(mean_load - load_E.float()) * active_E


def group_limited_mask(selection_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Which experts each token may select under group-limited routing (DeepSeek-V2/V3), as a bool (T, E).

    The E experts form ``n_group`` consecutive groups of ``E / n_group``. A group's score is
    ``max_i s_i`` over its experts (``group_score="max"``, DeepSeek-V2 ``group_limited_greedy``) or the sum of
    its two best ``s_i`` (``"top2_sum"``, DeepSeek-V3 ``noaux_tc``), where ``s = selection scores`` (scores
    plus the balancing bias; masked experts are -inf). A token keeps the experts of its ``topk_group`` best
    groups.
    """
    T, E = selection_TE.shape
    by_group_TGE = selection_TE.view(T, n_group, E // n_group)
    if group_score == "max":
        group_TG = by_group_TGE.max(dim=-1).values
    else:
        group_TG = by_group_TGE.topk(2, dim=-1).values.sum(dim=-1)
    best_TG = torch.topk(group_TG, topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


def renormalizes(renormalize: bool, renormalize_top1: bool, top_k: int) -> bool:
    """Whether the gates are renormalised over the k chosen: with ``renormalize``, at k = 1 only with
    ``renormalize_top1`` (the gate is then 1.0, as in Mixtral; without it the top-1 gate is the raw ``p_1``,
    Switch-style)."""
    return renormalize and (top_k > 1 or renormalize_top1)


def combine_gates(
    scores_TK: torch.Tensor, renormalize: bool, renormalize_top1: bool, routed_scaling_factor: float
) -> torch.Tensor:
    """Combine weights of the k selected experts from their scores ``p``.

    ``g_k = p_k / sum_j p_j`` where :func:`renormalizes`, else ``g_k = p_k``; then ``g_k *=
    routed_scaling_factor`` (DeepSeek).
    """
    if renormalizes(renormalize, renormalize_top1, scores_TK.shape[1]):
        scores_TK = scores_TK / scores_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        scores_TK = scores_TK * routed_scaling_factor
    return scores_TK


def selection_scores(probs_TE: torch.Tensor, bias_E: torch.Tensor, masked_E: torch.Tensor | None) -> torch.Tensor:
    """What top-k ranks: ``scores + bias`` (no gradient), -inf for masked experts."""
    if masked_E is not None:  # the mask folded into the (E,) bias: no (T, E) fill
        bias_E = bias_E.masked_fill(masked_E, float("-inf"))
    return probs_TE.detach() + bias_E


@dataclass
class Routing:
    """One call's routing: the choices, the gates, and what the losses and metrics are computed from."""

    logits_TE: torch.Tensor  # fp32 router logits, -inf for experts that cannot be selected
    probs_TE: torch.Tensor  # fp32 scores: softmax distribution, or per-expert sigmoid (masked: 0)
    dist_TE: torch.Tensor  # the routing distribution: probs (softmax), or sigmoid scores normalised per token
    expert_idx_TK: torch.Tensor  # int64, best expert first
    gates_TK: torch.Tensor  # fp32 combine weights
    selection_TE: torch.Tensor  # what top-k ranked: scores + bias, -inf where masked or outside allowed groups


class TopKRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        score_func: str = "softmax",
        jitter_eps: float = 0.0,
        *,
        renormalize_top1: bool = False,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        group_score: str = "max",
    ) -> None:
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"moe.score_func={score_func} is not supported; allowed: {', '.join(SCORE_FUNCS)}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.score_func = score_func
        self.jitter_eps = jitter_eps
        self.renormalize_top1 = renormalize_top1
        self.routed_scaling_factor = routed_scaling_factor
        if num_experts % n_group:  # e.g. a pruned layer: group-limited routing needs equal groups
            raise ValueError(f"moe.n_group={n_group} does not divide this layer's {num_experts} experts")
        self.n_group, self.topk_group, self.group_score = n_group, topk_group, group_score
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.register_buffer("bias_E", torch.zeros(num_experts))
        self.register_buffer("active_E", torch.ones(num_experts, dtype=torch.bool))

    @property
    def num_active(self) -> int:
        """Experts that can be selected. A host-side count, recounted only when ``active_E`` changed (its
        version counter moves on every in-place write: a mask set, a checkpoint loaded; a move to another device
        makes a new tensor), so a forward reads it without a device->host sync."""
        key = (self.active_E.data_ptr(), self.active_E._version)
        if getattr(self, "_num_active_key", None) != key:
            self._num_active, self._num_active_key = int(self.active_E.sum()), key
        return self._num_active

    def forward(self, x_TD: torch.Tensor) -> Routing:
        x_TD = x_TD.float()
        if self.training and self.jitter_eps > 0:
            # Switch-style multiplicative input jitter, training only.
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits_TE = F.linear(x_TD, self.weight_ED.float())
        # a pruned layer masks its removed experts: -inf logits (softmax 0, sigmoid 0, out of the z-loss's sum)
        masked_E = ~self.active_E if self.num_active < self.num_experts else None
        if masked_E is not None:
            logits_TE = logits_TE.masked_fill(masked_E, float("-inf"))
        probs_TE = torch.softmax(logits_TE, dim=-1) if self.score_func == "softmax" else torch.sigmoid(logits_TE)
        selection_TE = selection_scores(probs_TE, self.bias_E, masked_E)
        if self.n_group > 1:
            allowed_TE = group_limited_mask(selection_TE, self.n_group, self.topk_group, self.group_score)
            selection_TE = selection_TE.masked_fill(~allowed_TE, float("-inf"))
        expert_idx_TK = torch.topk(selection_TE, self.top_k, dim=-1).indices
        gates_TK = combine_gates(
            probs_TE.gather(1, expert_idx_TK), self.renormalize, self.renormalize_top1, self.routed_scaling_factor
        )
        # the balancing loss and the entropy use the routing *distribution*: sigmoid scores normalised per token
        dist_TE = probs_TE
        if self.score_func == "sigmoid":
            dist_TE = dist_TE / dist_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        return Routing(logits_TE, probs_TE, dist_TE, expert_idx_TK, gates_TK, selection_TE)
