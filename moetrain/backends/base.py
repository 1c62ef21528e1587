"""The ``Backend`` interface: everything that differs between ``moe.backend=native`` and ``deepspeed``.

Code above this layer asks :func:`get_backend` once and calls the interface; it never branches on the
backend's name. The model itself is backend-agnostic: it takes the backend's MoE FFN constructor
(:meth:`Backend.moe_ffn`) when it is built.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch.distributed as dist
from torch import nn

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model.transformer import MoETransformer, build_model


class Backend(Protocol):
    name: str

    def moe_ffn(self, cfg: ModelConfig, moe: MoEConfig, ep_group: dist.ProcessGroup | None, ep_size: int) -> nn.Module:
        """One MoE FFN of ``moe.num_experts`` experts (returns ``(y, MoEStats)`` from its forward)."""
        ...

    def expert_group(self, ep_size: int) -> dist.ProcessGroup | None:
        """The process group the model's MoE layers shard their experts over (None: the layers find their own
        group, or there is no expert parallelism)."""
        ...

    def declare_experts(self, model: nn.Module, ep_size: int) -> Any | None:
        """Declare expert-parallel parameters to the engine; returns the checkpoint component that saves their
        shards (None when the engine checkpoints them itself, or nothing is sharded)."""
        ...

    def join_groups(self, model: nn.Module) -> None:
        """A model used outside an engine (a distillation teacher) joins its expert-parallel groups."""
        ...

    def lora_expert_targets(self) -> tuple[list[str], list[str]]:
        """What LoRA on the experts wraps: ``(parameter names, module-name regexes)`` for peft."""
        ...


def build_backend_model(
    backend: Backend, cfg: ModelConfig, moe: MoEConfig, ep_group: dist.ProcessGroup | None = None, ep_size: int = 1
) -> MoETransformer:
    """The model with ``backend``'s MoE layers."""
    return build_model(cfg, moe, ep_group, ep_size, moe_ffn=backend.moe_ffn)
