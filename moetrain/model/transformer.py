"""Decoder-only MoE transformer: RMSNorm, RoPE, grouped-KV or latent attention (``attention.py``), SwiGLU
dense or MoE FFNs, optional shared experts beside the routed ones.

Shape legend: B batch, S sequence, D model dim, H query heads, G key/value heads, Hd head dim, V vocab.

No parallelism code lives here: the layers are plain modules; distribution is the engine's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.config import ModelConfig, MoEConfig, is_moe_layer
from moetrain.model.attention import Attention, apply_rope, build_attention, rope_dim, rope_tables
from moetrain.model.moe import MoELayer, MoEStats, RoutingCore

__all__ = [
    "Attention",
    "Block",
    "DenseFFN",
    "MoETransformer",
    "SharedExpert",
    "apply_rope",
    "build_model",
    "is_moe_layer",
    "rope_tables",
]


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BSD)) * self.w3(x_BSD))


class SharedExpert(nn.Module):
    """A dense SwiGLU FFN every token takes beside the routed experts (DeepSeek's shared experts, fused into one
    FFN of their summed width; Qwen2-MoE's shared expert). With ``gated``, its output is scaled per token by
    ``sigmoid(x . w_gate)`` (Qwen2-MoE's ``shared_expert_gate``)."""

    def __init__(self, d_model: int, d_ff: int, gated: bool) -> None:
        super().__init__()
        self.ffn = DenseFFN(d_model, d_ff)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD = self.ffn(x_BSD)
        if self.gate is not None:
            y_BSD = torch.sigmoid(self.gate(x_BSD)) * y_BSD
        return y_BSD


class Block(nn.Module):
    """Pre-norm decoder block. The shared expert sits here, beside the FFN (not inside the MoE layer), so it
    works the same with every ``moe.backend``."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module, shared: SharedExpert | None = None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = ffn
        self.shared = shared

    def forward(
        self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SH, sin_SH)
        h_in = self.ffn_norm(x_BSD)
        h = self.ffn(h_in)
        stats = None
        if isinstance(h, tuple):
            h, stats = h
        if self.shared is not None:
            h = h + self.shared(h_in)
        return x_BSD + h, stats


def moe_layer_config(moe: MoEConfig, moe_index: int) -> MoEConfig:
    """The MoE config of the ``moe_index``-th MoE layer: a pruned layer has its own expert count; a layer with
    MoNE constants keeps its own structure as a one-layer ``expert_ids`` (the layer reads its constants there)."""
    if moe_index < 0 or not moe.expert_ids:
        return moe
    own = [moe.expert_ids[moe_index]] if moe.constants_in_layer(moe_index) else []
    return replace(moe, num_experts=moe.experts_in_layer(moe_index), expert_ids=own)


MoEFFN = Callable[[ModelConfig, MoEConfig, "dist.ProcessGroup | None", int], nn.Module]


def native_moe_ffn(cfg: ModelConfig, moe: MoEConfig, ep_group=None, ep_size: int = 1) -> nn.Module:
    """One MoE FFN of ``moe.num_experts`` experts: our own layer (other backends pass their constructor)."""
    return MoELayer(cfg.d_model, cfg.d_ff, moe, ep_group=ep_group)


@dataclass
class ModelOutput:
    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor  # mean over MoE layers of the Switch load-balancing loss (no coefficient)
    z_loss: torch.Tensor  # mean over MoE layers of the router z-loss (no coefficient)
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in depth order


class MoETransformer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, moe: MoEConfig, ep_group=None, ep_size: int = 1, moe_ffn: MoEFFN = native_moe_ffn
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.moe_ffn = moe_ffn  # the backend's MoE FFN constructor (a pruned layer is rebuilt with it)
        # Initial weights depend only on the RNG state at entry, not on what the modules' constructors draw
        # (DeepSpeed's experts build nn.Linear layers, ours do not): every backend starts from the same weights.
        rng_at_entry = torch.get_rng_state()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        moe_index = [sum(1 for j in range(i + 1) if is_moe_layer(j, cfg)) - 1 for i in range(cfg.n_layers)]
        self.layers = nn.ModuleList(
            Block(cfg, self._ffn(i, cfg, moe_layer_config(moe, moe_index[i]), ep_group, ep_size), self._shared(i, cfg))
            for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.seq_len, rope_dim(cfg), cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        torch.set_rng_state(rng_at_entry)
        self.reset_parameters()

    def _ffn(self, i: int, cfg: ModelConfig, moe: MoEConfig, ep_group, ep_size: int) -> nn.Module:
        if not is_moe_layer(i, cfg):
            return DenseFFN(cfg.d_model, cfg.dense_d_ff or cfg.d_ff)
        return self.moe_ffn(cfg, moe, ep_group, ep_size)

    @staticmethod
    def _shared(i: int, cfg: ModelConfig) -> SharedExpert | None:
        if cfg.shared_d_ff <= 0 or not is_moe_layer(i, cfg):
            return None
        return SharedExpert(cfg.d_model, cfg.shared_d_ff, cfg.shared_expert_gate)

    def moe_layers(self) -> list[RoutingCore]:
        """The routing core of every MoE layer, in depth order: what schedules switch (top_k, capacity,
        expert mask) whatever the backend."""
        return [m for m in self.modules() if isinstance(m, RoutingCore)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight from the current RNG state, in parameter order. MoE layers initialise
        themselves as a unit (router, then full expert tensors) so every backend and expert-parallel size
        starts from the same weights."""
        std = self.cfg.init_std
        # Output projections are scaled down with depth (GPT-2 style) so the residual stream starts small.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        owner = {id(p): layer for layer in self.moe_layers() for p in layer.ffn_parameters()}
        done: set[int] = set()
        for name, p in self.named_parameters():
            layer = owner.get(id(p))
            if layer is not None:
                if id(layer) not in done:
                    layer.reset_parameters(std, out_std)
                    done.add(id(layer))
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=out_std if name.endswith(("wo.weight", "w2.weight")) else std)

    def forward(self, input_ids_BS: torch.Tensor) -> ModelOutput:
        x = self.tok_emb(input_ids_BS)
        stats: list[MoEStats] = []
        for layer in self.layers:
            x, s = layer(x, self.rope_cos, self.rope_sin)
            if s is not None:
                stats.append(s)
        logits = self.lm_head(self.norm(x))
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = torch.stack([s.aux_loss for s in stats]).mean() if stats else zero
        z = torch.stack([s.z_loss for s in stats]).mean() if stats else zero
        return ModelOutput(logits, aux, z, stats)


def build_model(
    cfg: ModelConfig, moe: MoEConfig, ep_group=None, ep_size: int = 1, moe_ffn: MoEFFN = native_moe_ffn
) -> MoETransformer:
    """The model, its MoE FFNs built by ``moe_ffn`` (default: the native layer, which holds only this rank's
    experts of ``ep_group``; :func:`moetrain.backends.build_backend_model` passes the configured backend's)."""
    return MoETransformer(cfg, moe, ep_group, ep_size, moe_ffn)
