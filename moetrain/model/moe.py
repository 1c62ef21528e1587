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
from moetrain.model.dispatch import CapacityPlan, apply_capacity, combine, expert_capacity, expert_counts, permute
from moetrain.model.experts import GroupedExperts
from moetrain.model.router import (
    Routing,
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
    output_norm_sum_E: torch.Tensor  # sum over computed assignments of ||expert output|| (no gate)
    entropy_sum: torch.Tensor  # sum over tokens of the routing distribution's entropy (nats)
    num_tokens: int
    dropped: torch.Tensor  # 0-dim: assignments that contribute nothing
    rerouted: torch.Tensor  # 0-dim: assignments computed by another expert than the router chose


@dataclass
class Routed:
    """One call's routing decisions, before any expert runs."""

    routing: Routing
    plan: CapacityPlan | None  # None: dropless
    capacity: int | None
    expert_idx_TK: torch.Tensor  # the expert computing each assignment (after rerouting)
    routed_per_expert_E: torch.Tensor  # the router's choices, before capacity

    @property
    def keep_TK(self) -> torch.Tensor | None:
        return self.plan.keep_TK if self.plan is not None else None


class RoutingCore(nn.Module):
    """Router, capacity and drop policy, runtime controls and statistics: everything of an MoE layer but the
    experts. Backends that run experts elsewhere (DeepSpeed's MoE layer) reuse it as their gate."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.capacity_factor = cfg.capacity_factor
        self.eval_capacity_factor = cfg.eval_capacity_factor
        self.drop_policy = cfg.drop_policy
        self.min_capacity = cfg.min_capacity
        self.bias_update_rate = cfg.bias_update_rate
        self.router = TopKRouter(
            d_model,
            cfg.num_experts,
            cfg.top_k,
            cfg.renormalize,
            cfg.score_func,
            cfg.jitter_eps,
            renormalize_top1=cfg.renormalize_top1,
            routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            group_score=cfg.group_score,
        )
        # aux-loss-free balancing: token counts of training forwards since the last optimizer step
        self.register_buffer("_load_since_step_E", torch.zeros(cfg.num_experts), persistent=False)

    # ------------------------------------------------------------------ runtime controls
    @property
    def base_router(self) -> TopKRouter:
        """The router module itself: a LoRA adapter (peft) wraps ``self.router``, and runtime controls must
        reach the module that reads them."""
        router = self.router
        return router.get_base_layer() if hasattr(router, "get_base_layer") else router

    @property
    def top_k(self) -> int:
        return self.base_router.top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        active = self.base_router.num_active
        if not 1 <= k <= active:
            raise ValueError(f"moe.top_k={k} must be between 1 and the number of active experts ({active})")
        router = self.base_router
        if router.n_group > 1 and k > router.topk_group * router.num_experts // router.n_group:
            raise ValueError(f"moe.top_k={k} exceeds the experts of moe.topk_group={router.topk_group} groups")
        router.top_k = k

    def set_expert_mask(self, active_E: torch.Tensor) -> None:
        """Only experts with ``active_E[i]`` True can be selected from now on."""
        active_E = active_E.to(self.base_router.active_E)
        if int(active_E.sum()) < self.top_k:
            raise ValueError(f"the expert mask leaves {int(active_E.sum())} experts, fewer than moe.top_k={self.top_k}")
        self.base_router.active_E.copy_(active_E)

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
        self.base_router.bias_E += balancing_bias_update(load, self.base_router.active_E, self.bias_update_rate)
        self._load_since_step_E.zero_()

    def ffn_parameters(self) -> list[nn.Parameter]:
        """Every parameter of this MoE FFN (router and experts), initialised together by ``reset_parameters``."""
        return list(self.parameters())

    # ------------------------------------------------------------------ routing and statistics
    def route(self, x_TD: torch.Tensor) -> Routed:
        T, E = x_TD.shape[0], self.num_experts
        routing = self.router(x_TD)
        K = routing.expert_idx_TK.shape[1]
        routed_E = expert_counts(routing.expert_idx_TK, E)
        if self.training:
            self._load_since_step_E += routed_E
        # capacity shares the assignments among the experts that can be selected (pruned ones cannot)
        capacity = expert_capacity(T, self.base_router.num_active, K, self.current_capacity_factor(), self.min_capacity)
        plan = None
        if capacity is not None:
            selection_TE = routing.selection_TE if self.drop_policy == "reroute" else None
            plan = apply_capacity(routing.expert_idx_TK, routing.gates_TK, selection_TE, capacity, self.drop_policy, E)
        expert_idx_TK = plan.expert_idx_TK if plan is not None else routing.expert_idx_TK
        return Routed(routing, plan, capacity, expert_idx_TK, routed_E)

    def stats(
        self,
        routed: Routed,
        tokens_per_expert_E: torch.Tensor,
        saliency_sum_E: torch.Tensor,
        output_norm_sum_E: torch.Tensor,
        constants: torch.Tensor | None = None,
    ) -> MoEStats:
        """Losses (differentiable) and metrics of one call. ``saliency_sum_E`` / ``output_norm_sum_E``: sums over
        computed assignments of gate * ||expert output|| and of ||expert output||, which only the code that ran
        the experts can measure; ``constants``: assignments a MoNE constant answered (contributing, not dropped).
        Everything stays on the device (no host sync): :class:`~moetrain.metrics.routing.RoutingMetrics` reduces
        it at the metrics interval."""
        routing, E = routed.routing, self.num_experts
        T, K = routing.expert_idx_TK.shape
        aux_loss = load_balancing_loss(routing.dist_TE, routing.expert_idx_TK, self.base_router.num_active)
        z_loss = router_z_loss(routing.logits_TE)
        with torch.no_grad():  # device tensors only: the metrics reduce them at their interval, not here
            computed = tokens_per_expert_E.sum()
            if constants is not None:
                computed = computed + constants
            gate_mass_E = torch.zeros(E, device=routing.gates_TK.device).index_add(
                0, routing.expert_idx_TK.reshape(-1), routing.gates_TK.reshape(-1)
            )
            return MoEStats(
                aux_loss=aux_loss,
                z_loss=z_loss,
                routed_per_expert_E=routed.routed_per_expert_E,
                tokens_per_expert_E=tokens_per_expert_E,
                gate_mass_E=gate_mass_E,
                saliency_sum_E=saliency_sum_E,
                output_norm_sum_E=output_norm_sum_E,
                entropy_sum=router_entropy(routing.dist_TE) * T,
                num_tokens=T,
                dropped=T * K - computed,
                rerouted=routed.plan.rerouted_TK.sum() if routed.plan is not None else torch.zeros_like(computed),
            )


@torch.no_grad()
def init_expert_slices(
    core: RoutingCore, ep_rank: int, num_local: int, d_model: int, d_ff: int, std: float, out_std: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initialise the router, then draw the full (E, D, F) w1, (E, D, F) w3 and (E, F, D) w2 in that order and
    return this rank's ``num_local`` experts of each: every backend and expert-parallel size gets the same
    weights from the same RNG state."""
    nn.init.normal_(core.router.weight_ED, std=std)
    first = ep_rank * num_local
    out = []
    for shape, w_std in (((d_model, d_ff), std), ((d_model, d_ff), std), ((d_ff, d_model), out_std)):
        full = torch.empty(core.num_experts, *shape)
        nn.init.normal_(full, std=w_std)
        out.append(full[first : first + num_local])
    return out[0], out[1], out[2]


class MoELayer(RoutingCore):
    """``moe.backend=native``: our own experts, sorted grouped GEMM, optional expert parallelism."""

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(d_model, cfg)
        self.padded = cfg.padded
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        self.a2a_chunks = cfg.a2a_chunks
        # MoNE constants (prune.mode=mone): the last router slots output a fixed vector each, scaled by its gate
        self.num_constants = cfg.constants_in_layer(0)
        self.num_local_experts = (cfg.num_experts - self.num_constants) // self.ep_size
        self.experts = GroupedExperts(self.num_local_experts, d_model, d_ff, cfg.expert_impl)
        self.constant_out_ND = nn.Parameter(torch.zeros(self.num_constants, d_model)) if self.num_constants else None

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Router, then the full (E, ...) w1, w3, w2 tensors drawn in that order; this rank keeps its slice,
        so any ``parallel.ep_size`` starts from the weights of the unsharded layer."""
        d_ff, d_model = self.experts.w2_EFD.shape[1:]
        w1, w3, w2 = init_expert_slices(self, self.ep_rank, self.num_local_experts, d_model, d_ff, std, out_std)
        self.experts.w1_EDF.copy_(w1)
        self.experts.w3_EDF.copy_(w3)
        self.experts.w2_EFD.copy_(w2)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        T, E = B * S, self.num_experts
        x_TD = x_BSD.reshape(T, D)
        routed = self.route(x_TD)
        keep_TK, constant_TK = routed.keep_TK, None
        if self.constant_out_ND is not None:  # constants run no FFN: only the experts' assignments are permuted
            constant_TK = routed.expert_idx_TK >= E - self.num_constants
            keep_TK = ~constant_TK if keep_TK is None else keep_TK & ~constant_TK
        perm = permute(routed.expert_idx_TK, E, keep_TK)
        gates_TK = routed.routing.gates_TK
        if routed.plan is not None and self.padded and self.ep_size == 1:
            y_AD = self._padded_experts(x_TD, perm, routed.plan, routed.capacity)
        elif self.ep_size == 1:
            tokens_E = perm.tokens_per_expert_E[: E - self.num_constants]  # the constants' counts are 0
            y_AD = self.experts(x_TD.index_select(0, perm.token_A), tokens_E)
        else:
            from moetrain.model.expert_parallel import expert_parallel_ffn

            x_AD = x_TD.index_select(0, perm.token_A)
            y_AD = expert_parallel_ffn(x_AD, perm.tokens_per_expert_E, self.experts, self.ep_group, self.a2a_chunks)
        out_TD = combine(y_AD, perm, gates_TK, T)
        constants = None
        if constant_TK is not None:
            out_TD = out_TD + self._constant_outputs(routed.expert_idx_TK, gates_TK, constant_TK)
            constants = constant_TK.sum()
        with torch.no_grad():
            gate_A = gates_TK.reshape(-1)[perm.assignment_A]
            norm_A = y_AD.float().norm(dim=-1)
            saliency_E = torch.zeros(E, device=x_TD.device).index_add(0, perm.expert_A, gate_A * norm_A)
            norm_E = torch.zeros(E, device=x_TD.device).index_add(0, perm.expert_A, norm_A)
        return out_TD.view(B, S, D), self.stats(routed, perm.tokens_per_expert_E, saliency_E, norm_E, constants)

    def _constant_outputs(
        self, expert_idx_TK: torch.Tensor, gates_TK: torch.Tensor, constant_TK: torch.Tensor
    ) -> torch.Tensor:
        """MoNE: ``sum_k [e_k is a constant] g_k c_{e_k}`` per token (T, D), ``c`` the constants' vectors."""
        first = self.num_experts - self.num_constants
        slot_TK = (expert_idx_TK - first).clamp_min(0)
        c_TKD = self.constant_out_ND[slot_TK].to(gates_TK.dtype)
        return ((gates_TK * constant_TK).unsqueeze(-1) * c_TKD).sum(1)

    def _padded_experts(self, x_TD: torch.Tensor, perm, plan, capacity: int) -> torch.Tensor:
        """Fixed-shape path: tokens laid out in an (E, C, D) buffer, one batched GEMM per weight."""
        E, D = self.num_experts, x_TD.shape[1]
        slot_A = plan.slot_TK.reshape(-1)[perm.assignment_A]
        x_ECD = x_TD.new_zeros(E, capacity, D)
        x_ECD[perm.expert_A, slot_A] = x_TD.index_select(0, perm.token_A)
        y_ECD = self.experts.forward_padded(x_ECD)
        return y_ECD[perm.expert_A, slot_A]
