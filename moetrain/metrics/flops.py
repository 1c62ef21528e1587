"""Forward FLOPs per token of a model config at a given top-k, by part of the model.

A multiply-add is 2 FLOPs; only matrix products are counted (what ``torch.utils.flop_counter.FlopCounterMode``
counts): norms, RoPE, softmax, SiLU, gate scaling and residual adds are left out, as is the embedding lookup.
Letters: D model dim, V vocab, S sequence length (``model.seq_len``), H query heads, G key/value heads, Hd head
dim, F expert hidden dim, E experts of the layer, k experts per token. Per layer:

- attention projections (grouped-query): ``2 D H Hd`` (q) + ``2 * 2 D G Hd`` (k, v) + ``2 H Hd D`` (o);
  latent attention (``model.attention=mla``, r the rotary and n the non-rotary q/k head dims, Hv the value head
  dim, Lq / Lkv the q / kv latent ranks): q ``2 D H (n + r)``, or ``2 D Lq + 2 Lq H (n + r)`` with a q latent;
  ``2 D (Lkv + r)`` (kv latent and shared rotary key); ``2 Lkv H (n + Hv)`` (keys and values from the latent);
  ``2 H Hv D`` (o);
- attention scores: ``2 S H Hd`` (q . k over S keys) + ``2 S H Hd`` (weights x values); MLA: ``2 S H (n + r)``
  + ``2 S H Hv``. Every token is charged the full S keys, as a non-causal attention kernel (and FlopCounterMode
  on SDPA's math path) computes them; a kernel that skips the masked half does ``(S + 1) / 2`` on average;
- MoE layers: router ``2 D E``; routed experts ``k * 3 * 2 D F`` (SwiGLU: w1, w3, w2); shared experts
  ``3 * 2 D Fs`` (+ ``2 D`` for a Qwen2-MoE shared-expert gate);
- dense layers (``moe_every``, ``first_dense_layers``, ``dense_layers``): ``3 * 2 D Fd``, Fd = ``dense_d_ff``
  or ``d_ff``;

and once: the LM head ``2 D V``. A training step's forward is ``tokens x total``; its backward is about twice
that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from moetrain.config import ModelConfig, MoEConfig, is_moe_layer


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs per token, by part (summed over layers)."""

    attn_proj: float
    attn_scores: float
    router: float
    experts: float
    shared_experts: float
    dense_ffn: float
    lm_head: float

    @property
    def total(self) -> float:
        return float(sum(getattr(self, f.name) for f in fields(self)))

    @property
    def expert_share(self) -> float:
        """Routed experts' share of the forward FLOPs: ``experts / total``."""
        return self.experts / self.total

    def as_dict(self) -> dict[str, float]:
        """Every part, the total and the expert share (for JSON metadata and reports)."""
        return {**asdict(self), "total": self.total, "expert_share": self.expert_share}


def attention_flops(m: ModelConfig) -> tuple[float, float]:
    """One layer's (projections, scores) FLOPs per token (module docstring)."""
    D, H, S = m.d_model, m.n_heads, m.seq_len
    if m.attention == "mla":
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = 2 * D * a.q_lora_rank + 2 * a.q_lora_rank * H * qk if a.q_lora_rank is not None else 2 * D * H * qk
        kv = 2 * D * (a.kv_lora_rank + a.qk_rope_head_dim) + 2 * a.kv_lora_rank * H * (
            a.qk_nope_head_dim + a.v_head_dim
        )
        out = 2 * H * a.v_head_dim * D
        return float(q + kv + out), float(2 * S * H * qk + 2 * S * H * a.v_head_dim)
    Hd = m.head_dim or D // H
    proj = 2 * D * H * Hd + 2 * 2 * D * m.n_kv_heads * Hd + 2 * H * Hd * D
    return float(proj), float(2 * 2 * S * H * Hd)


def forward_flops_per_token(model: ModelConfig, moe: MoEConfig, top_k: int | None = None) -> FlopsBreakdown:
    """Forward FLOPs per token of ``model`` / ``moe`` with ``top_k`` experts per token (default ``moe.top_k``);
    a pruned model (``moe.expert_ids``) has its own expert count per MoE layer, which only the router sees."""
    k = moe.top_k if top_k is None else top_k
    if not 1 <= k <= moe.num_experts:
        raise ValueError(f"top_k={k} is not between 1 and moe.num_experts={moe.num_experts}")
    D = model.d_model
    proj, scores = attention_flops(model)
    router = experts = shared = dense = 0.0
    moe_index = 0
    for i in range(model.n_layers):
        if is_moe_layer(i, model):
            router += 2 * D * moe.experts_in_layer(moe_index)
            experts += k * 3 * 2 * D * model.d_ff
            if model.shared_d_ff > 0:
                shared += 3 * 2 * D * model.shared_d_ff + (2 * D if model.shared_expert_gate else 0)
            moe_index += 1
        else:
            dense += 3 * 2 * D * (model.dense_d_ff or model.d_ff)
    n = model.n_layers
    return FlopsBreakdown(
        attn_proj=n * proj,
        attn_scores=n * scores,
        router=float(router),
        experts=float(experts),
        shared_experts=float(shared),
        dense_ffn=float(dense),
        lm_head=float(2 * D * model.vocab_size),
    )


# dense bf16 / fp16 tensor-core peak TFLOP/s of one device (vendor datasheets, without sparsity), matched against
# torch.cuda.get_device_name() in this order: the first name contained in it
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A6000", 155.0),
    ("A10G", 70.0),
)
HALF_DTYPES = ("bf16", "fp16")


def device_peak_tflops(device_name: str | None, dtype: str) -> float | None:
    """One device's dense peak TFLOP/s in ``dtype`` (``parallel.dtype``), when its name is in
    :data:`PEAK_TFLOPS` and the dtype runs on tensor cores at that rate (bf16, fp16); else None."""
    if device_name is None or dtype not in HALF_DTYPES:
        return None
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def training_flops_per_token(model: ModelConfig, moe: MoEConfig) -> Callable[[int], float]:
    """Model FLOPs of one training token at a top-k (forward + backward = 3 x the forward's matrix products),
    for MFU: ``tokens/s x this / (peak FLOP/s x devices)``."""
    return lambda top_k: 3 * forward_flops_per_token(model, moe, top_k).total
