"""``moe.backend=megablocks``: MegaBlocks' dropless expert MLP (``megablocks.layers.dmoe.ParallelDroplessMLP``: the
tokens of every expert in one grouped GEMM, no capacity, SwiGLU experts as its ``glu`` MLP) behind our router, so
routing, top-k schedules, expert masks and routing statistics mean what they mean on the native backend.

MegaBlocks builds only with CUDA: the kernels are imported when a layer is built, on a GPU machine. What does not
need them lives here and is tested on CPU: the mapping of our config to MegaBlocks' ``Arguments``
(:func:`megablocks_arguments`) and the weight layouts both ways (:func:`to_megablocks`, :func:`from_megablocks`).

Shape legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

MegaBlocks' GLU keeps each weight as one (E * F, D) matrix, expert e's rows ``e F .. (e + 1) F``: ``w1`` and ``v1``
are used transposed (``x @ w1_e^T``: gate and up projections), ``w2`` as it is (``h @ w2_e``). Ours are stacks
``w1_EDF``, ``w3_EDF`` (x @ w) and ``w2_EFD`` (h @ w).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model.dispatch import expert_counts
from moetrain.model.moe import MoEStats, RoutingCore, init_expert_slices


def megablocks_arguments(
    cfg: ModelConfig, moe: MoEConfig, dtype: str, std: float, out_std: float, ep_group: dist.ProcessGroup | None = None
) -> dict[str, Any]:
    """The fields of ``megablocks.layers.arguments.Arguments`` for one of our MoE layers: SwiGLU experts
    (``mlp_type=glu``, SiLU) on the grouped GEMM, no biases, dropless; the routing, its losses and its gate
    normalisation are ours (MegaBlocks' load-balancing loss is off, expert weights are our gates as given)."""
    return {
        "hidden_size": cfg.d_model,
        "ffn_hidden_size": cfg.d_ff,
        "num_layers": 1,
        "bias": False,
        "return_bias": False,
        "activation_fn": F.silu,
        "moe_num_experts": moe.num_experts,
        "moe_top_k": moe.top_k,
        "moe_capacity_factor": 0,  # dropless
        "moe_normalize_expert_weights": None,  # our router's gates already are what the layer combines with
        "moe_loss_weight": 0.0,  # our load-balancing and z losses
        "moe_jitter_eps": None,
        "moe_expert_model_parallelism": ep_group is not None,
        "expert_parallel_group": ep_group,
        "mlp_type": "glu",
        "mlp_impl": "grouped",
        "fp16": dtype == "fp16",
        "bf16": dtype == "bf16",
        "init_method": partial(nn.init.normal_, mean=0.0, std=std),
        "output_layer_init_method": partial(nn.init.normal_, mean=0.0, std=out_std),
    }


def to_megablocks(w1_EDF: torch.Tensor, w3_EDF: torch.Tensor, w2_EFD: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our expert stacks as MegaBlocks' GLU weights ``w1``, ``v1``, ``w2`` ((E * F, D) each)."""
    E, D, F_ = w1_EDF.shape
    return {
        "w1": w1_EDF.transpose(1, 2).reshape(E * F_, D),
        "v1": w3_EDF.transpose(1, 2).reshape(E * F_, D),
        "w2": w2_EFD.reshape(E * F_, D),
    }


def from_megablocks(w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """MegaBlocks' GLU weights as our stacks ``w1_EDF``, ``w3_EDF``, ``w2_EFD``."""
    rows, D = w1.shape
    F_ = rows // num_experts
    return {
        "w1_EDF": w1.view(num_experts, F_, D).transpose(1, 2),
        "w3_EDF": v1.view(num_experts, F_, D).transpose(1, 2),
        "w2_EFD": w2.view(num_experts, F_, D),
    }


class MegaBlocksMoELayer(RoutingCore):
    """Our router and statistics; MegaBlocks' dropless MLP computes the experts (CUDA)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, dtype: str) -> None:
        super().__init__(cfg.d_model, moe)
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import ParallelDroplessMLP

        self.mlp = ParallelDroplessMLP(Arguments(**megablocks_arguments(cfg, moe, dtype, 0.02, 0.02)))

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """The native layer's draws (every backend starts from the same weights), in MegaBlocks' layout."""
        glu = self.mlp.mlp
        D, F_ = glu.w1.shape[1], glu.w1.shape[0] // self.num_experts
        stacks = init_expert_slices(self, 0, self.num_experts, D, F_, std, out_std)
        for name, value in to_megablocks(*stacks).items():
            getattr(glu, name).copy_(value)

    def stacked_views(self) -> dict[str, tuple[nn.Parameter, Any]]:
        """Each expert weight's parameter and the view that reads it as our stack (exports, checkpoints)."""
        glu, E = self.mlp.mlp, self.num_experts
        stacks = lambda name: lambda t: from_megablocks(t, t, t, E)[name]  # noqa: E731
        return {"w1_EDF": (glu.w1, stacks("w1_EDF")), "w3_EDF": (glu.v1, stacks("w3_EDF")),
                "w2_EFD": (glu.w2, stacks("w2_EFD"))}  # fmt: skip

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        T, E = x_BSD.shape[0] * x_BSD.shape[1], self.num_experts
        routed = self.route(x_BSD.reshape(T, -1))
        r = routed.routing
        y_BSD = self.mlp(x_BSD, r.probs_TE, r.gates_TK.to(x_BSD.dtype), r.expert_idx_TK)
        counts_E = expert_counts(r.expert_idx_TK, E)
        zeros_E = torch.zeros(E, device=x_BSD.device)  # per-expert output norms stay inside MegaBlocks' kernels
        return y_BSD, self.stats(routed, counts_E, zeros_E, zeros_E)


class MegaBlocksBackend:
    name = "megablocks"

    def __init__(self, dtype: str = "bf16") -> None:
        self.dtype = dtype

    def moe_ffn(self, cfg: ModelConfig, moe: MoEConfig, ep_group: dist.ProcessGroup | None, ep_size: int) -> nn.Module:
        return MegaBlocksMoELayer(cfg, moe, self.dtype)

    def expert_group(self, ep_size: int) -> dist.ProcessGroup | None:
        return None  # expert parallelism is refused by the config for now (moetrain/config/validate.py)

    def declare_experts(self, model: nn.Module, ep_size: int) -> Any | None:
        return None

    def join_groups(self, model: nn.Module) -> None:
        pass

    def lora_expert_targets(self) -> tuple[list[str], list[str]]:
        return ["mlp.mlp.w1", "mlp.mlp.v1", "mlp.mlp.w2"], []
