"""Typed configuration: the schema every recipe is checked against, and the validation that names the key.

The dataclasses below are registered in Hydra's ConfigStore as ``train_schema``; ``recipes/train.yaml`` lists
it first in its defaults, so every key a recipe sets is type-checked on composition and an unknown key fails.
The entry point converts the composed DictConfig into these dataclasses once (:func:`to_typed`) and calls
:func:`validate`; nothing past the entry point touches an untyped dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moetrain.config.choices import ExpertImpl

MOE_BACKENDS = ("native", "deepspeed")
DROP_POLICIES = ("probs", "position", "reroute")
SCORE_FUNCS = ("softmax", "sigmoid")
DTYPES = ("fp32", "bf16")
LR_DECAYS = ("cosine", "linear", "constant")
WANDB_MODES = ("online", "offline", "disabled")
TOKENIZERS = ("byte", "hf", "auto")  # or hf:PATH
ATTENTIONS = ("gqa", "mla")
ROPE_SCALINGS = ("default", "yarn")
QK_NORMS = ("none", "head", "full")
GROUP_SCORES = ("max", "top2_sum")
PRUNE_CRITERIA = ("frequency", "gate_weighted", "saliency")
PRUNE_RANKINGS = ("layer", "global")
LORA_TARGETS = ("router", "experts", "attention")


class ConfigError(ValueError):
    """A config value is invalid. The message is one line: ``key=value <problem>; allowed: ...``."""


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for context extension. ``default``: none. ``yarn`` (YaRN, as transformers computes
    it): per-dim blend of interpolated and original frequencies between the ``beta_fast`` / ``beta_slow``
    rotation bounds over ``original_max_position_embeddings``, cos/sin scaled by an attention factor, and
    (latent attention) the softmax scale by ``mscale(factor, mscale_all_dim)^2``."""

    type: str = "default"  # default | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # null: model.seq_len
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # null: derived from factor, mscale and mscale_all_dim
    truncate: bool = True  # round the blend range to whole dims


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3), used when ``model.attention=mla``: keys and values come
    from a ``kv_lora_rank`` latent; each head's q/k are a ``qk_nope_head_dim`` part without position and a
    ``qk_rope_head_dim`` part with RoPE (one rotary key shared by all heads)."""

    q_lora_rank: int | None = None  # null: q projected directly from x; else through a normed low-rank latent
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 256  # hidden size of each expert (and of dense FFN layers unless dense_d_ff is set)
    vocab_size: int = 257
    seq_len: int = 256
    moe_every: int = 1  # layer i (0-based) is MoE when (i + 1) % moe_every == 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # "hf:PATH": start from a local Hugging Face directory (config.json + safetensors) of a supported family
    # (docs/hf.md); its architecture replaces the model.* / moe.* architecture keys (model.seq_len stays the
    # training length)
    init_from: str | None = None
    # --- architecture variants (the imported families need them; defaults are the plain model above)
    head_dim: int | None = None  # per-head q/k/v dim; null: d_model / n_heads (Qwen3-MoE decouples them)
    dense_d_ff: int | None = None  # hidden size of dense (non-MoE) FFN layers; null: d_ff
    first_dense_layers: int = 0  # layers 0..N-1 are dense FFN layers (DeepSeek first_k_dense_replace)
    dense_layers: list[int] = field(default_factory=list)  # more dense layers by index (Qwen mlp_only_layers)
    shared_d_ff: int = 0  # hidden size of the shared-expert FFN every token takes beside the routed experts (0: none)
    shared_expert_gate: bool = False  # the shared expert's output is scaled by sigmoid(x . w) per token (Qwen2-MoE)
    attention: str = "gqa"  # gqa (grouped-query) | mla (DeepSeek multi-head latent attention, model.mla.*)
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2-MoE)
    out_bias: bool = False  # bias on the attention output projection
    qk_norm: str = "none"  # none | head (RMSNorm over each head's q/k, Qwen3-MoE) | full (over all of q / k, OLMoE)
    clip_qkv: float | None = None  # clamp q, k, v projections to [-c, c] (OLMoE)
    rope_interleave: bool = False  # rotate pairs (x[2i], x[2i+1]) (DeepSeek) instead of (x[i], x[i + Hd/2])
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)

    def __post_init__(self) -> None:
        # ModelConfig(**asdict(cfg)) round-trips (exported config.json files are read that way)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    score_func: str = "softmax"  # softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3)
    renormalize: bool = True  # gates renormalised over the chosen k (k > 1)
    # top-1 too (gate = 1.0 before scaling; Mixtral, and norm_topk_prob families at k=1). Off by default: the raw
    # top-1 probability (Switch) keeps a gradient from the LM loss to the router, a gate of 1.0 gives it none
    renormalize_top1: bool = False
    routed_scaling_factor: float = 1.0  # gates are multiplied by this (DeepSeek)
    n_group: int = 1  # group-limited routing: experts form n_group equal groups (1: off)
    topk_group: int = 1  # ... and a token may only pick experts of its topk_group best groups
    group_score: str = "max"  # a group's score: max (DeepSeek-V2) | top2_sum (DeepSeek-V3) of its experts' scores
    jitter_eps: float = 0.0  # multiplicative router-input jitter, training only
    capacity_factor: float | None = None  # None: dropless
    eval_capacity_factor: float | None = None  # capacity at validation; None: dropless
    min_capacity: int = 4
    drop_policy: str = "probs"  # probs | position | reroute
    padded: bool = False  # fixed-shape (E, C, D) expert buffers when a capacity factor is set
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # aux-loss-free balancing rate u (0: off)
    backend: str = "native"
    # how the expert FFN and the router's logits GEMM run (moetrain/kernels): auto (torch._grouped_mm where the
    # device and dtype support it, else loop) | cpu_kernel (the C++ CPU kernel, opt-in) | grouped_mm | loop
    expert_impl: ExpertImpl = ExpertImpl.auto
    a2a_chunks: int = 1  # expert-parallel dispatch split into chunks to overlap all-to-all with compute
    # Structure after expert pruning (written by the pruner, read when a pruned model is rebuilt): per MoE
    # layer the experts it keeps, as ids of the original num_experts experts, in their new order. Empty: every
    # layer has all num_experts experts.
    expert_ids: list[list[int]] = field(default_factory=list)

    def experts_in_layer(self, moe_index: int) -> int:
        """Experts of the ``moe_index``-th MoE layer (pruned layers may have fewer than ``num_experts``)."""
        return len(self.expert_ids[moe_index]) if self.expert_ids else self.num_experts


@dataclass
class DataConfig:
    # Exactly one source: the running Python's standard library (default), local files, or a hub dataset.
    path: str | None = None  # a file, a directory or a glob of .txt/.jsonl/.json/.parquet files
    hf_name: str | None = None
    hf_config: str | None = None
    text_field: str = "text"
    stdlib_glob: str = "*.py"  # which stdlib files make the embedded corpus
    # byte | hf (the tokenizer of model.init_from's directory) | hf:PATH (a local tokenizer directory) |
    # auto (hf when model.init_from's directory has a tokenizer, else byte)
    tokenizer: str = "auto"
    val_fraction: float = 0.05  # fraction of documents held out for validation (chosen by path hash)
    cache_dir: str | None = None  # default: ~/.cache/moetrain


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ParallelConfig:
    ep_size: int = 1
    zero_stage: int = 0
    dtype: str = "fp32"


@dataclass
class RampConfig:
    """A value over a stage: ``start`` (constant when ``end`` is null) or ``start -> end`` over ``steps``."""

    start: float = 0.0
    end: float | None = None
    steps: int = 0
    shape: str = "linear"  # linear | cosine


@dataclass
class StageConfig:
    name: str = "stage"
    steps: int = 1
    # runtime MoE values from this stage on: top_k, capacity_factor (null: dropless), eval_capacity_factor,
    # drop_policy, min_capacity
    moe: dict[str, Any] = field(default_factory=dict)
    aux_loss_coef: RampConfig | None = None
    z_loss_coef: RampConfig | None = None
    lr_mult: RampConfig | None = None
    trainable: str = "all"  # all | router | experts | non_experts
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch) that do not train
    prune: bool = False  # the stage starts with a pruning round (profile, prune, validate, maybe roll back)
    lora: bool = False  # only LoRA adapters (lora.*) train in this stage; merged into the weights at its end


@dataclass
class ScheduleConfig:
    warmup_steps: int = 20
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class PruneConfig:
    """Staged expert pruning; a stage with ``prune: true`` runs one round at its start."""

    profile_tokens: int = 65536  # tokens (over all ranks) whose routing is profiled before each round
    criterion: str = "frequency"  # frequency | gate_weighted | saliency
    # an expert is cold when its share of its layer's criterion total (shares sum to 1 per layer) is below this;
    # for "frequency" that is the fraction of the layer's routed tokens
    threshold: float = 0.005
    max_fraction: float = 0.25  # at most this fraction of a layer's experts (global: of all experts) per round
    min_experts: int = 2  # a layer never drops below this many experts
    ranking: str = "layer"  # layer: threshold and caps per layer | global: one ranking over every layer
    # every layer removes the same number of experts (the fewest any layer would remove): one expert count
    # for the whole model, as Hugging Face MoE configs need for export
    equal_per_layer: bool = False
    max_loss_increase: float = 0.05  # validation loss rise (nats) right after a round that triggers a rollback


@dataclass
class LoRAConfig:
    """Adapters trained in stages with ``lora: true`` (peft), merged into the base weights when the stage ends."""

    targets: list[str] = field(default_factory=lambda: ["router"])  # router | experts | attention
    rank: int = 8
    alpha: float = 16.0


@dataclass
class DistillConfig:
    """Distillation from the model as it was before the first pruning round, in every stage after it:
    ``loss = (1 - beta) * CE + beta * T^2 * KL(teacher || student)`` at temperature ``T``."""

    enabled: bool = False
    beta: float = 0.5
    temperature: float = 2.0


@dataclass
class TrainerConfig:
    max_steps: int = 200
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "none"  # none | auto | path to a checkpoint folder (or a step_* tag inside one)
    seed: int = 1234
    log_every: int = 1
    expert_stats_every: int = 25
    num_threads: int | None = None  # torch intra-op threads per rank; default: cores / local ranks


@dataclass
class WandbConfig:
    mode: str | None = None  # None: online when an API key is configured, else offline
    project: str = "moetrain"
    entity: str | None = None
    group: str | None = None
    # In a Hydra multirun every run of one sweep joins the group "<group>-<sweep id>" (just "<sweep id>" without
    # a group; the id comes from the sweep folder: multirun/2025-01-31/12-00-00 -> 2025-01-31_12-00-00), so runs
    # of one sweep are grouped together and apart from other sweeps. false: use `group` as it is.
    group_by_sweep: bool = True
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    # a finished run folder (its summary.json) shown as the reference row of the report's quality table
    baseline_run: str | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def register_configs() -> None:
    """Register the schema so ``recipes/train.yaml`` can name it first in its defaults list."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_typed(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Convert a composed config (extra ``hydra`` node ignored) into the typed tree. Nothing else: reading an
    ``hf:`` directory, choosing the tokenizer and validating happen once, in
    :func:`moetrain.interop.entry.resolve_config`."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _fail(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"{key}={value} {problem}")


def _require(cond: bool, key: str, value: Any, problem: str) -> None:
    if not cond:
        raise _fail(key, value, problem)


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, value, f"is not supported; allowed: {', '.join(allowed)}")


def _positive(key: str, value: float) -> None:
    _require(value > 0, key, value, "must be > 0")


def _one_of_or_prefixed(key: str, value: Any, allowed: tuple[str, ...], prefix: str) -> None:
    _require(
        value in allowed or str(value).startswith(prefix),
        key,
        value,
        f"is not supported; allowed: {', '.join(allowed)}, {prefix}PATH",
    )


def is_moe_layer(i: int, m: ModelConfig) -> bool:
    """Whether layer ``i`` (0-based) has a routed MoE FFN: every ``moe_every``-th layer, except the first
    ``first_dense_layers`` and those listed in ``dense_layers``."""
    return (i + 1) % m.moe_every == 0 and i >= m.first_dense_layers and i not in m.dense_layers


def _validate_architecture(m: ModelConfig) -> None:
    _one_of("model.attention", m.attention, ATTENTIONS)
    _one_of("model.qk_norm", m.qk_norm, QK_NORMS)
    if m.attention == "gqa":
        if m.head_dim is None:
            _require(
                m.d_model % m.n_heads == 0, "model.d_model", m.d_model, f"is not divisible by model.n_heads={m.n_heads}"
            )
            head_dim, key, value = m.d_model // m.n_heads, "model.d_model", m.d_model
        else:
            head_dim, key, value = m.head_dim, "model.head_dim", m.head_dim
            _positive("model.head_dim", m.head_dim)
        _require(
            head_dim % 2 == 0,
            key,
            value,
            f"gives an odd head dim {head_dim} with model.n_heads={m.n_heads}; RoPE needs it even",
        )
        _require(
            m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}"
        )
    else:
        mla = m.mla
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            _positive(f"model.mla.{name}", getattr(mla, name))
        _require(mla.qk_nope_head_dim >= 0, "model.mla.qk_nope_head_dim", mla.qk_nope_head_dim, "must be >= 0")
        _require(mla.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim", mla.qk_rope_head_dim, "must be even")
        if mla.q_lora_rank is not None:
            _positive("model.mla.q_lora_rank", mla.q_lora_rank)
        for key in ("qkv_bias", "out_bias"):
            _require(not getattr(m, key), f"model.{key}", getattr(m, key), "is not supported with model.attention=mla")
        _require(m.qk_norm == "none", "model.qk_norm", m.qk_norm, "is not supported with model.attention=mla")
        _require(m.clip_qkv is None, "model.clip_qkv", m.clip_qkv, "is not supported with model.attention=mla")
    _require(m.clip_qkv is None or m.clip_qkv > 0, "model.clip_qkv", m.clip_qkv, "must be > 0, or null")
    _one_of("model.rope_scaling.type", m.rope_scaling.type, ROPE_SCALINGS)
    if m.rope_scaling.type == "yarn":
        _positive("model.rope_scaling.factor", m.rope_scaling.factor)
    if m.dense_d_ff is not None:
        _positive("model.dense_d_ff", m.dense_d_ff)
    _require(m.first_dense_layers >= 0, "model.first_dense_layers", m.first_dense_layers, "must be >= 0")
    bad = [i for i in m.dense_layers if not 0 <= i < m.n_layers]
    _require(not bad, "model.dense_layers", m.dense_layers, f"has indices outside 0..{m.n_layers - 1}")
    _require(m.shared_d_ff >= 0, "model.shared_d_ff", m.shared_d_ff, "must be >= 0 (0: no shared expert)")
    _require(
        not m.shared_expert_gate or m.shared_d_ff > 0,
        "model.shared_expert_gate",
        m.shared_expert_gate,
        "needs a shared expert (model.shared_d_ff > 0)",
    )


def _validate_routing(moe: MoEConfig) -> None:
    _positive("moe.routed_scaling_factor", moe.routed_scaling_factor)
    _one_of("moe.group_score", moe.group_score, GROUP_SCORES)
    _require(
        moe.n_group >= 1 and moe.num_experts % moe.n_group == 0,
        "moe.n_group",
        moe.n_group,
        f"must be >= 1 and divide moe.num_experts={moe.num_experts}",
    )
    _require(
        1 <= moe.topk_group <= moe.n_group,
        "moe.topk_group",
        moe.topk_group,
        f"must be between 1 and moe.n_group={moe.n_group}",
    )
    per_group = moe.num_experts // max(moe.n_group, 1)
    if moe.n_group > 1:
        _require(
            moe.topk_group * per_group >= moe.top_k,
            "moe.topk_group",
            moe.topk_group,
            f"leaves {moe.topk_group * per_group} experts to pick from, fewer than moe.top_k={moe.top_k}",
        )
        _require(
            moe.group_score != "top2_sum" or per_group >= 2,
            "moe.group_score",
            moe.group_score,
            f"needs >= 2 experts per group (moe.num_experts={moe.num_experts}, moe.n_group={moe.n_group})",
        )


def validate(cfg: TrainConfig, world_size: int | None = None, cuda: bool | None = None) -> None:
    """Check every value that can be checked before training starts; raise :class:`ConfigError` on the first.

    ``world_size`` (when known) adds the checks that depend on the launch: ``parallel.ep_size`` must divide it.
    ``cuda`` (when known: whether the run trains on GPUs) adds the checks that depend on the device.
    """
    m, moe, p, t, d = cfg.model, cfg.moe, cfg.parallel, cfg.trainer, cfg.data
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "seq_len", "moe_every"):
        _positive(f"model.{key}", getattr(m, key))
    _validate_architecture(m)
    _require(
        m.moe_every <= m.n_layers,
        "model.moe_every",
        m.moe_every,
        f"leaves no MoE layer with model.n_layers={m.n_layers}; allowed: 1..{m.n_layers}",
    )
    _require(
        any(is_moe_layer(i, m) for i in range(m.n_layers)),
        "model.first_dense_layers",
        m.first_dense_layers,
        f"leaves no MoE layer with model.n_layers={m.n_layers}, model.dense_layers={m.dense_layers}",
    )
    _one_of_or_prefixed("data.tokenizer", d.tokenizer, TOKENIZERS, "hf:")
    _require(
        d.tokenizer != "hf" or bool(m.init_from),
        "data.tokenizer",
        d.tokenizer,
        "needs model.init_from=hf:PATH (the directory whose tokenizer it means); or use hf:PATH",
    )
    byte_tokens = d.tokenizer == "byte" or (d.tokenizer == "auto" and not m.init_from)  # auto: resolved by to_typed
    _require(
        m.vocab_size >= 257 or not byte_tokens,
        "model.vocab_size",
        m.vocab_size,
        "is smaller than the byte tokenizer's 257 ids (256 bytes + end-of-text)",
    )

    _one_of("moe.backend", moe.backend, MOE_BACKENDS)
    _require(moe.num_experts >= 1, "moe.num_experts", moe.num_experts, "must be >= 1")
    _require(
        1 <= moe.top_k <= moe.num_experts,
        "moe.top_k",
        moe.top_k,
        f"must be between 1 and moe.num_experts={moe.num_experts}",
    )
    for key in ("capacity_factor", "eval_capacity_factor"):
        value = getattr(moe, key)
        _require(value is None or value > 0, f"moe.{key}", value, "must be > 0, or null for dropless")
    _one_of("moe.drop_policy", moe.drop_policy, DROP_POLICIES)
    _one_of("moe.score_func", moe.score_func, SCORE_FUNCS)
    _require(moe.min_capacity >= 1, "moe.min_capacity", moe.min_capacity, "must be >= 1")
    _require(0 <= moe.jitter_eps < 1, "moe.jitter_eps", moe.jitter_eps, "must be in [0, 1)")
    _require(moe.bias_update_rate >= 0, "moe.bias_update_rate", moe.bias_update_rate, "must be >= 0 (0: off)")
    _require(moe.a2a_chunks >= 1, "moe.a2a_chunks", moe.a2a_chunks, "must be >= 1")
    _validate_routing(moe)
    _require(
        not (moe.padded and p.ep_size > 1),
        "moe.padded",
        moe.padded,
        f"is not supported with parallel.ep_size={p.ep_size} (the expert-parallel path is sorted); allowed: false",
    )
    _require(
        moe.backend != "deepspeed" or moe.a2a_chunks == 1,
        "moe.a2a_chunks",
        moe.a2a_chunks,
        "is not supported by moe.backend=deepspeed (DeepSpeed's layer runs one all-to-all); allowed: 1",
    )
    _require(
        not (cuda and moe.expert_impl == ExpertImpl.cpu_kernel),
        "moe.expert_impl",
        moe.expert_impl,
        "is the CPU expert kernel and this run trains on CUDA; allowed on CUDA: auto, grouped_mm, loop",
    )
    # settings of our own expert compute: DeepSpeed's layer would silently ignore them
    if moe.backend == "deepspeed":
        _require(
            not moe.padded,
            "moe.padded",
            moe.padded,
            "is not supported by moe.backend=deepspeed (its capacity buffer is always padded); allowed: false",
        )
        _require(
            moe.expert_impl == ExpertImpl.auto,
            "moe.expert_impl",
            moe.expert_impl,
            "is not supported by moe.backend=deepspeed (its experts are nn.Linear modules); allowed: auto",
        )
    for key in ("aux_loss_coef", "z_loss_coef"):
        _require(getattr(moe, key) >= 0, f"moe.{key}", getattr(moe, key), "must be >= 0")

    _require(p.ep_size >= 1, "parallel.ep_size", p.ep_size, "must be >= 1")
    _require(
        moe.num_experts % p.ep_size == 0,
        "moe.num_experts",
        moe.num_experts,
        f"is not divisible by parallel.ep_size={p.ep_size}",
    )
    if world_size is not None:
        _require(
            world_size % p.ep_size == 0, "parallel.ep_size", p.ep_size, f"does not divide the world size {world_size}"
        )
    _require(
        p.zero_stage != 3,
        "parallel.zero_stage",
        p.zero_stage,
        "is not supported with MoE layers (DeepSpeed ZeRO-3 does not partition expert-parallel "
        "parameters); allowed: 0, 1, 2",
    )
    _require(p.zero_stage in (0, 1, 2), "parallel.zero_stage", p.zero_stage, "is not supported; allowed: 0, 1, 2")
    _one_of("parallel.dtype", p.dtype, DTYPES)

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(o, key) < 1, f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")

    s = cfg.schedule
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "must be >= 0")
    _one_of("schedule.decay", s.decay, LR_DECAYS)
    _require(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")

    for key in (
        "max_steps",
        "micro_batch_size",
        "grad_accum_steps",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "expert_stats_every",
    ):
        _positive(f"trainer.{key}", getattr(t, key))
    if t.num_threads is not None:
        _positive("trainer.num_threads", t.num_threads)

    _require(
        d.hf_config is None or d.hf_name is not None,
        "data.hf_config",
        d.hf_config,
        "needs data.hf_name (it selects a configuration of that hub dataset)",
    )
    _require(
        not (d.path and d.hf_name),
        "data.hf_name",
        d.hf_name,
        f"conflicts with data.path={d.path}; set only one data source",
    )
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")

    from moetrain.train.stages import validate_stages

    validate_stages(cfg)
    _validate_structure(cfg)

    base = cfg.logging.baseline_run
    _require(
        base is None or (Path(base) / "summary.json").is_file(),
        "logging.baseline_run",
        base,
        "is not a finished run folder (no summary.json in it)",
    )
    mode = cfg.logging.wandb.mode
    if mode is not None:
        _one_of("logging.wandb.mode", mode, WANDB_MODES)


def _validate_structure(cfg: TrainConfig) -> None:
    """Pruning, LoRA and distillation settings, and a pruned structure (``moe.expert_ids``)."""
    pr, lo, di, moe = cfg.prune, cfg.lora, cfg.distill, cfg.moe
    _positive("prune.profile_tokens", pr.profile_tokens)
    _one_of("prune.criterion", pr.criterion, PRUNE_CRITERIA)
    _one_of("prune.ranking", pr.ranking, PRUNE_RANKINGS)
    _require(0 <= pr.threshold <= 1, "prune.threshold", pr.threshold, "must be in [0, 1] (a share of the layer)")
    _require(0 < pr.max_fraction < 1, "prune.max_fraction", pr.max_fraction, "must be in (0, 1)")
    _require(
        max(moe.top_k, 1) <= pr.min_experts <= moe.num_experts,
        "prune.min_experts",
        pr.min_experts,
        f"must be between moe.top_k={moe.top_k} and moe.num_experts={moe.num_experts}",
    )
    _require(pr.max_loss_increase >= 0, "prune.max_loss_increase", pr.max_loss_increase, "must be >= 0 (nats)")
    _require(
        moe.n_group == 1 or not any(st.prune for st in cfg.schedule.stages),
        "moe.n_group",
        moe.n_group,
        "is not supported with pruning stages (group-limited routing needs equal expert groups); allowed: 1",
    )
    for t in lo.targets:
        _one_of("lora.targets", t, LORA_TARGETS)
    _require(bool(lo.targets), "lora.targets", lo.targets, f"is empty; allowed: {', '.join(LORA_TARGETS)}")
    _positive("lora.rank", lo.rank)
    _positive("lora.alpha", lo.alpha)
    _require(
        not (moe.padded and "experts" in lo.targets and any(st.lora for st in cfg.schedule.stages)),
        "moe.padded",
        moe.padded,
        "is not supported with expert LoRA (lora.targets has experts; the padded path bypasses the adapters); "
        "allowed: false",
    )
    _require(0 <= di.beta <= 1, "distill.beta", di.beta, "must be in [0, 1]")
    _positive("distill.temperature", di.temperature)
    stages = cfg.schedule.stages
    if stages and stages[0].prune:
        raise ConfigError("schedule.stages[0].prune=true is not supported: a round needs a trained model to profile")
    _require(
        not di.enabled or any(st.prune for st in stages),
        "distill.enabled",
        di.enabled,
        "needs a stage with prune: true (the teacher is the model before the first pruning round)",
    )
    for j, ids in enumerate(moe.expert_ids):
        key = f"moe.expert_ids[{j}]"
        _require(len(set(ids)) == len(ids), key, ids, "repeats an expert id")
        _require(all(0 <= e < moe.num_experts for e in ids), key, ids, f"has ids outside 0..{moe.num_experts - 1}")
        _require(
            len(ids) % cfg.parallel.ep_size == 0,
            key,
            ids,
            f"keeps {len(ids)} experts, not divisible by parallel.ep_size={cfg.parallel.ep_size}",
        )
        _require(len(ids) >= moe.top_k, key, ids, f"keeps fewer experts than moe.top_k={moe.top_k}")
