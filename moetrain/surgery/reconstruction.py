"""The ``reconstruction`` pruning criterion: per MoE layer, greedily remove the expert whose removal changes
the layer's output least on the calibration tokens (the layer-wise output-reconstruction objective of
"Not All Experts are Equal", Lu et al. 2024, searched greedily instead of over every subset).

Shape legend: T calibration tokens of this rank, D model dim, E experts of a layer.

Removing an expert here means masking it: the router re-picks among the rest, as after a real removal, so
the error counts both the lost expert's output and the re-routed tokens' new outputs:
``err(S) = sum_t ||y(x_t) - y_S(x_t)||^2`` with ``y_S`` the layer with only the experts of S selectable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from moetrain.runtime.distributed import all_reduce_sum
from moetrain.surgery.calibration import capture_layer_inputs, moe_blocks
from moetrain.surgery.experts import routing_core


def greedy_removal_order(error: Callable[[torch.Tensor], float], num_experts: int, floor: int) -> list[int]:
    """Experts in the order greedy reconstruction removes them, down to ``floor`` experts: each step removes
    ``argmin_e err(active - {e})`` given those already removed (ties: the lower index)."""
    active = torch.ones(num_experts, dtype=torch.bool)
    order: list[int] = []
    while int(active.sum()) > floor:
        best, best_err = -1, float("inf")
        for e in map(int, active.nonzero().flatten()):
            trial = active.clone()
            trial[e] = False
            err = error(trial)
            if err < best_err:
                best, best_err = e, err
        active[best] = False
        order.append(best)
    return order


def removal_scores(order: list[int], num_experts: int) -> torch.Tensor:
    """Scores that rank experts as greedy removal does: the first removed scores 1, the next 2, ..., and the
    experts never removed score above them all."""
    scores = torch.full((num_experts,), float(num_experts + 1), dtype=torch.float64)
    for rank, e in enumerate(order):
        scores[e] = float(rank + 1)
    return scores


def _masked_error(ffn: nn.Module, core, x_1TD: torch.Tensor, full_TD: torch.Tensor, active_E: torch.Tensor) -> float:
    """Collective: ``err(S)`` over every rank's calibration tokens, S = the experts ``active_E`` keeps."""
    core.set_expert_mask(active_E)
    y_TD = ffn(x_1TD)[0]
    return float(all_reduce_sum((full_TD - y_TD).double().pow(2).sum().reshape(1).cpu()))


@torch.no_grad()
def reconstruction_orders(
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    batches: Iterable[tuple[torch.Tensor, object]],
    floor: int,
) -> list[list[int]]:
    """Collective. Per MoE layer, :func:`greedy_removal_order` on the layer's own inputs over the calibration
    tokens of every rank (every rank evaluates the same masks in the same order: the expert-parallel exchanges
    match). Masks and capacities are restored afterwards."""
    orders = []
    for block, x_TD in zip(moe_blocks(model), capture_layer_inputs(model, forward, batches)):
        core = routing_core(block.ffn)
        x_1TD = x_TD.unsqueeze(0)
        saved_mask, saved_cf = core.base_router.active_E.clone(), core.eval_capacity_factor
        core.eval_capacity_factor = None  # every routed assignment computed, as in the pruned model's profile
        try:
            full_TD = block.ffn(x_1TD)[0]
            error = partial(_masked_error, block.ffn, core, x_1TD, full_TD)
            orders.append(greedy_removal_order(error, core.num_experts, max(floor, core.top_k)))
        finally:
            core.set_expert_mask(saved_mask)
            core.eval_capacity_factor = saved_cf
    return orders
