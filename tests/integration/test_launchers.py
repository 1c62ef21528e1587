"""End to end through the real launchers (deepspeed, torchrun, python) with 2 gloo ranks on CPU."""

from __future__ import annotations

import json

import pytest
from helpers.launch import BIN, FAST, ROOT, assert_same_losses, free_port, read_metrics, run_launcher

pytestmark = pytest.mark.slow
TRAIN = str(ROOT / "launch" / "train.py")


class _DeepSpeed2:
    """``deepspeed --num_gpus 2 --master_port <free>``: a fresh port per launch, so a socket still held by
    the previous run (or another job on the machine) cannot break the next one."""

    def __iter__(self):
        return iter([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())])


DEEPSPEED_2 = _DeepSpeed2()


def only_run_dir(base):
    runs = [p for p in (base / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"ranks did not share one run folder: {runs}"
    return runs[0]


@pytest.mark.parametrize(
    "precision",
    [["parallel.zero_stage=0"], ["parallel.zero_stage=2", "parallel.dtype=bf16"]],
    ids=["zero0-fp32", "zero2-bf16"],
)
def test_deepspeed_two_ranks_checkpoint_and_exact_resume(tmp_path, precision):
    common = [
        *FAST,
        "+recipe=top2_baseline",
        "trainer.max_steps=12",
        "trainer.save_every=6",
        "trainer.eval_every=6",
        "trainer.expert_stats_every=6",
        *precision,
    ]
    first = tmp_path / "first"
    first.mkdir()
    run_launcher([*DEEPSPEED_2, TRAIN, *common, "logging.wandb.mode=offline"], tmp_path, cwd=first)
    run_dir = only_run_dir(first)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000012"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000012"]
    assert len(list((run_dir / "checkpoints" / "step_00000006").glob("rank_state_*.pt"))) == 2
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    full = read_metrics(run_dir)
    assert "val/loss" in full[6] and "val/loss" in full[12]
    assert len(full[6]["moe/layer0/tokens_per_expert"]) == 8
    # expert counts are summed over both ranks and 6 steps: every token of every layer is routed twice (k=2)
    tokens = 2 * 6 * 4 * 64
    assert sum(full[6]["moe/layer0/tokens_per_expert"]) == 2 * tokens
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 12 and summary["val_loss"] == pytest.approx(full[12]["val/loss"])

    resumed = tmp_path / "resumed"
    run_launcher(
        [
            *DEEPSPEED_2,
            TRAIN,
            *common,
            "logging.wandb.mode=disabled",
            f"trainer.resume={run_dir}/checkpoints/step_00000006",
            f"hydra.run.dir={resumed}",
        ],
        tmp_path,
    )
    again = read_metrics(resumed)
    assert min(k for k, row in again.items() if "train/loss" in row) == 7, "the resumed run must continue at step 7"
    assert_same_losses(again, full, range(7, 13))
    assert [again[s]["train/lr"] for s in range(7, 13)] == pytest.approx([full[s]["train/lr"] for s in range(7, 13)])
    assert again[12]["val/loss"] == pytest.approx(full[12]["val/loss"], abs=1e-6)


def test_torchrun_two_ranks(tmp_path):
    run_launcher(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            TRAIN,
            *FAST,
            "+recipe=top2_baseline",
            "trainer.max_steps=3",
            "logging.wandb.mode=disabled",
        ],
        tmp_path,
        cwd=tmp_path,
    )
    run_dir = only_run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3 and summary["val_loss"] is not None
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"


def test_python_single_process_resume_auto(tmp_path):
    base = [
        str(BIN / "python"),
        TRAIN,
        *FAST,
        "logging.wandb.mode=disabled",
        f"hydra.run.dir={tmp_path}/run",
        "trainer.resume=auto",
        "trainer.save_every=2",
        "schedule.decay=constant",
    ]
    run_launcher([*base, "trainer.max_steps=2"], tmp_path)
    proc = run_launcher([*base, "trainer.max_steps=4"], tmp_path)
    assert "resumed from" in proc.stdout + proc.stderr
    metrics = read_metrics(tmp_path / "run")
    assert sorted(k for k, row in metrics.items() if "train/loss" in row) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000004"


# No gradient clipping here: DeepSpeed's ZeRO-0 clips MoE models by the mean of per-rank norms (its
# convention), which would make ep_size=2 differ from ep_size=1 by design rather than by error.
EP_RUN = [
    *FAST,
    "+recipe=top2_baseline",
    "trainer.max_steps=6",
    "trainer.save_every=3",
    "trainer.eval_every=3",
    "logging.wandb.mode=disabled",
    "optim.grad_clip=0",
]


@pytest.fixture(scope="session")
def ep1_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep1")
    run_launcher([*DEEPSPEED_2, TRAIN, *EP_RUN, f"hydra.run.dir={tmp}/run"], tmp)
    return read_metrics(tmp / "run")


@pytest.mark.xdist_group("ep1_reference")  # one reference run (a session fixture) on one pytest-xdist worker
@pytest.mark.parametrize("zero", [0, 2])
def test_deepspeed_expert_parallel_equals_ep1_and_resumes(tmp_path, ep1_reference, zero):
    """ep_size=2 shards each MoE layer's 8 experts over the 2 ranks (all-to-all dispatch, a2a_chunks=2):
    training matches the unsharded run on the same initial weights, checkpoints keep every shard, and a
    resumed run continues exactly."""
    ep = [*EP_RUN, "parallel.ep_size=2", "moe.a2a_chunks=2", f"parallel.zero_stage={zero}"]
    run_launcher([*DEEPSPEED_2, TRAIN, *ep, f"hydra.run.dir={tmp_path}/ep2"], tmp_path)
    sharded = read_metrics(tmp_path / "ep2")
    ckpt = tmp_path / "ep2" / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in ckpt.glob("experts_ep*")) == [
        "experts_ep000-of-002.safetensors",
        "experts_ep001-of-002.safetensors",
    ]
    for step in range(1, 7):
        assert sharded[step]["train/loss"] == pytest.approx(ep1_reference[step]["train/loss"], abs=2e-5), step
        assert sharded[step]["train/grad_norm"] == pytest.approx(ep1_reference[step]["train/grad_norm"], rel=1e-4)
    assert sharded[6]["val/loss"] == pytest.approx(ep1_reference[6]["val/loss"], abs=2e-5)

    run_launcher(
        [
            *DEEPSPEED_2,
            TRAIN,
            *ep,
            f"trainer.resume={ckpt}",
            f"hydra.run.dir={tmp_path}/resumed",
        ],
        tmp_path,
    )
    resumed = read_metrics(tmp_path / "resumed")
    assert_same_losses(resumed, sharded, range(4, 7))


def test_deepspeed_backend_trains_checkpoints_per_expert_and_resumes(tmp_path):
    """moe.backend=deepspeed (DeepSpeed's MoE layer, our router as gate), ep_size=2, ZeRO-2, bf16: DeepSpeed's
    per-expert checkpoint files; exact resume; weights-only resume at another ep_size."""
    run = [*EP_RUN, "moe.backend=deepspeed", "parallel.zero_stage=2", "parallel.dtype=bf16"]
    run_launcher([*DEEPSPEED_2, TRAIN, *run, "parallel.ep_size=2", f"hydra.run.dir={tmp_path}/a"], tmp_path)
    full = read_metrics(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    assert len(list(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 2 * 8  # 2 MoE layers x 8 experts
    assert "val/loss" in full[6] and full[6]["train/loss"] < full[1]["train/loss"]

    run_launcher(
        [*DEEPSPEED_2, TRAIN, *run, "parallel.ep_size=2", f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path}/b"],
        tmp_path,
    )
    resumed = read_metrics(tmp_path / "b")
    assert_same_losses(resumed, full, range(4, 7))

    proc = run_launcher(
        [*DEEPSPEED_2, TRAIN, *run, "parallel.ep_size=1", f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path}/c"],
        tmp_path,
    )
    assert "loaded the weights only; optimizer state is re-initialized" in proc.stdout + proc.stderr
    other_ep = read_metrics(tmp_path / "c")
    # the first step after loading sees the same weights (forward loss equal), then the fresh optimizer differs
    assert other_ep[4]["train/loss"] == pytest.approx(full[4]["train/loss"], abs=1e-6)
    assert other_ep[4]["train/lr"] == pytest.approx(full[4]["train/lr"])


STAGED = [
    *FAST,
    "logging.wandb.mode=disabled",
    "trainer.max_steps=9",
    "trainer.save_every=2",
    "trainer.keep_checkpoints=10",
    "trainer.eval_every=100",
    "schedule.stages=[{name:top2,steps:3},"
    "{name:top1,steps:3,moe:{top_k:1,capacity_factor:1.25,drop_policy:reroute},"
    "aux_loss_coef:{start:0.01,end:0.05,steps:3}},"
    "{name:router_only,steps:3,trainable:router}]",
    "trainer.peak_tflops=0.001",  # a made-up device of 1 GFLOP/s: the MFU is logged and reported
]


def test_staged_run_two_ranks_resumes_exactly_and_reports(tmp_path):
    """top2 -> top1 -> router-only stages on 2 ranks: events, per-stage report, frozen experts, and exact
    resume from the middle of a stage, from a stage boundary, and after a kill -9 during a checkpoint write."""
    import subprocess

    import torch
    from helpers.launch import launcher_env

    run_launcher([*DEEPSPEED_2, TRAIN, *STAGED, f"hydra.run.dir={tmp_path}/a"], tmp_path)
    full = read_metrics(tmp_path / "a")
    events = [r for r in full.values() if r.get("event") == "stage_start"]
    assert [(e["step"], e["stage/name"]) for e in events] == [(3, "top1"), (6, "router_only")]
    assert events[0]["stage/changes"]["moe.top_k"] == [2, 1]
    # row N logs optimizer step N, which ran with the schedule at step N - 1 (step 4 = 2nd step of "top1")
    assert full[5]["train/aux_loss_coef"] == pytest.approx(0.01 + 0.04 / 3)

    stages = json.loads((tmp_path / "a" / "summary.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["top2", "top1", "router_only"]
    assert [s["end_step"] for s in stages] == [3, 6, 9]
    assert all(s["val_loss"] is not None and s["tokens_per_s"] > 0 for s in stages)
    # 2 MoE layers x k=2 assignments x 3 GEMMs x 2 x d_model 128 x d_ff 160; top-1 (nothing dropped) is half
    assert stages[0]["expert_flops_per_token"] == pytest.approx(2 * 2 * 3 * 2 * 128 * 160)
    assert stages[1]["expert_flops_per_token"] == pytest.approx(stages[0]["expert_flops_per_token"] / 2)
    for s in stages:
        assert all(sum(row) == pytest.approx(1.0) for row in s["utilization"])
    # MFU = tokens/s x 3 x forward FLOPs per token at the stage's top-k / (peak x 2 ranks)
    from omegaconf import OmegaConf

    from moetrain.config import TrainConfig
    from moetrain.metrics.flops import forward_flops_per_token

    saved = OmegaConf.load(tmp_path / "a" / ".hydra" / "config.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    for s, k in zip(stages, (2, 1, 1)):
        flops = 3 * forward_flops_per_token(cfg.model, cfg.moe, k).total
        assert s["mfu"] == pytest.approx(s["tokens_per_s"] * flops / (0.001e12 * 2), rel=1e-9)
    top1_flops = 3 * forward_flops_per_token(cfg.model, cfg.moe, 1).total
    assert full[4]["train/mfu"] == pytest.approx(full[4]["train/tokens_per_s"] * top1_flops / 2e9)
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| top2 | 0-3 | 2 | dropless |" in report and "| top1 | 3-6 | 1 | 1.25 | reroute |" in report
    assert f"{stages[1]['val_loss']:.4f}" in report and f"{stages[1]['expert_flops_per_token']:.4g}" in report
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0 and (tmp_path / "a" / "utilization.png").stat().st_size > 0

    def weights(step):  # our own checkpoint, loaded without unpickling code
        path = tmp_path / "a" / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
        return torch.load(path, weights_only=True)["module"]

    w6, w9 = weights(6), weights(9)  # the router-only stage leaves everything but the routers untouched
    assert torch.equal(w6["layers.0.ffn.experts.w1_EDF"], w9["layers.0.ffn.experts.w1_EDF"])
    assert torch.equal(w6["layers.0.attn.wq.weight"], w9["layers.0.attn.wq.weight"])
    assert not torch.equal(w6["layers.0.ffn.router.weight_ED"], w9["layers.0.ffn.router.weight_ED"])

    for name, tag, first in (("mid_stage", "step_00000004", 5), ("boundary", "step_00000003", 4)):
        run_launcher(
            [
                *DEEPSPEED_2,
                TRAIN,
                *STAGED,
                f"trainer.resume={tmp_path}/a/checkpoints/{tag}",
                f"hydra.run.dir={tmp_path}/{name}",
            ],
            tmp_path,
        )
        assert_same_losses(read_metrics(tmp_path / name), full, range(first, 10))
        resumed_stages = json.loads((tmp_path / name / "summary.json").read_text())["stages"]
        for s, r in zip(stages, resumed_stages, strict=True):
            for key in ("stage", "end_step", "val_loss", "expert_flops_per_token", "dropped_frac", "entropy"):
                assert r[key] == pytest.approx(s[key], abs=1e-6), (name, s["stage"], key)

    # kill -9 while step 8's checkpoint is being written: 6 stays the latest, and resume=auto continues from it
    crash = [*DEEPSPEED_2, TRAIN, *STAGED, f"hydra.run.dir={tmp_path}/crash", "trainer.resume=auto"]
    killed = subprocess.run(
        crash,
        cwd=ROOT,
        env={**launcher_env(tmp_path), "MOETRAIN_FAULT": "kill-during-save:8"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode != 0
    ckpts = tmp_path / "crash" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006" and (ckpts / "step_00000008").is_dir()
    run_launcher(crash, tmp_path)
    assert_same_losses(read_metrics(tmp_path / "crash"), full, range(7, 10))
    assert (ckpts / "latest").read_text() == "step_00000009"


@pytest.mark.parametrize("zero", [0, 1])
def test_deepspeed_backend_single_rank_zero_stages(tmp_path, zero):
    """DeepSpeed's MoE layer with ZeRO-0 and ZeRO-1 (MoE parameter groups) trains and equals native."""
    base = [*FAST, "logging.wandb.mode=disabled", "trainer.max_steps=3", f"parallel.zero_stage={zero}"]
    for backend in ("native", "deepspeed"):
        run_launcher(
            [str(BIN / "python"), TRAIN, *base, f"moe.backend={backend}", f"hydra.run.dir={tmp_path}/{backend}"],
            tmp_path,
        )
    assert_same_losses(read_metrics(tmp_path / "deepspeed"), read_metrics(tmp_path / "native"), range(1, 4), 1e-5)


def test_bad_data_path_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 finds the problem while loading data; the other rank must not hang at a barrier."""
    import subprocess

    from helpers.launch import launcher_env

    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        *FAST,
        f"data.path={tmp_path}/missing",
        "logging.wandb.mode=disabled",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert f"config error: data.path={tmp_path}/missing matches no .txt/.jsonl/.json/.parquet file" in proc.stderr
