"""Pruning budgets (prune.keep, prune.remove_fraction) instead of the threshold: which experts a round removes,
and the one-line errors of a bad budget."""

from __future__ import annotations

import torch
from helpers.configs import assert_config_error

from moetrain.config import PruneConfig
from moetrain.surgery.pruning import select_survivors


def shares(*rows):
    return [torch.tensor(r, dtype=torch.float64) / sum(r) for r in rows]


S = shares([8, 1, 7, 2, 6, 3, 5, 4], [1, 2, 3, 4, 5, 6, 7, 8])


def test_keep_is_a_staged_budget_per_round_coldest_first():
    cfg = PruneConfig(keep=[6, 4], threshold=0.0, min_experts=2)  # the threshold would remove nothing
    first = select_survivors(S, cfg, ep_size=1, round_index=0)
    assert first == [[0, 2, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]  # layer 0 drops shares 1 and 2, layer 1 drops 1 and 2
    second = select_survivors(shares([8, 7, 6, 3, 5, 4], [3, 4, 5, 6, 7, 8]), cfg, ep_size=1, round_index=1)
    assert second == [[0, 1, 2, 4], [2, 3, 4, 5]]
    # past the last entry the last budget holds; min_experts wins over a smaller keep
    assert select_survivors(S, PruneConfig(keep=[1], min_experts=3), 1, round_index=5) == [[0, 2, 4], [5, 6, 7]]


def test_keep_rounds_for_expert_parallelism_and_equal_counts():
    # 8 -> keep 5 is odd: with ep_size=2 each layer keeps its warmest candidate too (6 experts)
    assert select_survivors(S, PruneConfig(keep=[5]), ep_size=2) == [[0, 2, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]


def test_remove_fraction_per_layer_and_ranked_globally():
    per_layer = PruneConfig(remove_fraction=0.25, min_experts=2)
    assert select_survivors(S, per_layer, ep_size=1) == [[0, 2, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]]
    # globally: 4 of 16 go, the coldest anywhere: layer 0 holds shares 1/36 and 2/36, layer 1 holds 1/36, 2/36
    cold = shares([100, 1, 100, 100], [1, 1, 100, 100])
    ranked = PruneConfig(remove_fraction=0.25, min_experts=1, ranking="global")  # floor(0.25 * 8) = 2
    assert select_survivors(cold, ranked, ep_size=1) == [[0, 2, 3], [1, 2, 3]]


def test_bad_budgets_name_the_key():
    assert_config_error(["prune.keep=[6,7]"], "prune.keep=[6, 7]", "must not rise from round to round")
    assert_config_error(["prune.keep=[1]"], "prune.keep=[1]", "between prune.min_experts=2")
    assert_config_error(["prune.remove_fraction=1.5"], "prune.remove_fraction=1.5", "must be in (0, 1)")
    assert_config_error(
        ["prune.keep=[6]", "prune.remove_fraction=0.5"], "prune.remove_fraction=0.5", "conflicts with prune.keep"
    )
    assert_config_error(["+recipe=top1_prune", "prune.keep=[6]"], "prune.keep=[6]", "1 entries for 2 pruning stages")


def test_keep_ranked_globally_removes_the_same_total_unevenly_above_top_k():
    # layer 0 is cold at its tail, layer 1 is flat: keep=[5] removes 3 + 3 = 6 experts, the coldest anywhere
    cold = shares([40, 30, 20, 5, 2, 1, 1, 1], [13, 12, 13, 12, 13, 12, 13, 12])
    ranked = PruneConfig(keep=[5], min_experts=2, ranking="global")
    # top-2: layer 0 loses its 5 coldest (shares 1, 1, 1, 2, 5 %), layer 1 its first 12 % expert
    assert select_survivors(cold, ranked, ep_size=1, top_k=2) == [[0, 1, 2], [0, 2, 3, 4, 5, 6, 7]]
    # top-3: no layer below 4 experts, so layer 0 stops after 4 and layer 1 gives two
    assert select_survivors(cold, ranked, ep_size=1, top_k=3) == [[0, 1, 2, 3], [0, 2, 4, 5, 6, 7]]
    # the floor is max(min_experts, top_k + 1)
    floor5 = PruneConfig(keep=[5], min_experts=5, ranking="global")
    assert select_survivors(cold, floor5, ep_size=1, top_k=1) == [[0, 1, 2, 3, 4], [0, 2, 4, 6, 7]]


def test_global_ranking_conflicts_with_equal_counts():
    assert_config_error(
        ["prune.ranking=global", "prune.equal_per_layer=true"], "prune.ranking=global", "prune.equal_per_layer=true"
    )
