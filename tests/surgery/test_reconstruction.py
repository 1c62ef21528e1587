"""The reconstruction criterion: greedy removal against a brute-force search over the per-token float64
reference layer (moe_reference), its scores, the round's use of it, and its one-line config error."""

from __future__ import annotations

import itertools

import torch
from helpers.configs import assert_config_error
from helpers.moe_reference import params64, run_reference
from test_structure_ops import FakeOps, prune_config, state

from moetrain.config import MoEConfig
from moetrain.model.moe import MoELayer
from moetrain.surgery.pruning import PruneHook
from moetrain.surgery.reconstruction import greedy_removal_order, reconstruction_orders, removal_scores

D, F, T = 8, 12, 48


class OneLayerModel(torch.nn.Module):
    """Just enough of a model for the calibration pass: ``layers[0].ffn`` is the MoE layer, ``cfg.d_model``."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].ffn = layer
        self.cfg = type("Cfg", (), {"d_model": D})()

    def forward(self, x_BSD):
        return self.layers[0].ffn(x_BSD)


def reference_error(layer: MoELayer, x_TD: torch.Tensor, active: list[bool]) -> float:
    p64 = params64(layer)
    full, *_ = run_reference(layer, x_TD.double(), p64, None)
    masked, *_ = run_reference(layer, x_TD.double(), p64, None, active=active)
    return float((full - masked).detach().pow(2).sum())


def test_greedy_first_removal_is_the_brute_force_best_on_a_4_expert_layer():
    for seed in range(4):
        torch.manual_seed(seed)
        layer = MoELayer(D, F, MoEConfig(num_experts=4, top_k=2, min_capacity=1))
        layer.reset_parameters(0.5, 0.5)
        layer.eval()
        x = torch.randn(1, T, D)
        (order,) = reconstruction_orders(OneLayerModel(layer), OneLayerModel(layer), [(x, None)], floor=2)
        singles = [reference_error(layer, x[0], [e != cut for e in range(4)]) for cut in range(4)]
        assert order[0] == min(range(4), key=singles.__getitem__), (seed, singles)
        # the second step is the best pair given the first removal (greedy, checked against the reference)
        pairs = {e: reference_error(layer, x[0], [i not in (order[0], e) for i in range(4)]) for e in range(4)}
        del pairs[order[0]]
        assert order[1] == min(pairs, key=pairs.__getitem__)
        assert bool(layer.router.active_E.all()) and layer.eval_capacity_factor is None  # mask restored


def test_greedy_order_on_a_known_error_and_its_scores():
    weights = torch.tensor([5.0, 1.0, 3.0, 2.0])
    error = lambda active: float(weights[~active].sum() ** 2)  # noqa: E731 - an additive cost, squared
    order = greedy_removal_order(error, 4, floor=1)
    assert order == [1, 3, 2]
    brute = min(itertools.combinations(range(4), 3), key=lambda cut: float(weights[list(cut)].sum()))
    assert sorted(order) == sorted(brute)
    assert removal_scores(order, 4).tolist() == [5.0, 1.0, 3.0, 2.0]


class ReconstructionOps(FakeOps):
    def reconstruction_orders(self, tokens: int, floor: int):
        self.calls.append(("reconstruction_orders", tokens, floor))
        return [[2, 0], [3, 1]]


def test_a_reconstruction_round_cuts_in_the_greedy_order(tmp_path):
    ops = ReconstructionOps(tmp_path, [2.0, 2.0])
    PruneHook(prune_config(criterion="reconstruction", keep=[3], merge_tokens=64)).run_round(ops, state("p"))
    assert ("reconstruction_orders", 64, 2) in ops.calls
    assert ("remove_experts", [[0, 1, 3], [0, 1, 2]]) in ops.calls


def test_reconstruction_needs_a_budget():
    assert_config_error(["prune.criterion=reconstruction"], "prune.criterion=reconstruction", "set prune.keep")
