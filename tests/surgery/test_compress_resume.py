"""The compress recipe on 2 ranks, experts split over them (``parallel.ep_size=2``), with merging and LoRA
recovery, distilled from the base: a run resumed inside the second merge stage (merged structure, base teacher)
and one resumed inside the LoRA recovery (adapters attached) train exactly as the uninterrupted run, and report
the same base-relative numbers; recovery changes only the adapters until they are merged."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.launch import BIN, FAST, ROOT, assert_same_losses, free_port, read_metrics, run_launcher

STEPS = 16
COMPRESS = [
    *FAST,
    "+recipe=compress",
    "logging.wandb.mode=disabled",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=2",
    "trainer.save_every=2",
    "trainer.keep_checkpoints=20",
    "schedule.stages=[{name:top1,steps:4,moe:{top_k:1}},{name:prune1,steps:4,prune:true},"
    "{name:prune2,steps:4,prune:true},{name:recover,steps:4,recover:true}]",
    "prune.keep=[6,4]",
    "recover.trainable=lora",  # recovery on adapters: resume must re-attach them
    "lora.targets=[router,experts,attention]",
    "prune.mode=merge",
    "prune.merge_tokens=256",
    "prune.profile_tokens=1024",
    "prune.max_loss_increase=100",
    "parallel.ep_size=2",  # each rank holds half of every layer's experts
    "export.family=mixtral",  # a model made here: the family to write its hf/ as
]


def module_state(folder) -> dict[str, torch.Tensor]:
    """A checkpoint's weights: the replicated ones and this layout's expert shards."""
    from safetensors.torch import load_file

    state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    for shard in sorted(folder.glob("experts_ep*.safetensors")):
        state.update({f"{shard.name}:{k}": v for k, v in load_file(str(shard)).items()})
    return state


def assert_only_adapters_train(ckpt, start: int, inside: int, end: int) -> None:
    """recover.trainable=lora: from the start of recovery to a step inside it only LoRA adapter weights change;
    at the end the adapters are merged (none left in the checkpoint)."""
    before, after = (module_state(ckpt / f"step_{s:08d}") for s in (start, inside))
    assert before.keys() == after.keys()
    adapters = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert adapters and changed and changed <= adapters, sorted(changed - adapters)
    assert any(".experts." in k for k in changed) and any(".router." in k for k in changed)
    final = module_state(ckpt / f"step_{end:08d}")
    assert not any(".lora_" in k for k in final) and any(k.startswith("experts_ep") for k in final)


def launch(run_dir, tmp_path, *extra: str) -> None:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), *COMPRESS, f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    run_launcher(cmd, tmp_path, timeout=900)


@pytest.mark.slow
def test_resume_inside_a_merge_stage_and_inside_recovery_equals_the_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    launch(full, tmp_path)
    s = json.loads((full / "summary.json").read_text())
    assert [r["outcome"] for r in s["prune_rounds"]] == ["kept", "kept"]
    assert all(r["merged"] for r in s["prune_rounds"]) and s["experts_per_layer"] == [4, 4]
    expected = read_metrics(full)
    assert_only_adapters_train(full / "checkpoints", start=12, inside=14, end=STEPS)
    for name, step in (("merge", 10), ("recover", 14)):  # after merge round 2 (step 8); inside LoRA (from 12)
        resumed = tmp_path / name
        launch(resumed, tmp_path, f"trainer.resume={full}/checkpoints/step_{step:08d}")
        actual = read_metrics(resumed)
        assert_same_losses(actual, expected, range(step + 1, STEPS + 1), tol=1e-5)
        for k in ("val/loss", "val/kl_base", "val/agree_base", "train/distill_kl"):
            assert actual[STEPS][k] == pytest.approx(expected[STEPS][k], rel=1e-5, abs=1e-7), (name, k)
        r = json.loads((resumed / "summary.json").read_text())
        assert r["base"] == s["base"] and r["experts_per_layer"] == s["experts_per_layer"]
