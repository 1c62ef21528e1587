"""``moe.backend=native``: our MoE layer (moetrain/model/moe.py); expert parallelism over a process group of
DeepSpeed's expert-parallel ranks, its shards checkpointed by :class:`ExpertShards`."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model.transformer import native_moe_ffn


class NativeBackend:
    name = "native"

    def moe_ffn(self, cfg: ModelConfig, moe: MoEConfig, ep_group: dist.ProcessGroup | None, ep_size: int) -> nn.Module:
        return native_moe_ffn(cfg, moe, ep_group, ep_size)

    def expert_group(self, ep_size: int) -> dist.ProcessGroup | None:
        if ep_size == 1:
            return None
        from moetrain.backends.deepspeed_ep import create_expert_parallel_groups

        return create_expert_parallel_groups(ep_size)

    def declare_experts(self, model: nn.Module, ep_size: int) -> Any | None:
        if ep_size == 1:
            return None
        from moetrain.backends.deepspeed_ep import ExpertShards, mark_expert_parameters

        mark_expert_parameters(model, ep_size)
        return ExpertShards(model, ep_size)

    def join_groups(self, model: nn.Module) -> None:
        pass  # the layers were built with their group

    def lora_expert_targets(self) -> tuple[list[str], list[str]]:
        return ["experts.w1_EDF", "experts.w3_EDF", "experts.w2_EFD"], []
