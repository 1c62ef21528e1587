"""Typed configuration: the schema every recipe is checked against, and the validation that names the key.

The dataclasses below are registered in Hydra's ConfigStore as ``train_schema``; ``recipes/train.yaml`` lists
it first in its defaults, so every key a recipe sets is type-checked on composition and an unknown key fails.
String choices are Enums (:mod:`moetrain.config.choices`), so a bad one fails on composition too, with the
allowed values. The entry point converts the composed DictConfig into these dataclasses once (:func:`to_typed`)
and calls :func:`~moetrain.config.validate.validate`; nothing past the entry point touches an untyped dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from moetrain.config.choices import (
    Attention,
    DistillTeacher,
    DropPolicy,
    DType,
    ExpertImpl,
    GroupScore,
    LoRATarget,
    LRDecay,
    MoEBackend,
    PruneCriterion,
    PruneMode,
    PruneRanking,
    QKNorm,
    RampShape,
    RecoverTrainable,
    RopeScaling,
    ScoreFunc,
    Trainable,
    WandbMode,
)

# the allowed values of each choice, as plain strings (for modules that check or list them)
MOE_BACKENDS = MoEBackend.values()
DROP_POLICIES = DropPolicy.values()
SCORE_FUNCS = ScoreFunc.values()
DTYPES = DType.values()
LR_DECAYS = LRDecay.values()
WANDB_MODES = WandbMode.values()
TOKENIZERS = ("byte", "hf", "auto")  # or hf:PATH: free-form, so a plain string checked by validate()
ATTENTIONS = Attention.values()
ROPE_SCALINGS = RopeScaling.values()
QK_NORMS = QKNorm.values()
GROUP_SCORES = GroupScore.values()
PRUNE_CRITERIA = PruneCriterion.values()
PRUNE_RANKINGS = PruneRanking.values()
LORA_TARGETS = LoRATarget.values()
RAMP_SHAPES = RampShape.values()
TRAINABLE = Trainable.values()


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for context extension. ``default``: none. ``yarn`` (YaRN, as transformers computes
    it): per-dim blend of interpolated and original frequencies between the ``beta_fast`` / ``beta_slow``
    rotation bounds over ``original_max_position_embeddings``, cos/sin scaled by an attention factor, and
    (latent attention) the softmax scale by ``mscale(factor, mscale_all_dim)^2``."""

    type: RopeScaling = RopeScaling.default
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
    # gqa (grouped-query) | mla (DeepSeek multi-head latent attention, model.mla.*)
    attention: Attention = Attention.gqa
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2-MoE)
    out_bias: bool = False  # bias on the attention output projection
    # none | head (RMSNorm over each head's q/k, Qwen3-MoE) | full (over all of q / k, OLMoE)
    qk_norm: QKNorm = QKNorm.none
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
    score_func: ScoreFunc = ScoreFunc.softmax  # softmax (Switch, Mixtral) | sigmoid (DeepSeek-V3)
    renormalize: bool = True  # gates renormalised over the chosen k (k > 1)
    # top-1 too (gate = 1.0 before scaling; Mixtral, and norm_topk_prob families at k=1). Off by default: the raw
    # top-1 probability (Switch) keeps a gradient from the LM loss to the router, a gate of 1.0 gives it none
    renormalize_top1: bool = False
    routed_scaling_factor: float = 1.0  # gates are multiplied by this (DeepSeek)
    n_group: int = 1  # group-limited routing: experts form n_group equal groups (1: off)
    topk_group: int = 1  # ... and a token may only pick experts of its topk_group best groups
    # a group's score: max (DeepSeek-V2) | top2_sum (DeepSeek-V3) of its experts' scores
    group_score: GroupScore = GroupScore.max
    jitter_eps: float = 0.0  # multiplicative router-input jitter, training only
    capacity_factor: float | None = None  # None: dropless
    eval_capacity_factor: float | None = None  # capacity at validation; None: dropless
    min_capacity: int = 4
    drop_policy: DropPolicy = DropPolicy.probs  # probs | position | reroute
    padded: bool = False  # fixed-shape (E, C, D) expert buffers when a capacity factor is set
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # aux-loss-free balancing rate u (0: off)
    backend: MoEBackend = MoEBackend.native
    # how the expert FFN runs (moetrain/kernels): auto (torch._grouped_mm where the device and dtype support it,
    # else loop) | grouped_mm | loop
    expert_impl: ExpertImpl = ExpertImpl.auto
    a2a_chunks: int = 1  # expert-parallel dispatch split into chunks to overlap all-to-all with compute
    # Structure after expert pruning (written by the pruner, read when a pruned model is rebuilt): per MoE
    # layer the experts it keeps, as ids of the original num_experts experts, in their new order. Empty: every
    # layer has all num_experts experts. A MoNE constant (prune.mode=mone: the router still picks it, its output
    # is a fixed vector) of original expert e is written -(e + 1); constants come after the layer's experts.
    expert_ids: list[list[int]] = field(default_factory=list)

    def experts_in_layer(self, moe_index: int) -> int:
        """Router slots of the ``moe_index``-th MoE layer (pruned layers may have fewer than ``num_experts``)."""
        return len(self.expert_ids[moe_index]) if self.expert_ids else self.num_experts

    def constants_in_layer(self, moe_index: int) -> int:
        """MoNE constants among the ``moe_index``-th MoE layer's router slots (the last ones)."""
        return sum(1 for e in self.expert_ids[moe_index] if e < 0) if self.expert_ids else 0


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
    dtype: DType = DType.fp32


@dataclass
class RampConfig:
    """A value over a stage: ``start`` (constant when ``end`` is null) or ``start -> end`` over ``steps``."""

    start: float = 0.0
    end: float | None = None
    steps: int = 0
    shape: RampShape = RampShape.linear  # linear | cosine


@dataclass(init=False, repr=False)
class StageMoEConfig:
    """The runtime MoE values a stage changes (from its start on, until a later stage changes them again).

    A key the stage does not set is MISSING (``???``), which is not null: ``capacity_factor: null`` sets
    dropless. The fields are ``init=False`` so that :func:`omegaconf.OmegaConf.to_object` leaves missing ones
    out instead of failing; construct with keywords, ``StageMoEConfig(top_k=1)``, and read the set values with
    :meth:`overrides`. An unknown key fails on composition (the node is typed)."""

    top_k: int = field(default=MISSING, init=False)
    capacity_factor: float | None = field(default=MISSING, init=False)  # null: dropless
    eval_capacity_factor: float | None = field(default=MISSING, init=False)  # null: dropless at validation
    drop_policy: DropPolicy = field(default=MISSING, init=False)
    min_capacity: int = field(default=MISSING, init=False)

    def __init__(self, **values: Any) -> None:
        for f in fields(self):
            setattr(self, f.name, values.pop(f.name, MISSING))
        if values:
            raise TypeError(f"StageMoEConfig has no key {', '.join(values)}; allowed: {', '.join(RUNTIME_MOE_KEYS)}")

    def overrides(self) -> dict[str, Any]:
        """The values this stage sets, by key (a key set to null is set)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) != MISSING}

    def __repr__(self) -> str:
        return f"StageMoEConfig({', '.join(f'{k}={v!r}' for k, v in self.overrides().items())})"


# MoE values a stage may change at run time without rebuilding the model
RUNTIME_MOE_KEYS = tuple(f.name for f in fields(StageMoEConfig))


@dataclass
class StageConfig:
    name: str = "stage"
    steps: int = 1
    # runtime MoE values from this stage on: top_k, capacity_factor (null: dropless), eval_capacity_factor,
    # drop_policy, min_capacity
    moe: StageMoEConfig = field(default_factory=StageMoEConfig)
    aux_loss_coef: RampConfig | None = None
    z_loss_coef: RampConfig | None = None
    lr_mult: RampConfig | None = None
    trainable: Trainable = Trainable.all  # all | router | experts | non_experts
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch) that do not train
    prune: bool = False  # the stage starts with a pruning round (profile, prune, validate, maybe roll back)
    lora: bool = False  # only LoRA adapters (lora.*) train in this stage; merged into the weights at its end
    recover: bool = False  # a recovery stage: it trains what recover.trainable names (sets trainable / lora)

    def __post_init__(self) -> None:
        # StageConfig(moe={"top_k": 1}) and StageConfig(**asdict(stage)) (unset keys are "???") build the tree
        if isinstance(self.moe, dict):
            self.moe = StageMoEConfig(**self.moe)
        for key in ("aux_loss_coef", "z_loss_coef", "lr_mult"):
            if isinstance(getattr(self, key), dict):
                setattr(self, key, RampConfig(**getattr(self, key)))


@dataclass
class ScheduleConfig:
    warmup_steps: int = 20
    decay: LRDecay = LRDecay.cosine
    min_lr_ratio: float = 0.1
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class PruneConfig:
    """Staged expert pruning; a stage with ``prune: true`` runs one round at its start."""

    profile_tokens: int = 65536  # tokens (over all ranks) whose routing is profiled before each round
    criterion: PruneCriterion = PruneCriterion.frequency  # frequency | gate_mass | reap | ean | random | reconstruction
    seed: int = 0  # the random criterion's seed
    # an expert is cold when its share of its layer's criterion total (shares sum to 1 per layer) is below this;
    # for "frequency" that is the fraction of the layer's routed tokens
    threshold: float = 0.005
    max_fraction: float = 0.25  # at most this fraction of a layer's experts (global: of all experts) per round
    min_experts: int = 2  # a layer never drops below this many experts
    # layer: threshold and caps per layer | global: one ranking over every layer
    ranking: PruneRanking = PruneRanking.layer
    # every layer removes the same number of experts (the fewest any layer would remove): one expert count
    # for the whole model, as Hugging Face MoE configs need for export
    equal_per_layer: bool = False
    max_loss_increase: float = 0.05  # validation loss rise (nats) right after a round that triggers a rollback
    # a budget instead of the threshold and max_fraction: experts each layer keeps after round i (keep[i]; [6, 4]:
    # staged 8 -> 6 -> 4), or the fraction of its experts (global: of all, ranked together) each round removes
    keep: list[int] = field(default_factory=list)
    remove_fraction: float | None = None
    # drop: the cut experts go | merge: each folds into the survivor with the closest mean output (docs/pruning.md)
    mode: PruneMode = PruneMode.drop
    merge_tokens: int = 4096  # calibration tokens of merging and of the reconstruction criterion


@dataclass
class LoRAConfig:
    """Adapters trained in stages with ``lora: true`` (peft), merged into the base weights when the stage ends."""

    targets: list[LoRATarget] = field(default_factory=lambda: [LoRATarget.router])  # router | experts | attention
    rank: int = 8
    alpha: float = 16.0


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher, in every step it exists: ``loss = (1 - beta) * CE + beta * T^2 *
    KL(teacher || student)`` at temperature ``T``. ``teacher``: pre_prune (a copy taken before the first
    pruning round) | base (the step-0 model; also the reference of every validation, even when not enabled)."""

    enabled: bool = False
    teacher: DistillTeacher = DistillTeacher.pre_prune
    beta: float = 0.5
    temperature: float = 2.0


@dataclass
class RecoverConfig:
    """Recovery after a structure change (``+recipe=compress``): what the stages with ``recover: true`` train, with
    or without distillation (``distill.enabled``), and the quality the run must end with."""

    trainable: RecoverTrainable = RecoverTrainable.full  # router | lora | full
    # the largest NLL gap to the base model (distill.teacher=base) the final model may have, in % of the base's
    # NLL on the same validation tokens; summary.json says whether it was met (null: no tolerance)
    max_nll_gap_pct: float | None = None


@dataclass
class ExportConfig:
    """What the run writes at its end besides ``export/`` (the native layout, always written)."""

    # the final model as a Hugging Face directory ``hf/`` in the run folder, in the layout of ``family`` (default:
    # the family of ``model.init_from=hf:DIR``), measured against the base after transformers loads it back
    hf: bool = False
    family: str | None = None


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
    throughput_rounds: int = 5  # with a reference: rounds timing base vs final model at the end (0: off)
    # one device's peak dense TFLOP/s in the run's dtype, for train/mfu; null: read from the device's name where
    # known (metrics/flops.py PEAK_TFLOPS), else no MFU
    peak_tflops: float | None = None


@dataclass
class WandbConfig:
    mode: WandbMode | None = None  # None: online when an API key is configured, else offline
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
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


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


def is_moe_layer(i: int, m: ModelConfig) -> bool:
    """Whether layer ``i`` (0-based) has a routed MoE FFN: every ``moe_every``-th layer, except the first
    ``first_dense_layers`` and those listed in ``dense_layers``."""
    return (i + 1) % m.moe_every == 0 and i >= m.first_dense_layers and i not in m.dense_layers
