"""The DeepSpeed engine around our model: config generated from the recipe, AdamW parameter groups
(MoE-aware), and the warmup + decay schedule.

DeepSpeed owns mixed precision, ZeRO partitioning, gradient accumulation, clipping and checkpoint layout.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from moetrain.backends import build_backend_model, get_backend
from moetrain.config import ParallelConfig, TrainConfig
from moetrain.train.lr import lr_multiplier
from moetrain.train.stages import StageSchedule

# loads a model's starting weights (model.init_from), given by the entry: the HF reader is a layer above
InitWeights = Callable[[nn.Module, TrainConfig], None]


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config this recipe means (``train_batch_size`` is derived by DeepSpeed)."""
    t, p = cfg.trainer, cfg.parallel
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.dtype == "bf16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if p.zero_stage > 0:
        # Keep ZeRO's reduce buckets modest: CPU/gloo runs hold them in host memory.
        ds["zero_optimization"].update(reduce_bucket_size=5e7, allgather_bucket_size=5e7, overlap_comm=False)
    return ds


def parameter_groups(model: nn.Module, weight_decay: float, schedule: StageSchedule) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors (norm weights) do not; parameters are further grouped by the
    stages that freeze them (a frozen group's learning rate is 0 in those stages). Expert-parallel parameters
    (tagged ``allreduce=False``) go to DeepSpeed's MoE groups so ZeRO reduces them over the
    expert-data-parallel group only. Every group carries ``frozen_by_stage`` for the LR schedule."""
    buckets: dict[tuple, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (p.dim() >= 2, schedule.param_frozen_pattern(name))
            buckets.setdefault(key, []).append(p)
    groups = [
        {
            "name": f"{'decay' if decay else 'no_decay'}-frozen{''.join(str(int(f)) for f in frozen)}",
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "frozen_by_stage": frozen,
        }
        for (decay, frozen), params in buckets.items()
    ]
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def build_model_for_engine(cfg: TrainConfig, init_weights: InitWeights | None = None):
    """The model on the configured backend, sharded over ``parallel.ep_size`` ranks when asked, with its
    expert-parallel parameters declared to DeepSpeed; ``init_weights(model, cfg)`` loads the starting weights
    (``model.init_from``; passed in by the entry, None: keep the fresh init). Returns (model, expert-shard
    checkpoint component or None)."""
    backend = get_backend(cfg.moe.backend)
    ep_group = backend.expert_group(cfg.parallel.ep_size)
    model = build_backend_model(backend, cfg.model, cfg.moe, ep_group, ep_size=cfg.parallel.ep_size)
    if init_weights is not None:
        init_weights(model, cfg)
    return model, prepare_model_for_engine(model, cfg)


def prepare_model_for_engine(model: nn.Module, cfg: TrainConfig):
    """Declare native expert-parallel parameters (expert weights and their adapters) to DeepSpeed; returns the
    component that checkpoints their shards (None without native expert parallelism). Run again after a
    structure change (pruning, adapters)."""
    return get_backend(cfg.moe.backend).declare_experts(model, cfg.parallel.ep_size)


def group_lr_factor(step: int, cfg: TrainConfig, stages: StageSchedule, frozen_by_stage: tuple[bool, ...]) -> float:
    """LR multiplier of one parameter group at ``step``: warmup/decay x the stage's LR ramp (0 when frozen)."""
    return lr_multiplier(step, cfg.schedule, cfg.trainer.max_steps) * stages.lr_factor(step, frozen_by_stage)


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Put a step-indexed LR schedule at ``step`` (every group's LR set from its lambda; nothing else moves)."""
    import warnings

    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def build_engine(model: nn.Module, cfg: TrainConfig, stages: StageSchedule):
    """``deepspeed.initialize`` with our optimizer and per-group LR schedule; returns the engine."""
    import deepspeed

    o = cfg.optim
    groups = parameter_groups(model, o.weight_decay, stages)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    lambdas = [partial(group_lr_factor, cfg=cfg, stages=stages, frozen_by_stage=g["frozen_by_stage"]) for g in groups]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
    )
    return engine


def grad_norm_before_clipping(model: nn.Module, moe_layers: list, parallel: ParallelConfig) -> float:
    """Global L2 norm of the gradients before clipping, read after DeepSpeed's gradient all-reduce (NaN where
    the engine's optimizer measures it during ``step``: ZeRO and bf16, ``get_global_grad_norm`` after).

    For plain fp32 ZeRO-0 the averaged gradients are on every rank: replicated parameters count once,
    expert-parallel shards are summed over their expert-parallel group.
    """
    if parallel.zero_stage > 0 or parallel.dtype != "fp32":
        return float("nan")
    sq = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            sq[int(getattr(p, "allreduce", True) is False)] += p.grad.detach().double().pow(2).sum().cpu()
    ep_group = moe_layers[0].ep_group if moe_layers else None
    if ep_group is not None:
        expert_sq = sq[1:].clone()
        torch.distributed.all_reduce(expert_sq, group=ep_group)
        sq[1] = expert_sq[0]
    return float(sq.sum().sqrt())
