"""The MoE layer: router -> capacity -> permutation -> experts (local or expert-parallel) -> combine.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token,
A kept assignments, C capacity.

Runtime-switchable: ``top_k``, ``capacity_factor``, ``eval_capacity_factor`` and ``drop_policy`` are plain
attributes read on every call, and ``set_expert_mask`` removes experts from selection, so a schedule changes
them without rebuilding the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import MoEConfig
from moetrain.model.dispatch import apply_capacity, combine, expert_capacity, permute
from moetrain.model.experts import GroupedExperts
from moetrain.model.router import (
    TopKRouter,
    balancing_bias_update,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
)


@dataclass
class MoEStats:
    """What one forward call of one MoE layer reports. Everything but the two losses is detached."""

    aux_loss: torch.Tensor  # differentiable, no coefficient
    z_loss: torch.Tensor  # differentiable, no coefficient
    routed_per_expert_E: torch.Tensor  # assignments the router chose, before capacity
    tokens_per_expert_E: torch.Tensor  # assignments computed, after capacity and rerouting
    gate_mass_E: torch.Tensor  # sum of the router's gates per chosen expert (before capacity)
    saliency_sum_E: torch.Tensor  # sum over computed assignments of gate * ||expert output||
    entropy_sum: torch.Tensor  # sum over tokens of the routing distribution's entropy (nats)
    num_tokens: int
    dropped: int  # assignments that contribute nothing
    rerouted: int  # assignments computed by another expert than the router chose


class MoELayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.drop_policy = cfg.drop_policy
        self.min_capacity = cfg.min_capacity
        self.padded = cfg.padded
        self.bias_update_rate = cfg.bias_update_rate
        self.router = TopKRouter(d_model, cfg.num_experts, cfg.top_k, cfg.renormalize, cfg.score_func, cfg.jitter_eps)
        self.ep_group = ep_group
        ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_size = ep_size
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        self.a2a_chunks = cfg.a2a_chunks
        self.num_local_experts = cfg.num_experts // ep_size
        self.experts = GroupedExperts(self.num_local_experts, d_model, d_ff, cfg.grouped_mm)
        # aux-loss-free balancing: token counts of training forwards since the last optimizer step
        self.register_buffer("_load_since_step_E", torch.zeros(cfg.num_experts), persistent=False)

    # ------------------------------------------------------------------ runtime controls
    @property
    def top_k(self) -> int:
        return self.router.top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        active = self.router.num_active
        if not 1 <= k <= active:
            raise ValueError(f"moe.top_k={k} must be between 1 and the number of active experts ({active})")
        self.router.top_k = k

    def set_expert_mask(self, active_E: torch.Tensor) -> None:
        """Only experts with ``active_E[i]`` True can be selected from now on."""
        active_E = active_E.to(self.router.expert_mask_E)
        if int(active_E.sum()) < self.top_k:
            raise ValueError(f"the expert mask leaves {int(active_E.sum())} experts, fewer than moe.top_k={self.top_k}")
        self.router.expert_mask_E.copy_(active_E)

    def current_capacity_factor(self) -> float | None:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Aux-loss-free balancing: nudge selection biases by the sign of the load error of this step's
        tokens (all-reduced over every rank, so biases stay identical)."""
        if self.bias_update_rate <= 0:
            return
        load = self._load_since_step_E.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load)
        self.router.bias_E += balancing_bias_update(load, self.router.expert_mask_E, self.bias_update_rate)
        self._load_since_step_E.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        T, E = B * S, self.num_experts
        x_TD = x_BSD.reshape(T, D)
        routing = self.router(x_TD)
        K = routing.expert_idx_TK.shape[1]
        routed_E = torch.bincount(routing.expert_idx_TK.reshape(-1), minlength=E)
        if self.training:
            self._load_since_step_E += routed_E

        capacity = expert_capacity(T, E, K, self.current_capacity_factor(), self.min_capacity)
        expert_idx_TK, gates_TK, plan = routing.expert_idx_TK, routing.gates_TK, None
        if capacity is not None:
            plan = apply_capacity(expert_idx_TK, gates_TK, routing.selection_TE, capacity, self.drop_policy)
            expert_idx_TK = plan.expert_idx_TK
        perm = permute(expert_idx_TK, E, plan.keep_TK if plan is not None else None)

        if plan is not None and self.padded and self.ep_size == 1:
            y_AD = self._padded_experts(x_TD, perm, plan, capacity)
        elif self.ep_size == 1:
            y_AD = self.experts(x_TD.index_select(0, perm.token_A), perm.tokens_per_expert_E)
        else:
            from moetrain.model.expert_parallel import expert_parallel_ffn

            y_AD = expert_parallel_ffn(
                x_TD.index_select(0, perm.token_A),
                perm.tokens_per_expert_E,
                self.experts,
                self.ep_group,
                self.a2a_chunks,
            )
        out_TD = combine(y_AD, perm, gates_TK, T)

        # the balancing loss uses the routing *distribution*: sigmoid scores are normalised per token
        dist_TE = routing.probs_TE
        if self.router.score_func == "sigmoid":
            dist_TE = dist_TE / dist_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        aux_loss = load_balancing_loss(dist_TE, routing.expert_idx_TK, E)
        z_loss = router_z_loss(routing.logits_TE)
        with torch.no_grad():
            gate_A = gates_TK.reshape(-1)[perm.assignment_A]
            zeros_E = torch.zeros(E, device=x_TD.device)
            computed = int(perm.tokens_per_expert_E.sum())
            stats = MoEStats(
                aux_loss=aux_loss,
                z_loss=z_loss,
                routed_per_expert_E=routed_E,
                tokens_per_expert_E=perm.tokens_per_expert_E,
                gate_mass_E=zeros_E.index_add(0, routing.expert_idx_TK.reshape(-1), routing.gates_TK.reshape(-1)),
                saliency_sum_E=zeros_E.index_add(0, perm.expert_A, gate_A * y_AD.float().norm(dim=-1)),
                entropy_sum=router_entropy(dist_TE) * T,
                num_tokens=T,
                dropped=T * K - computed,
                rerouted=int(plan.rerouted_TK.sum()) if plan is not None else 0,
            )
        return out_TD.view(B, S, D), stats

    def _padded_experts(self, x_TD: torch.Tensor, perm, plan, capacity: int) -> torch.Tensor:
        """Fixed-shape path: tokens laid out in an (E, C, D) buffer, one batched GEMM per weight."""
        E, D = self.num_experts, x_TD.shape[1]
        slot_A = plan.slot_TK.reshape(-1)[perm.assignment_A]
        x_ECD = x_TD.new_zeros(E, capacity, D)
        x_ECD[perm.expert_A, slot_A] = x_TD.index_select(0, perm.token_A)
        y_ECD = self.experts.forward_padded(x_ECD)
        return y_ECD[perm.expert_A, slot_A]
