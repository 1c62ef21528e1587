"""Physical expert removal: slice router rows and expert weights (and any per-parameter tensors that go with
them, such as Adam moments), and lay the survivors out evenly over the expert-parallel ranks again.

Shape legend: E experts of the layer (all ranks), El experts on this rank, D model dim, F expert hidden dim.

Works on both backends. A layer's experts are read as stacked ``(El, ...)`` tensors in the native layout
(``w1_EDF``, ``w3_EDF``, ``w2_EFD``) whatever holds them (our stacked parameters, or DeepSpeed's per-expert
``nn.Linear`` weights, stored transposed), gathered over the expert-parallel group into ``(E, ...)``, indexed
by the surviving ids, and split again: expert-parallel rank r owns new experts ``[r * El', (r + 1) * El')``.
The surgery is collective over the expert-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config import MoEConfig
from moetrain.model.moe import MoELayer, RoutingCore
from moetrain.model.transformer import MoETransformer

STACKS = ("w1_EDF", "w3_EDF", "w2_EFD")
_LINEAR = {"w1_EDF": "w1", "w3_EDF": "w3", "w2_EFD": "w2"}

Fetch = Callable[[nn.Parameter], torch.Tensor]  # a parameter -> a tensor shaped like it (its data, a moment, ...)


def routing_core(ffn: nn.Module) -> RoutingCore | None:
    """The routing core of a block's FFN (the native layer itself, or the DeepSpeed layer's gate)."""
    if isinstance(ffn, RoutingCore):
        return ffn
    gate = getattr(ffn, "gate", None)
    return gate if isinstance(gate, RoutingCore) else None


def expert_pieces(core: RoutingCore) -> dict[str, list[tuple[nn.Parameter, Any]]]:
    """Per stacked name, the local parameters that hold it in expert order: ``(param, kind)``, where a
    linear piece (kind True) is one expert's ``nn.Linear`` weight ``(out, in)`` (DeepSpeed), a stacked piece
    (False) holds all ``El`` experts already in the native layout, and a callable kind maps the parameter to
    that layout (MegaBlocks' GLU matrices: read-only, surgery refuses that backend)."""
    if isinstance(core, MoELayer):
        experts = core.experts
        return {name: [(base_parameter(experts, name), False)] for name in STACKS}
    if hasattr(core, "stacked_views"):  # MegaBlocks' GLU: one (E F, D) matrix a weight, read through a view
        return {name: [(p, view)] for name, (p, view) in core.stacked_views().items()}
    local = core.local_experts
    return {name: [(base_parameter(getattr(e, _LINEAR[name]), "weight"), True) for e in local] for name in STACKS}


def base_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """``module.<name>``, looking through a peft wrapper around the module if there is one."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(base, name)


def ep_group_of(core: RoutingCore) -> dist.ProcessGroup | None:
    group = getattr(core, "ep_group", None)
    return group if group is not None and dist.get_world_size(group) > 1 else None


def read_local_stack(pieces: list[tuple[nn.Parameter, bool]], fetch: Fetch) -> torch.Tensor:
    """This rank's ``(El, ...)`` stack of one weight (or of a per-parameter tensor fetched for it)."""
    parts = [linear(fetch(p)) if callable(linear) else fetch(p).t().unsqueeze(0) if linear else fetch(p)
             for p, linear in pieces]  # fmt: skip
    return torch.cat(parts).detach()


def gather_experts(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``(El, ...)`` on each expert-parallel rank -> ``(E, ...)`` in global expert order."""
    if group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def local_slice(full: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None:
        return full
    n = full.shape[0] // dist.get_world_size(group)
    r = dist.get_rank(group)
    return full[r * n : (r + 1) * n]


def full_expert_stacks(core: RoutingCore, fetch: Fetch | None = None) -> dict[str, torch.Tensor]:
    """Collective over the layer's expert-parallel group: every expert's ``w1_EDF``, ``w3_EDF``, ``w2_EFD``."""
    fetch = fetch or (lambda p: p.data)
    group = ep_group_of(core)
    return {n: gather_experts(read_local_stack(pcs, fetch), group) for n, pcs in expert_pieces(core).items()}


def write_local_stacks(
    core: RoutingCore, stacks: dict[str, torch.Tensor], store: Callable[[nn.Parameter, torch.Tensor], None]
) -> None:
    """Write this rank's ``(El, ...)`` stacks into the layer's parameters (or through ``store``)."""
    for name, pieces in expert_pieces(core).items():
        stack = stacks[name]
        if len(pieces) == 1 and not pieces[0][1]:
            store(pieces[0][0], stack)
        else:
            for j, (p, _) in enumerate(pieces):
                store(p, stack[j].t())


def _copy_into(p: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value)


def prune_model(
    model: MoETransformer,
    moe: MoEConfig,
    keep: list[list[int]],
    ep_size: int,
    ep_group: dist.ProcessGroup | None,
    per_param: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Remove experts in place: MoE layer j keeps its experts ``keep[j]`` (indices into its current experts, in
    the new order). Each changed layer is rebuilt with ``len(keep[j])`` experts on the same backend and gets
    the survivors' router rows, selection biases and expert weights.

    ``per_param``: tensors keyed by parameter name and shaped like the parameter (optimizer moments); they are
    sliced like the weights and returned under the rebuilt layers' parameter names. Collective.
    """
    per_param = dict(per_param or {})
    blocks = [block for block in model.layers if routing_core(block.ffn) is not None]
    if len(keep) != len(blocks):
        raise ValueError(f"prune_model: {len(keep)} keep lists for {len(blocks)} MoE layers")
    for block, ids in zip(blocks, keep):
        if list(ids) != list(range(routing_core(block.ffn).num_experts)):
            _prune_layer(
                model, block, list(ids), replace(moe, num_experts=len(ids), expert_ids=[]), ep_size, ep_group, per_param
            )
    return per_param


def merge_model(
    model: MoETransformer,
    moe: MoEConfig,
    groups: list[list[list[int]]],
    weights: list[torch.Tensor],
    ep_size: int,
    ep_group: dist.ProcessGroup | None,
    per_param: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Merge experts in place: MoE layer j becomes one expert per group of ``groups[j]`` (lists of current
    expert indices covering each expert at most once), in that order. A merged expert's w1, w3, w2 are the
    ``weights[j]``-weighted mean of its members' (``W = sum_i w_i W_i / sum_i w_i``, e.g. ``w`` the routing
    frequencies, as M-SMoE and HC-SMoE merge); its router row and selection bias are those of the group's
    first member (the dominant expert: the caller orders each group). Optimizer moments (``per_param``) are
    mixed with the same weights. Collective."""
    per_param = dict(per_param or {})
    blocks = [block for block in model.layers if routing_core(block.ffn) is not None]
    if len(groups) != len(blocks) or len(weights) != len(blocks):
        raise ValueError(f"merge_model: {len(groups)} group lists, {len(weights)} weights for {len(blocks)} layers")
    for block, layer_groups, w_E in zip(blocks, groups, weights):
        E = routing_core(block.ffn).num_experts
        members = [e for g in layer_groups for e in g]
        if (
            sorted(set(members)) != sorted(members)
            or not all(0 <= e < E for e in members)
            or min(map(len, layer_groups)) < 1
        ):
            raise ValueError(
                f"merge_model: groups {layer_groups} must be non-empty and cover experts 0..{E - 1} at most once"
            )
        mix = torch.zeros(len(layer_groups), E, dtype=torch.float64)
        for n, g in enumerate(layer_groups):
            w = w_E.double()[g].clamp_min(0)
            mix[n, g] = w / w.sum() if float(w.sum()) > 0 else 1.0 / len(g)
        firsts = [g[0] for g in layer_groups]
        layer_moe = replace(moe, num_experts=len(layer_groups), expert_ids=[])
        _prune_layer(model, block, firsts, layer_moe, ep_size, ep_group, per_param, mix)
    return per_param


def constant_model(
    model: MoETransformer,
    moe: MoEConfig,
    keep: list[list[int]],
    means: list[torch.Tensor],
    layer_ids: list[list[int]],
    ep_group: dist.ProcessGroup | None,
    per_param: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """MoNE in place: MoE layer j keeps its experts ``keep[j]`` and turns every other expert e into a constant,
    ``means[j][e]`` (D,): its router row and bias stay (the router still picks it), its FFN goes. The rebuilt
    layer's router slots are the kept experts, then the constants; ``layer_ids[j]``: their ids as
    ``moe.expert_ids`` writes them (constants negative). Expert parallelism is not supported. Collective."""
    per_param = dict(per_param or {})
    blocks = [block for block in model.layers if routing_core(block.ffn) is not None]
    for block, k, mean_ED, ids in zip(blocks, keep, means, layer_ids):
        E = routing_core(block.ffn).num_experts
        cut = [e for e in range(E) if e not in set(k)]
        if not cut:
            continue
        layer_moe = replace(moe, num_experts=len(ids), expert_ids=[list(ids)])
        _prune_layer(model, block, list(k), layer_moe, 1, ep_group, per_param, router_ids=[*k, *cut])
        with torch.no_grad():
            core = routing_core(block.ffn)
            core.constant_out_ND.copy_(mean_ED[cut].to(core.constant_out_ND))
    return per_param


def _prune_layer(
    model,
    block,
    ids: list[int],
    moe: MoEConfig,
    ep_size: int,
    ep_group,
    per_param,
    mix: torch.Tensor | None = None,
    router_ids: list[int] | None = None,
) -> None:
    """Rebuild one layer with ``len(ids)`` experts: expert n gets the router row and bias of old expert
    ``ids[n]`` and its weights (``mix``: an (E_new, E_old) matrix, the weights ``mix @ old`` instead);
    ``router_ids``: the router's rows and biases another way than the experts (MoNE keeps the cut ones')."""
    core = routing_core(block.ffn)
    idx = torch.as_tensor(ids, dtype=torch.long)
    router_idx = torch.as_tensor(router_ids if router_ids is not None else ids, dtype=torch.long)

    def pick(full_E: torch.Tensor) -> torch.Tensor:
        if mix is None:
            return full_E[idx]
        return torch.tensordot(mix.to(full_E.dtype), full_E, dims=1)

    group = ep_group_of(core)
    names = {id(p): n for n, p in model.named_parameters()}
    pieces = expert_pieces(core)
    router_w = base_parameter(core.router, "weight_ED")

    def select(fetch: Fetch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Survivors of every expert stack (this rank's new slice) and of the router rows."""
        stacks = {
            n: local_slice(pick(gather_experts(read_local_stack(pc, fetch), group)), group) for n, pc in pieces.items()
        }
        return stacks, fetch(router_w).detach()[router_idx]

    weights, router_rows = select(lambda p: p.data)
    keys = sorted(per_param.get(names[id(router_w)], {}))
    moments = {k: select(lambda p, k=k: per_param[names[id(p)]][k]) for k in keys}
    for p, _ in [pc for pcs in pieces.values() for pc in pcs] + [(router_w, False)]:
        per_param.pop(names[id(p)], None)
    bias = core.router.bias_E[router_idx].clone()

    with torch.random.fork_rng():  # building modules must not move the training RNG
        block.ffn = model.moe_ffn(model.cfg, moe, ep_group, ep_size)  # the model's backend
    new_core = routing_core(block.ffn)
    write_local_stacks(new_core, weights, _copy_into)
    _copy_into(new_core.router.weight_ED, router_rows)
    new_core.router.bias_E.copy_(bias)

    new_names = {id(p): n for n, p in model.named_parameters()}
    for k, (stacks, rows) in moments.items():

        def store(p: nn.Parameter, value: torch.Tensor, k: str = k) -> None:
            per_param.setdefault(new_names[id(p)], {})[k] = value.clone()

        write_local_stacks(new_core, stacks, store)
        store(new_core.router.weight_ED, rows)
