"""``moe.backend=deepspeed``: DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``: its expert-parallel
groups, all-to-all, capacity buffer and per-expert checkpoint files) with our router as its gate.

Shape legend: S tokens, M model dim, E experts, K experts per token, C capacity slots per expert.

DeepSpeed's ``MOELayer`` asks its gate for sparse routes: for every (choice k, token s) the expert index
(-1: dropped), the slot inside that expert's C-slot buffer, and the gate value. :class:`RouterGate` answers
with our router, capacity definition and drop policies (``probs``, ``position``, ``reroute``, dropless), so
routing means exactly what it means with ``moe.backend=native``; DeepSpeed then encodes the (E, C, M)
buffer, exchanges it with its all-to-all, runs its ``Experts`` and decodes with our gates. Dropless uses the
largest per-expert count over the expert-parallel group as C (DeepSpeed's own ``drop_tokens=False`` rule).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from moetrain.config import MoEConfig
from moetrain.model.dispatch import apply_capacity
from moetrain.model.moe import MoEStats, RoutingCore, init_expert_slices
from moetrain.model.transformer import DenseFFN


class RouterGate(RoutingCore):
    """Our routing core speaking DeepSpeed's gate protocol (sparse routes)."""

    def __init__(self, d_model: int, cfg: MoEConfig, ep_rank: int = 0) -> None:
        super().__init__(d_model, cfg)
        self.ep_group = None
        self.last_routed = None
        self.last_slots = None
        # DeepSpeed assigns the expert-parallel group at engine start; initialisation needs the rank before
        self.ep_rank = ep_rank
        self._experts: list[nn.Module] = []  # DeepSpeed's Experts, held unregistered (it is not ours)

    @property
    def local_experts(self) -> nn.ModuleList:
        """This rank's expert modules (DeepSpeed's ``Experts.deepspeed_experts``)."""
        return self._experts[0].deepspeed_experts

    def _set_ep_group(self, ep_group) -> None:  # called by DeepSpeed's MOELayer
        self.ep_group = ep_group

    def ffn_parameters(self) -> list[nn.Parameter]:
        return [*self.parameters(), *(p for e in self._experts for p in e.parameters())]

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Same draws as the native layer; each local expert takes its slice (transposed to nn.Linear layout)."""
        local = self.local_experts
        stacked = init_expert_slices(
            self, self.ep_rank, len(local), local[0].w1.in_features, local[0].w1.out_features, std, out_std
        )
        for name, w in zip(("w1", "w3", "w2"), stacked):
            for j, expert in enumerate(local):
                getattr(expert, name).weight.copy_(w[j].t())

    def forward(self, x_SM: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if used_token is not None or not sparse_routes or use_tutel:
            raise NotImplementedError("moe.backend=deepspeed: RouterGate supports sparse routes only")
        routed = self.route(x_SM)
        self.last_routed = routed
        E = self.num_experts
        T, K = routed.expert_idx_TK.shape
        if routed.plan is None:  # dropless: every assignment gets a slot, in (choice rank, token) order
            plan = apply_capacity(routed.expert_idx_TK, routed.routing.gates_TK, None, T * K, "position", E)
        else:
            plan = routed.plan
        slot_TK, keep_TK = plan.slot_TK, plan.keep_TK
        counts_E = torch.bincount(routed.expert_idx_TK[keep_TK], minlength=E)
        capacity = torch.tensor(routed.capacity) if routed.capacity is not None else counts_E.max().clamp_min(1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            # the all-to-all exchanges equal (E, C, M) blocks: every rank of the group needs the same C
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        indices_KS = torch.where(keep_TK, routed.expert_idx_TK, -1).t().to(torch.int32).contiguous()
        locations_KS = torch.where(keep_TK, slot_TK, 0).t().to(torch.int32).contiguous()
        gates_KS = routed.routing.gates_TK.t().contiguous()
        self.last_slots = (slot_TK, keep_TK, counts_E)
        # DeepSpeed keeps the returned l_aux as `MoE.l_aux`; our trainer reads the losses from MoEStats instead
        l_aux = torch.zeros((), device=x_SM.device)
        return l_aux, int(capacity), E, indices_KS, locations_KS, gates_KS, counts_E


class DeepSpeedMoELayer(nn.Module):
    """An MoE FFN built from ``deepspeed.moe.layer.MoE`` with :class:`RouterGate`; returns (y, MoEStats) like
    the native layer. Schedules reach its routing controls through ``self.gate``."""

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, ep_size: int, ep_rank: int) -> None:
        super().__init__()
        self.moe = MoE(
            d_model,
            DenseFFN(d_model, d_ff),
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=1,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            min_capacity=cfg.min_capacity,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        gate = RouterGate(d_model, cfg, ep_rank)
        gate._experts.append(self.moe.deepspeed_moe.experts)
        self.moe.deepspeed_moe.gate = gate  # replaces DeepSpeed's TopKGate
        self._norms: torch.Tensor | None = None
        self.moe.deepspeed_moe.experts.register_forward_hook(self._capture_output_norms)

    @property
    def gate(self) -> RouterGate:
        return self.moe.deepspeed_moe.gate

    def _capture_output_norms(self, module, inputs, output) -> None:
        # (ep, El, C, M) on the rank that owns the experts: per-slot output norms, for the saliency metric
        self._norms = output.detach().float().norm(dim=-1)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        y, _, _ = self.moe(x_BSD)
        gate = self.gate
        routed = gate.last_routed
        norms = self._norms.reshape(-1, self._norms.shape[-1])  # (E, C) in owner order
        if gate.ep_group is not None and dist.get_world_size(gate.ep_group) > 1:
            back = torch.empty_like(norms)
            dist.all_to_all_single(back, norms.contiguous(), group=gate.ep_group)
            norms = back  # (E, C) for this rank's tokens, by global expert
        slot_TK, keep_TK, counts_E = gate.last_slots
        with torch.no_grad():
            e, s = routed.expert_idx_TK[keep_TK], slot_TK[keep_TK]
            norm_A = norms[e, s]
            saliency_E = torch.zeros(gate.num_experts, device=y.device).index_add(
                0, e, routed.routing.gates_TK[keep_TK].float() * norm_A
            )
            norm_E = torch.zeros(gate.num_experts, device=y.device).index_add(0, e, norm_A)
        return y, gate.stats(routed, counts_E, saliency_E, norm_E)
