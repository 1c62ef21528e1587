"""The DeepSpeed engine around our model: config generated from the recipe, AdamW parameter groups
(MoE-aware), and the warmup + decay schedule.

DeepSpeed owns mixed precision, ZeRO partitioning, gradient accumulation, clipping and checkpoint layout.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from moetrain.config import TrainConfig
from moetrain.lr import lr_multiplier


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


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors (norm weights) do not. Expert-parallel parameters (marked
    ``allreduce=False`` by the layer that shards them) are split into their own groups with DeepSpeed's
    helper so ZeRO reduces them over the expert-data-parallel group only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_model_for_engine(cfg: TrainConfig):
    """The model, sharded over ``parallel.ep_size`` ranks when asked, with its expert-parallel parameters
    declared to DeepSpeed. Returns (model, expert-shard checkpoint component or None)."""
    from moetrain.model import build_model

    if cfg.moe.backend == "deepspeed":  # DeepSpeed's layer tags its experts and checkpoints them per expert
        return build_model(cfg.model, cfg.moe, ep_size=cfg.parallel.ep_size), None
    if cfg.parallel.ep_size == 1:
        return build_model(cfg.model, cfg.moe), None
    from moetrain.backends.deepspeed_ep import ExpertShards, create_expert_parallel_groups, mark_expert_parameters

    model = build_model(cfg.model, cfg.moe, create_expert_parallel_groups(cfg.parallel.ep_size))
    mark_expert_parameters(model, cfg.parallel.ep_size)
    return model, ExpertShards(model, cfg.parallel.ep_size)


def build_engine(model: nn.Module, cfg: TrainConfig):
    """``deepspeed.initialize`` with our optimizer and LR schedule; returns the engine."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, schedule=cfg.schedule, max_steps=cfg.trainer.max_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
    )
    return engine
