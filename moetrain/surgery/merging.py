"""Merging instead of dropping (``prune.mode=merge``): each expert a round cuts is folded into the survivor
whose mean output on calibration tokens is closest; the merged expert's weights are the routed-token-frequency
weighted mean of its members' (HC-SMoE, Chen et al. 2024, clusters experts by their mean outputs; M-SMoE, Li
et al. 2024, averages by routing frequency).

Shape legend: T calibration tokens of this rank, D model dim, F expert hidden dim, E experts of a layer.

Router rows and selection biases: a merged expert keeps its survivor's router row and bias (the survivor is
the group's dominant member): tokens the router sent to the cut experts now go to their next choices, as after
a drop, while the survivor's computation absorbs part of what the cut experts computed. The merged model has
the pruned model's shapes, so it exports like a pruned one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.runtime.distributed import all_reduce_sum
from moetrain.surgery.calibration import capture_layer_inputs, moe_blocks
from moetrain.surgery.experts import full_expert_stacks, routing_core


def merge_groups(keep: list[int], num_experts: int, mean_outputs_ED: torch.Tensor) -> list[list[int]]:
    """One group per survivor (``keep``, in order), the survivor first, then the cut experts whose mean
    output is closest to its (Euclidean; ties go to the earlier survivor)."""
    groups = [[s] for s in keep]
    survivors = mean_outputs_ED[keep].double()
    for e in range(num_experts):
        if e in keep:
            continue
        distances = (survivors - mean_outputs_ED[e].double()).norm(dim=-1)
        groups[int(torch.argmin(distances))].append(e)
    return groups


def expert_output_sums(x_TD: torch.Tensor, w1_EDF: torch.Tensor, w3_EDF: torch.Tensor, w2_EFD: torch.Tensor):
    """``sum_t f_e(x_t)`` for every expert e (E, D), in float64: every expert on every token."""
    x = x_TD.double()
    h_ETF = F.silu(torch.einsum("td,edf->etf", x, w1_EDF.double())) * torch.einsum("td,edf->etf", x, w3_EDF.double())
    return torch.einsum("etf,efd->ed", h_ETF, w2_EFD.double())


@torch.no_grad()
def expert_mean_outputs(
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """Collective. Per MoE layer, every expert's mean output (E, D) over the calibration tokens of every rank:
    the layers' inputs are captured while ``batches`` run through ``forward``, then every expert (all of them,
    gathered over the expert-parallel group) runs on every captured token."""
    out = []
    for block, x_TD in zip(moe_blocks(model), capture_layer_inputs(model, forward, batches)):
        stacks = full_expert_stacks(routing_core(block.ffn))
        summed_ED = expert_output_sums(x_TD, stacks["w1_EDF"], stacks["w3_EDF"], stacks["w2_EFD"]).cpu()
        sums = all_reduce_sum(torch.cat([summed_ED.flatten(), torch.tensor([x_TD.shape[0]], dtype=torch.float64)]))
        out.append(sums[:-1].view(summed_ED.shape) / sums[-1].clamp_min(1.0))
    return out
