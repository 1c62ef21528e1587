"""Attention: rotary position embeddings, grouped-query attention (with the variants the imported families
use) and DeepSeek's multi-head latent attention.

Shape legend: B batch, S sequence, D model dim, H query heads, G key/value heads, Hd head dim, R rotary dim,
L latent (low-rank) dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config import ModelConfig, RopeScalingConfig

# DeepSeek normalises its q and kv latents with RMSNorm at a fixed eps (its reference code and transformers
# alike), not the model's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_frequencies(dim: int, theta: float, s: RopeScalingConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and cos/sin factor (transformers' ``_compute_yarn_parameters``).

    With ``f_i = theta^(-2i/dim)`` and ``L`` the original context: the dims between ``low`` and ``high`` (where
    ``d(r) = dim * ln(L / (2 pi r)) / (2 ln theta)`` for r = beta_fast, beta_slow) blend linearly from ``f_i``
    (extrapolated, below ``low``) to ``f_i / factor`` (interpolated, above ``high``). The factor on cos/sin is
    ``attention_factor``, else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set,
    else ``mscale(factor)``.
    """
    L = s.original_max_position_embeddings or seq_len
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = (1.0 / (s.factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1 - ramp)
    factor = s.attention_factor
    if factor is None:
        if s.mscale and s.mscale_all_dim:
            factor = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
        else:
            factor = yarn_mscale(s.factor)
    return inv_freq, factor


def rope_tables(
    seq_len: int, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if scaling is not None and scaling.type == "yarn":
        inv_freq, factor = yarn_frequencies(head_dim, theta, scaling, seq_len)
    else:
        inv_freq, factor = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)), 1.0
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return (angles_SH.cos() * factor).float(), (angles_SH.sin() * factor).float()


def apply_rope(x_BHSd: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + Hd/2]) by position-dependent angles (the "rotate half" convention)."""
    S = x_BHSd.shape[-2]
    cos, sin = cos_SH[:S].to(x_BHSd.dtype), sin_SH[:S].to(x_BHSd.dtype)
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_interleaved(x_BHSd: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) (DeepSeek's layout). The output lists the rotated even dims, then the odd
    ones (as transformers' DeepSeek-V3 does): q and k are permuted alike, so their dot products are those of
    the interleaved rotation."""
    S = x_BHSd.shape[-2]
    cos, sin = cos_SH[:S].to(x_BHSd.dtype), sin_SH[:S].to(x_BHSd.dtype)
    x1, x2 = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_dim(cfg: ModelConfig) -> int:
    """How many dims of each query/key head are rotated."""
    if cfg.attention == "mla":
        return cfg.mla.qk_rope_head_dim
    return cfg.head_dim or cfg.d_model // cfg.n_heads


class Attention(nn.Module):
    """Grouped-query attention. Variants (config keys): ``head_dim`` decoupled from ``d_model / n_heads``,
    ``qkv_bias`` / ``out_bias``, ``qk_norm`` (RMSNorm of q and k per head, or over the whole projection),
    ``clip_qkv``, ``rope_interleave``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        q_dim, kv_dim = cfg.n_heads * self.head_dim, cfg.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else q_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv_dim, eps=cfg.norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos_SH, sin_SH), self.rope(k, cos_SH, sin_SH)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, ``model.attention=mla``).

    ``q = W_q x`` or, with ``q_lora_rank``, ``W_qb norm(W_qa x)``; each head's q is a ``qk_nope_head_dim`` part
    and a ``qk_rope_head_dim`` part. ``[c, k_rot] = W_kva x``: ``c`` the ``kv_lora_rank`` latent, ``k_rot`` one
    rotary key shared by every head. ``[k_nope, v] = W_kvb norm(c)`` per head. Scores scale by
    ``(qk_nope_head_dim + qk_rope_head_dim)^-1/2``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        mla, D, H = cfg.mla, cfg.d_model, cfg.n_heads
        self.n_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_rank = mla.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        self.q_lora = mla.q_lora_rank is not None
        if self.q_lora:
            self.wq_a = nn.Linear(D, mla.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(mla.q_lora_rank, eps=LATENT_NORM_EPS)
            self.wq_b = nn.Linear(mla.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.scale = qk_dim**-0.5
        yarn = cfg.rope_scaling
        if yarn.type == "yarn" and yarn.mscale_all_dim:  # DeepSeek's YaRN also sharpens the softmax
            self.scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
        self.rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if self.q_lora else self.wq(x_BSD)
        q_nope, q_rot = q.view(B, S, H, -1).transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        c_BSL, k_rot = self.wkv_a(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_BSL)).view(B, S, H, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_rot = self.rope(q_rot, cos_SR, sin_SR)
        k_rot = self.rope(k_rot.view(B, 1, S, self.rope_dim), cos_SR, sin_SR).expand(B, H, S, self.rope_dim)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, H * self.v_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
