"""``moe.backend=deepspeed``: DeepSpeed's MoE layer with our router as its gate (deepspeed_moe.py); DeepSpeed
creates the expert-parallel groups when the engine starts and checkpoints the experts one file each."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import ModelConfig, MoEConfig


class DeepSpeedBackend:
    name = "deepspeed"

    def moe_ffn(self, cfg: ModelConfig, moe: MoEConfig, ep_group: dist.ProcessGroup | None, ep_size: int) -> nn.Module:
        from moetrain.backends.deepspeed_moe import DeepSpeedMoELayer

        # DeepSpeed's expert-parallel groups are consecutive ranks: the expert-parallel rank is rank % size
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return DeepSpeedMoELayer(cfg.d_model, cfg.d_ff, moe, ep_size, rank % ep_size)

    def expert_group(self, ep_size: int) -> dist.ProcessGroup | None:
        return None  # the layers get their group when the engine starts

    def declare_experts(self, model: nn.Module, ep_size: int) -> Any | None:
        return None  # DeepSpeed's layer tags its experts and checkpoints them per expert

    def join_groups(self, model: nn.Module) -> None:
        import deepspeed
        from deepspeed.moe.layer import MoE

        # a copy made before the engine starts (the base kept as teacher) needs DeepSpeed's comm layer up: it
        # wraps the process group the run already has, which the engine would otherwise do at its start
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        for m in model.modules():
            if isinstance(m, MoE):
                m.set_deepspeed_parallelism()

    def lora_expert_targets(self) -> tuple[list[str], list[str]]:
        return [], [r".*\.deepspeed_experts\.\d+\.w[123]$"]
