"""Our tensor names as ``moe.backend=native`` lays them out (``layers.{i}.ffn.router.weight_ED``, stacked
``layers.{i}.ffn.experts.w1_EDF`` ...) into the names of a model built with any backend or expert-parallel
size: the interchange code converts checkpoints to and from the native names only (the way back is
:func:`moetrain.interop.export.native_state_dict`).

Shape legend: E experts, D model dim, F expert hidden dim.

DeepSpeed's MoE layer keeps our routing core as its gate (``...ffn.moe.deepspeed_moe.gate``) and one
``nn.Linear`` FFN per local expert (``...deepspeed_experts.{j}.w1.weight``, (F, D)); a native expert-parallel
layer keeps its rank's slice of the stacked tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moetrain.interop.hf.common import EXPERT_TENSORS
from moetrain.model.moe import MoELayer, RoutingCore
from moetrain.surgery.experts import routing_core

LINEAR_NAMES = ("w1", "w3", "w2")  # a DeepSpeed expert's layers, in the order of EXPERT_TENSORS


def moe_parts(model: nn.Module) -> Iterator[tuple[int, RoutingCore, nn.ModuleList | None]]:
    """(layer index, routing core, DeepSpeed's local experts or None for a native layer) of each MoE layer."""
    for i, block in enumerate(model.layers):
        core = routing_core(block.ffn)
        if core is not None:
            yield i, core, None if isinstance(core, MoELayer) else core.local_experts


def to_model_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full native-named state as ``model`` names it: DeepSpeed layers get per-expert (F, D) / (D, F)
    matrices, expert-parallel layers only this rank's experts."""
    names = {id(m): n for n, m in model.named_modules()}
    out = dict(state)
    for i, core, local in moe_parts(model):
        prefix = f"layers.{i}.ffn."
        if local is None:
            if core.ep_size > 1:
                first = core.ep_rank * core.num_local_experts
                for w in EXPERT_TENSORS:
                    key = f"{prefix}experts.{w}"
                    out[key] = out[key][first : first + core.num_local_experts].contiguous()
            continue
        for key in [k for k in out if k.startswith(prefix + "router.")]:
            out[f"{names[id(core)]}.{key.removeprefix(prefix)}"] = out.pop(key)
        first = core.ep_rank * len(local)
        for linear, stacked in zip(LINEAR_NAMES, EXPERT_TENSORS):
            full = out.pop(f"{prefix}experts.{stacked}")
            for j, expert in enumerate(local):
                out[f"{names[id(expert)]}.{linear}.weight"] = full[first + j].t().contiguous()
    return out
