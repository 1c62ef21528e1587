"""Stage hooks against a fake StructureOps, in-process: what a pruning round and a LoRA stage ask of the model
(validate, snapshot, profile, remove, restore, log; attach and merge adapters), in which order, and with
which arguments."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from moetrain.config import PruneConfig, StageConfig
from moetrain.surgery.lora import LoRAStageHook
from moetrain.surgery.pruning import PruneHook
from moetrain.train.stages import StageState

# per layer, tokens routed to each of its 4 experts in one profile batch: expert 3 of layer 0 and expert 0
# of layer 1 are cold (below the 0.05 share threshold)
ROUTED = [[40.0, 30.0, 29.0, 1.0], [2.0, 50.0, 28.0, 20.0]]


class FakeOps:
    """Records every call; the validation losses come from a list (before the round, after it, after a
    restore)."""

    def __init__(self, tmp_path: Path, losses: list[float]) -> None:
        self.calls: list[tuple] = []
        self.losses = list(losses)
        self.tmp_path = tmp_path
        self.layers = [SimpleNamespace(num_experts=4, eval_capacity_factor=1.25) for _ in ROUTED]
        self.ids = [[0, 1, 2, 3], [0, 1, 2, 3]]
        self.step, self.ep_size, self.is_main = 40, 1, True

    def moe_layers(self):
        return self.layers

    def expert_ids(self):
        return self.ids

    def profile_batches(self, tokens: int):
        self.calls.append(("profile_batches", tokens))
        return [(torch.zeros(2, 50, dtype=torch.long), None)]

    def forward(self, inputs):
        # capacity is off while the profile runs: every routed assignment counts
        assert all(layer.eval_capacity_factor is None for layer in self.layers)
        stats = [
            SimpleNamespace(
                routed_per_expert_E=torch.tensor(r),
                gate_mass_E=torch.tensor(r) / 2,
                saliency_sum_E=torch.tensor(r),
                output_norm_sum_E=torch.tensor(r),
            )
            for r in ROUTED
        ]
        return SimpleNamespace(moe_stats=stats)

    def validate(self) -> float:
        self.calls.append(("validate",))
        return self.losses.pop(0)

    def remove_experts(self, keep):
        self.calls.append(("remove_experts", keep))
        self.ids = [[ids[e] for e in k] for ids, k in zip(self.ids, keep)]

    def attach_adapters(self):
        self.calls.append(("attach_adapters",))
        return 10

    def merge_adapters(self):
        self.calls.append(("merge_adapters",))

    def snapshot(self, name: str) -> Path:
        self.calls.append(("snapshot", name))
        path = self.tmp_path / name
        path.mkdir()
        return path

    def restore(self, snapshot: Path) -> None:
        self.calls.append(("restore", snapshot.name))

    def log(self, metrics):
        self.calls.append(("log", metrics["event"], metrics["prune/outcome"]))


# every round begins the same way: the loss before, the rollback point, the routing profile
ROUND_START = ["validate", "snapshot", "profile_batches"]


def state(name: str, index: int = 1) -> StageState:
    return StageState(index, name, 0, {}, 0.01, 0.001, 1.0)


def prune_config(**kw) -> PruneConfig:
    return PruneConfig(**{"profile_tokens": 100, "threshold": 0.05, "max_fraction": 0.25, "min_experts": 2, **kw})


def test_a_kept_round_validates_snapshots_profiles_removes_and_logs(tmp_path):
    ops = FakeOps(tmp_path, [2.00, 2.03])
    hook = PruneHook(prune_config(max_loss_increase=0.05))
    hook.on_stage_start(ops, state("prune1"), StageConfig(name="prune1", prune=True))
    assert ops.calls == [
        ("validate",),
        ("snapshot", "pre_prune_round1"),
        ("profile_batches", 100),
        ("remove_experts", [[0, 1, 2], [1, 2, 3]]),
        ("validate",),
        ("log", "prune_round", "kept"),
    ]
    (record,) = hook.records()
    assert record["removed"] == [[3], [0]] and record["experts_after"] == [3, 3] and record["step"] == 40
    assert [layer.eval_capacity_factor for layer in ops.layers] == [1.25, 1.25]  # restored after the profile
    assert not (tmp_path / "pre_prune_round1").exists()  # the snapshot is deleted once the round is decided
    assert hook.state_dict() == {"rounds": [record]}


def test_a_round_that_hurts_too_much_is_restored(tmp_path):
    ops = FakeOps(tmp_path, [2.00, 2.50, 2.00])
    hook = PruneHook(prune_config(max_loss_increase=0.05))
    hook.run_round(ops, state("prune1"))
    names = [c[0] for c in ops.calls]
    assert names == [
        *ROUND_START,
        "remove_experts",
        "validate",
        "restore",
        "validate",
        "log",
    ]
    assert ("restore", "pre_prune_round1") in ops.calls
    (record,) = hook.records()
    assert record["outcome"].startswith("rolled back (loss +0.5000 > prune.max_loss_increase=0.05)")
    assert record["val_loss_restored"] == 2.00


def test_nothing_to_prune_changes_nothing(tmp_path):
    ops = FakeOps(tmp_path, [2.00])
    PruneHook(prune_config(threshold=0.0)).run_round(ops, state("prune1"))
    assert [c[0] for c in ops.calls] == [*ROUND_START, "log"]
    assert ops.calls[-1] == ("log", "prune_round", "nothing to prune")


def test_stages_without_prune_or_lora_leave_the_model_alone(tmp_path):
    ops = FakeOps(tmp_path, [])
    plain = StageConfig(name="train")
    for hook in (PruneHook(prune_config()), LoRAStageHook()):
        hook.on_stage_start(ops, state("train"), plain)
        hook.on_stage_end(ops, state("train"), plain)
    assert ops.calls == []


def test_a_lora_stage_attaches_adapters_at_its_start_and_merges_them_at_its_end(tmp_path):
    ops = FakeOps(tmp_path, [])
    hook, stage = LoRAStageHook(), StageConfig(name="recover", lora=True)
    hook.on_stage_start(ops, state("recover"), stage)
    assert ops.calls == [("attach_adapters",)]
    hook.on_stage_end(ops, state("recover"), stage)
    assert ops.calls == [("attach_adapters",), ("merge_adapters",)]
