"""Calibration passes: what the MoE layers see on a sample of tokens, for the structure decisions that need
more than routing counts (merging by mean output, pruning by output reconstruction).

Shape legend: T calibration tokens of this rank, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from moetrain.surgery.experts import routing_core


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose FFN is an MoE layer, in depth order."""
    return [block for block in model.layers if routing_core(block.ffn) is not None]


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, forward: Callable[[torch.Tensor], object], batches: Iterable[tuple[torch.Tensor, object]]
) -> list[torch.Tensor]:
    """Per MoE layer, the (T, D) inputs its FFN received while ``batches`` ran through ``forward`` (this rank's
    tokens; the model's own forward, so every rank takes part in the expert-parallel exchanges)."""
    blocks = moe_blocks(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [
        block.ffn.register_forward_pre_hook(lambda _m, args, j=j: seen[j].append(args[0].detach().flatten(0, 1)))
        for j, block in enumerate(blocks)
    ]
    try:
        for batch, _ in batches:
            forward(batch)
    finally:
        for h in handles:
            h.remove()
    width = model.cfg.d_model
    return [torch.cat(xs) if xs else torch.zeros(0, width) for xs in seen]
