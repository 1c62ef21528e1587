"""prune.mode=merge: which survivor each cut expert folds into, every expert's mean output against a per-token
loop, the round against a fake StructureOps, and a 2-rank expert-parallel run that merges, exports and reloads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.launch import BIN, ROOT, free_port, run_launcher
from helpers.moe_reference import swiglu
from test_pruning import PRUNE_FAST, tiny_model
from test_structure_ops import ROUND_START, FakeOps, prune_config, state

from moetrain.config import PruneMode
from moetrain.surgery.merging import expert_mean_outputs, expert_output_sums, merge_groups
from moetrain.surgery.pruning import PruneHook


def test_each_cut_expert_joins_the_survivor_with_the_closest_mean_output():
    means = torch.tensor([[0.0, 0.0], [5.0, 5.0], [4.0, 4.0], [0.5, -0.5], [10.0, 0.0]])
    assert merge_groups([0, 2], 5, means) == [[0, 3], [2, 1, 4]]
    # survivors keep the order given; expert 1 is as far from both (7.07): the tie goes to the earlier survivor
    assert merge_groups([4, 0], 5, means) == [[4, 1], [0, 2, 3]]


def test_expert_output_sums_equal_a_per_token_loop():
    torch.manual_seed(0)
    x, w1, w3, w2 = torch.randn(7, 5), torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 4, 5)
    expected = torch.stack([sum(swiglu(x[t].double(), w1[e].double(), w3[e].double(), w2[e].double()) for t in range(7))
                            for e in range(3)])  # fmt: skip
    torch.testing.assert_close(expert_output_sums(x, w1, w3, w2), expected)


def test_expert_mean_outputs_run_every_expert_on_the_layers_inputs():
    model = tiny_model().eval()
    seen: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    for j, block in enumerate(model.layers):  # the test's own capture of each MoE FFN's input
        block.ffn.register_forward_pre_hook(lambda _m, args, j=j: seen[j].append(args[0].flatten(0, 1).clone()))
    batches = [(torch.randint(0, 300, (2, 16)), None) for _ in range(2)]
    means = expert_mean_outputs(model, model, batches)
    for j, core in enumerate(model.moe_layers()):
        x = torch.cat(seen[j])
        w = [p.detach().double() for p in (core.experts.w1_EDF, core.experts.w3_EDF, core.experts.w2_EFD)]
        ref = torch.stack([sum(swiglu(x[t].double(), w[0][e], w[1][e], w[2][e]) for t in range(len(x))) / len(x)
                           for e in range(core.num_experts)])  # fmt: skip
        torch.testing.assert_close(means[j], ref)


class MergeOps(FakeOps):
    def expert_mean_outputs(self, tokens: int):
        self.calls.append(("expert_mean_outputs", tokens))
        # layer 0: expert 3 (cut) looks like expert 1; layer 1: expert 0 (cut) looks like expert 3
        return [torch.tensor([[0.0], [1.0], [5.0], [1.1]]), torch.tensor([[9.0], [0.0], [5.0], [8.5]])]

    def merge_experts(self, groups, weights):
        self.calls.append(("merge_experts", groups, [w.tolist() for w in weights]))


def test_a_merge_round_folds_each_cut_expert_into_its_closest_survivor(tmp_path):
    ops = MergeOps(tmp_path, [2.00, 2.01])
    hook = PruneHook(prune_config(mode=PruneMode.merge, merge_tokens=64))
    hook.run_round(ops, state("prune1"))
    names = [c[0] for c in ops.calls]
    assert names == [
        *ROUND_START,
        "expert_mean_outputs",
        "merge_experts",
        "validate",
        "log",
    ]
    _, groups, weights = ops.calls[4]
    assert groups == [[[0], [1, 3], [2]], [[1], [2], [3, 0]]]
    assert weights == [[40.0, 30.0, 29.0, 1.0], [2.0, 50.0, 28.0, 20.0]]  # routed-token frequencies
    assert hook.records()[0]["merged"] == groups  # original ids (nothing was pruned before)


class ReamOps(MergeOps):
    """REAP (saliency / routed) differs from frequency: layer 0's REAP ranks expert 3 first although it is the
    least routed; the gate mass is not proportional to the routed counts."""

    SALIENCY = [[20.0, 30.0, 2.9, 0.9], [1.8, 10.0, 28.0, 4.0]]  # REAP: [.5, 1, .1, .9], [.9, .2, 1, .2]
    GATE_MASS = [[8.0, 6.0, 3.0, 0.5], [1.0, 20.0, 7.0, 9.0]]

    def forward(self, inputs):
        out = super().forward(inputs)
        for st, sal, mass in zip(out.moe_stats, self.SALIENCY, self.GATE_MASS):
            st.saliency_sum_E, st.gate_mass_E = torch.tensor(sal), torch.tensor(mass)
        return out


def test_merge_ream_centres_are_the_top_reap_experts_merged_by_gate_mass(tmp_path):
    ops = ReamOps(tmp_path, [2.00, 2.01])
    # the criterion says frequency; merge_ream ranks by REAP whatever it says
    hook = PruneHook(prune_config(mode=PruneMode.merge_ream, keep=[3], merge_tokens=64, criterion="frequency"))
    hook.run_round(ops, state("prune1"))
    _, groups, weights = next(c for c in ops.calls if c[0] == "merge_experts")
    # REAP = saliency / routed: layer 0 [.5, 1, .1, .9] drops expert 2; layer 1 [.9, .2, 1, .2] drops 1 (the tie
    # of experts 1 and 3 at .2 goes to the lower index, as every ranking here). Expert 2 of layer 0 (mean 5.0)
    # joins centre 3 (1.1); expert 1 of layer 1 (mean 0.0) joins centre 2 (5.0).
    assert groups == [[[0], [1], [3, 2]], [[0], [2, 1], [3]]]
    assert weights == ReamOps.GATE_MASS  # the members are weighted by their gate mass
    # by hand: merged expert 3 of layer 0 = (0.5 * W3 + 3.0 * W2) / 3.5
    mix = torch.tensor(weights[0], dtype=torch.float64)[[3, 2]]
    assert (mix / mix.sum()).tolist() == pytest.approx([0.5 / 3.5, 3.0 / 3.5])


@pytest.mark.slow
def test_reconstruction_and_merge_two_ranks_expert_parallel_export_and_reload(tmp_path):
    from moetrain.interop.export import load_exported

    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "launch" / "train.py"), *PRUNE_FAST,
        "prune.mode=merge", "prune.merge_tokens=256", "prune.keep=[6,4]", "parallel.ep_size=2",
        "prune.max_loss_increase=10.0",  # both rounds kept, whatever the merge costs
        "prune.criterion=reconstruction",  # the greedy layer-output search, collective over the 2 ranks
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    run_launcher(cmd, tmp_path, timeout=900)
    s = json.loads((run_dir / "summary.json").read_text())
    rounds = s["prune_rounds"]
    assert [r["experts_after"] for r in rounds] == [[6, 6], [4, 4]]
    assert [r["outcome"] for r in rounds] == ["kept", "kept"] and s["experts_per_layer"] == [4, 4]
    for r in rounds:  # every expert of a layer is in exactly one group, and the groups' firsts survive
        for layer, before, after in zip(r["merged"], r["expert_ids_before"], r["removed"]):
            assert sorted(e for g in layer for e in g) == sorted(before)
            assert not {g[0] for g in layer} & set(after)
    model, _, _ = load_exported(run_dir / "export")
    assert [layer.num_experts for layer in model.moe_layers()] == s["experts_per_layer"]
