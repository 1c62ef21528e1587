"""The compress recipe on 2 ranks with merging and LoRA recovery, distilled from the base: a run resumed inside
the second merge stage (merged structure, base teacher) and one resumed inside the LoRA recovery (adapters
attached) train exactly as the uninterrupted run, and report the same base-relative numbers."""

from __future__ import annotations

import json

import pytest
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
]


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
    for name, step in (("merge", 10), ("recover", 14)):  # after merge round 2 (step 8); inside LoRA (from 12)
        resumed = tmp_path / name
        launch(resumed, tmp_path, f"trainer.resume={full}/checkpoints/step_{step:08d}")
        actual = read_metrics(resumed)
        assert_same_losses(actual, expected, range(step + 1, STEPS + 1), tol=1e-5)
        for k in ("val/loss", "val/kl_base", "val/agree_base", "train/distill_kl"):
            assert actual[STEPS][k] == pytest.approx(expected[STEPS][k], rel=1e-5, abs=1e-7), (name, k)
        r = json.loads((resumed / "summary.json").read_text())
        assert r["base"] == s["base"] and r["experts_per_layer"] == s["experts_per_layer"]
