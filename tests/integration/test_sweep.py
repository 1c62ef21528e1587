"""Sweeps without SLURM: Hydra's basic launcher (one process, and 2 ranks under torchrun), the objective each
point returns, W&B sweep groups, the sweep report; and the pure helpers they rest on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.launch import BIN, FAST, RECIPES, ROOT, launcher_env, read_metrics, run_launcher
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback

from moetrain.config import WandbConfig
from moetrain.metrics.sweep_report import SweepPoint, load_points, pareto_front, swept_keys, write_sweep_report, x_order
from moetrain.metrics.tracking import join_sweep_group, sweep_id
from moetrain.runtime import slurm

TRAIN = str(ROOT / "launch" / "train.py")
TINY = [*FAST, "+recipe=top2_baseline", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.save_every=6"]


class RecordObjective(Callback):
    """What a sweeper receives from each point (``JobReturn.return_value``), written beside the run."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        out = Path(config.hydra.runtime.output_dir) / "objective.json"
        out.write_text(json.dumps({"objective": job_return.return_value}))


def wandb_run_record(run_file: Path):
    """The run record (project, group, ...) of an offline W&B run file (LevelDB-style log of protobufs:
    7-byte file header, 32 KiB blocks, records with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = run_file.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles blocks: the rest is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {run_file}")


@pytest.mark.slow
def test_local_sweep_returns_objectives_groups_runs_and_reports(tmp_path):
    """3 capacity factors, sequentially in one process: every point trains, returns its validation loss to the
    sweeper, joins the sweep's W&B group; the sweep report repeats each point's measured numbers."""
    sweep = tmp_path / "multirun" / "2025-01-31" / "12-00-00"  # Hydra's default DATE/TIME layout
    # RecordObjective (tests/integration) and the helpers it imports (tests/)
    pythonpath = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")])}
    run_launcher(
        [
            sys.executable, TRAIN, "-m", f"hydra.sweep.dir={sweep}", "hydra/callbacks=sweep_report",
            "+hydra.callbacks.objective._target_=test_sweep.RecordObjective", *TINY, "logging.wandb.mode=offline",
            "moe.capacity_factor=1.0,1.5,2.0",
        ],
        tmp_path,
        extra_env=pythonpath,
    )  # fmt: skip
    report = (sweep / "sweep.md").read_text()
    assert "- swept: moe.capacity_factor" in report and "- points: 3 (3 finished)" in report
    dropped = []
    for num, cf in enumerate(("1.0", "1.5", "2.0")):
        run = sweep / str(num)
        summary = json.loads((run / "summary.json").read_text())
        (stage,) = summary["stages"]
        assert stage["moe.capacity_factor"] == float(cf)
        assert summary["val_loss"] == pytest.approx(read_metrics(run)[6]["val/loss"])
        assert json.loads((run / "objective.json").read_text())["objective"] == summary["val_loss"]
        (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        assert wandb_run_record(run_file).run_group == "top2_baseline-2025-01-31_12-00-00"
        row = (
            f"| {num} | {cf} | train | 0-6 | {cf} | {stage['val_loss']:.4f} | {stage['tokens_per_s']:.0f} | "
            f"{stage['dropped_frac']:.4f} | {stage['expert_flops_per_token']:.4g} |"
        )
        assert row in report
        dropped.append(stage["dropped_frac"])
    assert dropped[0] > dropped[1] > dropped[2] >= 0, dropped
    for png in ("sweep.png", "pareto.png"):
        assert (sweep / png).stat().st_size > 10_000


@pytest.mark.slow
def test_local_sweep_point_with_a_bad_value_fails_alone(tmp_path):
    """A point's ConfigError fails that point (Hydra names its overrides); the other point still trains."""
    proc = subprocess.run(
        [sys.executable, TRAIN, "-m", f"hydra.sweep.dir={tmp_path}", *FAST, "trainer.max_steps=2",
         "logging.wandb.mode=disabled", "moe.top_k=9,1"],
        cwd=ROOT, env=launcher_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Error executing job with overrides:" in proc.stderr and "'moe.top_k=9'" in proc.stderr
    assert "moetrain.config.ConfigError: moe.top_k=9 must be between 1 and moe.num_experts=8" in proc.stderr
    assert not (tmp_path / "0" / "summary.json").exists()
    assert json.loads((tmp_path / "1" / "summary.json").read_text())["step"] == 2


@pytest.mark.slow
def test_local_sweep_two_ranks_shares_one_sweep_folder(tmp_path):
    """``torchrun -m``: each point is a 2-rank run; both ranks resolve the same sweep folder."""
    run_launcher(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", TRAIN, "-m", *TINY, "logging.wandb.mode=disabled",
         "trainer.num_threads=1", "moe.capacity_factor=1.0,2.0"],
        tmp_path,
        cwd=tmp_path,
    )  # fmt: skip
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for num in ("0", "1"):
        assert "- ranks: 2" in (sweep / num / "report.md").read_text()
        assert (sweep / num / "checkpoints" / "latest").read_text() == "step_00000006"


# ---------------------------------------------------------------- report on hand-made sweep folders


def fake_point(sweep: Path, num: int, overrides: list[str], stages: list[dict] | None) -> None:
    (sweep / str(num) / ".hydra").mkdir(parents=True)
    (sweep / str(num) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if stages is not None:
        (sweep / str(num) / "summary.json").write_text(json.dumps({"stages": stages}))


def stage(name: str, index: int, cf, loss: float, speed: float, dropped: float) -> dict:
    return {
        "stage": name, "index": index, "start_step": 10 * index, "end_step": 10 * index + 10, "val_loss": loss,
        "tokens_per_s": speed, "dropped_frac": dropped, "expert_flops_per_token": 1e5, "moe.capacity_factor": cf,
    }  # fmt: skip


def test_sweep_report_per_stage_pareto_and_unfinished_points(tmp_path):
    base = ["+recipe=top2_to_top1", "trainer.max_steps=20"]
    fake_point(tmp_path, 0, [*base, "moe.capacity_factor=2.0"], [stage("top2", 0, 2.0, 3.0, 100, 0.0)])
    fake_point(tmp_path, 1, [*base, "moe.capacity_factor=1.0"], [stage("top2", 0, 1.0, 3.2, 150, 0.2)])
    fake_point(tmp_path, 2, [*base, "moe.capacity_factor=1.5"], [stage("top2", 0, 1.5, 3.3, 120, 0.1)])
    fake_point(tmp_path, 3, [*base, "moe.capacity_factor=null"], None)  # still running / failed
    for num in (0, 1):  # a second stage on two points
        summary = json.loads((tmp_path / str(num) / "summary.json").read_text())
        summary["stages"].append(stage("top1", 1, 1.25, 2.9 + num, 200, 0.05))
        (tmp_path / str(num) / "summary.json").write_text(json.dumps(summary))

    files = write_sweep_report(tmp_path)
    report = files["report"].read_text()
    assert "- points: 4 (3 finished; unfinished: 3)" in report
    assert "- swept: moe.capacity_factor" in report
    assert "- fixed overrides: +recipe=top2_to_top1 trainer.max_steps=20" in report
    lines = [line for line in report.splitlines() if line.startswith("| ") and "point" not in line]
    # ordered by capacity factor, then stage; Pareto within each stage: 1.5 is slower and worse than 1.0
    assert lines == [
        "| 1 | 1.0 | top2 | 0-10 | 1.0 | 3.2000 | 150 | 0.2000 | 1e+05 | yes |",
        "| 1 | 1.0 | top1 | 10-20 | 1.25 | 3.9000 | 200 | 0.0500 | 1e+05 |  |",
        "| 2 | 1.5 | top2 | 0-10 | 1.5 | 3.3000 | 120 | 0.1000 | 1e+05 |  |",
        "| 0 | 2.0 | top2 | 0-10 | 2.0 | 3.0000 | 100 | 0.0000 | 1e+05 | yes |",
        "| 0 | 2.0 | top1 | 10-20 | 1.25 | 2.9000 | 200 | 0.0500 | 1e+05 | yes |",
    ]
    assert files["sweep"].stat().st_size > 0 and files["pareto"].stat().st_size > 0


def test_sweep_report_cli_names_a_folder_that_is_not_a_sweep(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "sweep_report.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {tmp_path} has no points (no */.hydra/overrides.yaml): is it a multirun folder?"
    )


CFS = ("2.0", "null", "1.25", "1.0")


def test_pareto_front_and_sweep_order():
    # (tokens/s, val loss): the 3rd is dominated by the 1st (slower, worse); equal pairs do not dominate each other
    assert pareto_front([(100, 3.0), (150, 3.2), (90, 3.1), (150, 3.2), (math.nan, 1.0)]) == [
        True,
        True,
        False,
        True,
        False,
    ]
    points = [SweepPoint(Path(str(i)), [], {"moe.capacity_factor": v, "seed": "1"}, None) for i, v in enumerate(CFS)]
    assert swept_keys(points) == ["moe.capacity_factor"]
    assert x_order(points, "moe.capacity_factor") == ["1.0", "1.25", "2.0", "null"]


def test_sweep_points_load_in_job_order(tmp_path):
    for num in (10, 2, 1):
        fake_point(tmp_path, num, [f"moe.capacity_factor={num}"], [])
    assert [p.folder.name for p in load_points(tmp_path)] == ["1", "2", "10"]


def test_wandb_sweep_group():
    assert sweep_id("multirun/2025-01-31/12-00-00") == "2025-01-31_12-00-00"
    assert sweep_id("/scratch/cf-sweep") == "cf-sweep"
    w = WandbConfig(group="top2_baseline")
    join_sweep_group(w, "multirun/2025-01-31/12-00-00")
    assert w.group == "top2_baseline-2025-01-31_12-00-00"
    w = WandbConfig()
    join_sweep_group(w, "/scratch/cf-sweep")
    assert w.group == "cf-sweep"
    w = WandbConfig(group="mine", group_by_sweep=False)
    join_sweep_group(w, "/scratch/cf-sweep")
    assert w.group == "mine"


# ---------------------------------------------------------------- SLURM environment (no cluster needed)

SRUN_TASK = {
    "SLURM_JOB_ID": "4321",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}


def test_slurm_task_environment():
    assert slurm.torch_env(SRUN_TASK) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    batch_step = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert slurm.torch_env(batch_step) == {}  # the batch script itself is not a rank
    assert [slurm.tasks_on_node("4(x2),2", n) for n in range(3)] == [4, 4, 2]
    with pytest.raises(ValueError, match=r"SLURM tasks-per-node value '4x2' is not like '2\(x3\),1'"):
        slurm.tasks_on_node("4x2", 0)
    with pytest.raises(ValueError, match="SLURM_NODEID=2 is outside the 2 nodes of '1,1'"):
        slurm.tasks_on_node("1,1", 2)


def test_launch_env_from_srun_task_and_launchers_below_it(monkeypatch):
    from moetrain.runtime.distributed import LaunchEnv

    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert LaunchEnv.from_env() == LaunchEnv(rank=3, world_size=4, local_rank=1, local_world_size=2)
    # the deepspeed launcher inside an srun task describes its own ranks: SLURM's numbers do not mix in
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert LaunchEnv.from_env() == LaunchEnv(rank=0, world_size=8, local_rank=0, local_world_size=8)


def test_master_port_from_job_id():
    """Below the ephemeral range; launch/slurm/rendezvous.sh computes the same (checked on the cluster)."""
    assert slurm.master_port(4321) == 14321 and slurm.master_port(123456) == 13456


@pytest.mark.parametrize(
    ("env", "args", "error"),
    [
        ({}, [], "error: no SLURM_JOB_ID: submit this script with sbatch (see docs/slurm.md)"),
        (
            {"SLURM_JOB_ID": "7", "PYTHON": "/nonexistent/python"},
            [],
            "error: PYTHON=/nonexistent/python is not executable; set PYTHON=/path/to/venv/bin/python",
        ),
        (
            {"SLURM_JOB_ID": "7"},
            ["-m", "moe.capacity_factor=1,2"],
            "error: -m: an sbatch job is one run; sweep with hydra/launcher=slurm (docs/slurm.md)",
        ),
    ],
)
def test_sbatch_scripts_reject_bad_input_with_one_line(env, args, error):
    for script in ("train.sbatch", "train_deepspeed.sbatch"):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        proc = subprocess.run(
            ["bash", str(ROOT / "launch" / "slurm" / script), *args],
            cwd=ROOT,
            env={**clean, "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": sys.executable, **env},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and proc.stderr.strip() == error, (script, proc.stderr)


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        ("slurm", {"nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 12, "timeout_min": 240}),
        ("slurm_cpu", {"nodes": 2, "tasks_per_node": 1, "gpus_per_node": None, "cpus_per_task": 1, "timeout_min": 30}),
    ],
)
def test_slurm_launcher_configs_compose(launcher, expected):
    """The launcher configs compose against hydra-submitit-launcher's schema (an unknown key would fail)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        overrides = [f"hydra/launcher={launcher}", "hydra/callbacks=sweep_report"]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert {k: launcher_cfg[k] for k in expected} == expected
    assert cfg.hydra.callbacks.sweep_report._target_ == "moetrain.metrics.sweep_report.SweepReportCallback"
