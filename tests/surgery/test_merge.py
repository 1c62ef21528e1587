"""Expert merging (surgery.experts.merge_model) against float64 arithmetic on the original weights, and
against pruning: singleton groups are exactly a prune to their members."""

from __future__ import annotations

import copy

import torch
from test_pruning import tiny_model

from moetrain.config import MoEConfig
from moetrain.surgery.experts import full_expert_stacks, merge_model, prune_model

STACKS = ("w1_EDF", "w3_EDF", "w2_EFD")


def test_merged_experts_are_the_weighted_mean_and_keep_the_dominant_router_row():
    model = tiny_model()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.bias_E.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    before = [(full_expert_stacks(c), c.router.weight_ED.detach().clone()) for c in model.moe_layers()]
    groups = [[[2, 0], [1], [3]], [[0, 1, 2, 3]]]
    weights = [torch.tensor([3.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    merge_model(model, MoEConfig(num_experts=4, top_k=1), groups, weights, 1, None)
    layers = model.moe_layers()
    assert [c.num_experts for c in layers] == [3, 1]
    for core, (stacks, router), layer_groups, w in zip(layers, before, groups, weights):
        after = full_expert_stacks(core)
        for n, g in enumerate(layer_groups):
            share = w.double()[g] / w.double()[g].sum()
            for name in STACKS:
                expected = sum(s * stacks[name][e].double() for s, e in zip(share, g))
                torch.testing.assert_close(after[name][n].double(), expected, rtol=1e-6, atol=1e-7)
            assert torch.equal(core.router.weight_ED[n], router[g[0]])
            assert float(core.router.bias_E[n]) == float(torch.tensor([0.1, 0.2, 0.3, 0.4])[g[0]])
    out = model(torch.randint(0, 300, (2, 16)))
    assert torch.isfinite(out.logits_BSV).all()


def test_singleton_groups_are_exactly_a_prune():
    merged, pruned = tiny_model(), tiny_model()
    keep = [[3, 1], [0, 2, 3]]
    moe = MoEConfig(num_experts=4, top_k=2)
    merge_model(merged, moe, [[[e] for e in k] for k in keep], [torch.ones(4), torch.ones(4)], 1, None)
    prune_model(pruned, moe, keep, 1, None)
    a, b = merged.state_dict(), pruned.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(merged(x).logits_BSV, pruned(x).logits_BSV)


def test_moments_are_mixed_like_the_weights():
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    core = model.moe_layers()[0]
    w1 = core.experts.w1_EDF
    # one moment per parameter of the layer, expert e's entries all equal to e
    layer_params = [core.experts.w1_EDF, core.experts.w3_EDF, core.experts.w2_EFD]
    moments = {names[id(p)]: {"exp_avg": torch.arange(4.0).view(4, 1, 1).expand_as(p).clone()} for p in layer_params}
    moments[names[id(core.router.weight_ED)]] = {"exp_avg": torch.arange(4.0).view(4, 1).expand(4, 32).clone()}
    out = merge_model(copy.deepcopy(model), MoEConfig(num_experts=4, top_k=1), [[[0, 1], [2, 3]], [[0, 1, 2, 3]]],
                      [torch.tensor([1.0, 3.0, 1.0, 1.0]), torch.ones(4)], 1, None, moments)  # fmt: skip
    merged = out[names[id(w1)]]["exp_avg"]
    assert merged.shape[0] == 2
    torch.testing.assert_close(merged[:, 0, 0], torch.tensor([0.75, 2.5]))  # (0 + 3 * 1) / 4, (2 + 3) / 2
    router = out[names[id(core.router.weight_ED)]]["exp_avg"]
    torch.testing.assert_close(router[:, 0], torch.tensor([0.0, 2.0]))  # the dominant members' rows


def test_a_merge_of_identical_experts_changes_no_output():
    """Experts 2 and 3 are copies of experts 0 and 1 (upcycled duplicates) that top-k never selects (selection
    bias far down): the model routes as if they were not there, since renormalised gates do not see unchosen
    experts. Folding each copy into its original with non-trivial frequency weights averages identical weights,
    keeps the original's router row and bias, and so leaves every logit as it was."""
    model = tiny_model().eval()
    with torch.no_grad():
        for core in model.moe_layers():
            for name in STACKS:
                w = getattr(core.experts, name)
                w[2:].copy_(w[:2])
            core.router.bias_E.copy_(torch.tensor([0.0, 0.0, -1e9, -1e9]))
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x).logits_BSV
    weights = [torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([4.0, 1.0, 1.0, 7.0])]
    merge_model(model, MoEConfig(num_experts=4, top_k=2), [[[0, 2], [1, 3]]] * 2, weights, 1, None)
    assert [c.num_experts for c in model.moe_layers()] == [2, 2]
    with torch.no_grad():
        after = model(x).logits_BSV
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not torch.equal(before, tiny_model().eval()(x).logits_BSV)  # the copies and bias did change the model
