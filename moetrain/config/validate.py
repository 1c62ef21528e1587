"""Pure validation of a typed config: every value that can be checked before training starts, each failure
one line that names the key (:class:`~moetrain.config.errors.ConfigError`). String choices are not checked
here: they are Enums, which OmegaConf checks on composition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrain.config.choices import ExpertImpl
from moetrain.config.errors import ConfigError
from moetrain.config.schema import (
    LORA_TARGETS,
    TOKENIZERS,
    ModelConfig,
    MoEConfig,
    TrainConfig,
    is_moe_layer,
)
from moetrain.config.stages import validate_stages


def _fail(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(f"{key}={value} {problem}")


def _require(cond: bool, key: str, value: Any, problem: str) -> None:
    if not cond:
        raise _fail(key, value, problem)


def _positive(key: str, value: float) -> None:
    _require(value > 0, key, value, "must be > 0")


def _one_of_or_prefixed(key: str, value: Any, allowed: tuple[str, ...], prefix: str) -> None:
    _require(
        value in allowed or str(value).startswith(prefix),
        key,
        value,
        f"is not supported; allowed: {', '.join(allowed)}, {prefix}PATH",
    )


def _validate_architecture(m: ModelConfig) -> None:
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


def _dropless(cfg: TrainConfig) -> bool:
    """No capacity anywhere: not in ``moe``, not in a stage's runtime override, not padded."""
    moe = cfg.moe
    stage_factors = [
        v for st in cfg.schedule.stages for k, v in st.moe.overrides().items() if k.endswith("capacity_factor")
    ]
    return (
        moe.capacity_factor is None
        and moe.eval_capacity_factor is None
        and not moe.padded
        and not any(f is not None for f in stage_factors)
    )


def _validate_megablocks(cfg: TrainConfig, cuda: bool | None) -> None:
    """What MegaBlocks' dropless MLP behind our router supports (moetrain/backends/megablocks.py)."""
    moe, key = cfg.moe, "moe.backend"
    _require(cuda is not False, key, moe.backend, "needs CUDA (MegaBlocks' kernels build and run only on NVIDIA "
             "GPUs); allowed on this machine: native, deepspeed")  # fmt: skip
    _require(
        _dropless(cfg),
        key,
        moe.backend,
        "is dropless: it needs moe.capacity_factor=null, moe.eval_capacity_factor=null, moe.padded=false and no "
        "stage that sets a capacity factor",
    )
    _require(cfg.parallel.ep_size == 1, key, moe.backend, "supports parallel.ep_size=1 only; allowed: 1")
    _require(
        not any(st.prune for st in cfg.schedule.stages),
        key,
        moe.backend,
        "has no expert surgery (pruning, merging) on its GLU matrices; allowed with prune stages: native, deepspeed",
    )
    _require(
        "experts" not in cfg.lora.targets or not any(st.lora for st in cfg.schedule.stages),
        key,
        moe.backend,
        "has no LoRA on its GLU matrices; allowed: lora.targets without experts",
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
    _require(
        cuda is not False or moe.expert_impl != ExpertImpl.triton,
        "moe.expert_impl",
        moe.expert_impl,
        "needs a CUDA GPU (DeepSpeed's Triton grouped GEMM); allowed here: auto, grouped_mm, loop",
    )
    if moe.backend == "megablocks":
        _validate_megablocks(cfg, cuda)
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

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(o, key) < 1, f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")

    s = cfg.schedule
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "must be >= 0")
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
    _require(t.throughput_rounds >= 0, "trainer.throughput_rounds", t.throughput_rounds, "must be >= 0 (0: off)")
    gap = cfg.recover.max_nll_gap_pct
    _require(gap is None or gap >= 0, "recover.max_nll_gap_pct", gap, "must be >= 0 (% of the base's NLL), or null")
    _require(
        gap is None or cfg.distill.teacher == "base",
        "recover.max_nll_gap_pct",
        gap,
        "needs a base model to compare with; allowed: distill.teacher=base (as +recipe=compress sets), or null",
    )

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

    validate_stages(cfg)
    _validate_structure(cfg)

    base = cfg.logging.baseline_run
    _require(
        base is None or (Path(base) / "summary.json").is_file(),
        "logging.baseline_run",
        base,
        "is not a finished run folder (no summary.json in it)",
    )


def _validate_structure(cfg: TrainConfig) -> None:
    """Pruning, LoRA and distillation settings, and a pruned structure (``moe.expert_ids``)."""
    pr, lo, di, moe = cfg.prune, cfg.lora, cfg.distill, cfg.moe
    _positive("prune.profile_tokens", pr.profile_tokens)
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
        not (pr.keep and pr.remove_fraction is not None),
        "prune.remove_fraction",
        pr.remove_fraction,
        f"conflicts with prune.keep={pr.keep}; set one budget",
    )
    _require(
        all(pr.min_experts <= k <= moe.num_experts for k in pr.keep) and pr.keep == sorted(pr.keep, reverse=True),
        "prune.keep",
        pr.keep,
        f"must not rise from round to round and stay between prune.min_experts={pr.min_experts} and "
        f"moe.num_experts={moe.num_experts}",
    )
    rounds = sum(bool(st.prune) for st in cfg.schedule.stages)
    _require(
        not pr.keep or len(pr.keep) >= rounds,
        "prune.keep",
        pr.keep,
        f"has {len(pr.keep)} entries for {rounds} pruning stages; allowed: one per round",
    )
    _positive("prune.merge_tokens", pr.merge_tokens)
    _require(
        pr.criterion != "reconstruction" or bool(pr.keep) or pr.remove_fraction is not None,
        "prune.criterion",
        pr.criterion,
        "orders experts, it gives no shares for prune.threshold; set prune.keep or prune.remove_fraction",
    )
    if pr.mode == "mone" and any(st.prune for st in cfg.schedule.stages):
        _require(
            moe.backend == "native", "prune.mode", pr.mode, "needs moe.backend=native (its constants live in our layer)"
        )
        _require(
            cfg.parallel.ep_size == 1,
            "prune.mode",
            pr.mode,
            "needs parallel.ep_size=1 (constants are not laid out over ranks)",
        )
        _require(
            _dropless(cfg),
            "prune.mode",
            pr.mode,
            "needs dropless routing (moe.capacity_factor=null, moe.eval_capacity_factor=null, moe.padded=false, no "
            "stage that sets a capacity factor)",
        )
        _require(
            sum(1 for st in cfg.schedule.stages if st.prune) == 1,
            "prune.mode",
            pr.mode,
            "supports one pruning stage (a later round would have to cut constants); allowed: one stage with "
            "prune: true",
        )
    _require(
        not (pr.ranking == "global" and pr.equal_per_layer),
        "prune.ranking",
        pr.ranking,
        "gives layers uneven expert counts; it conflicts with prune.equal_per_layer=true (set it false)",
    )
    _require(
        pr.remove_fraction is None or 0 < pr.remove_fraction < 1,
        "prune.remove_fraction",
        pr.remove_fraction,
        "must be in (0, 1), or null",
    )
    _require(
        moe.n_group == 1 or not any(st.prune for st in cfg.schedule.stages),
        "moe.n_group",
        moe.n_group,
        "is not supported with pruning stages (group-limited routing needs equal expert groups); allowed: 1",
    )
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
        not di.enabled or di.teacher == "base" or any(st.prune for st in stages),
        "distill.enabled",
        di.enabled,
        "needs a stage with prune: true (distill.teacher=pre_prune is the model before the first pruning round); "
        "allowed: such a stage, or distill.teacher=base",
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
