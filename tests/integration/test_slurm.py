"""On a real SLURM cluster (launch/slurm/local_cluster.sh: slurmctld, two slurmd node names on this host,
slurmdbd): the sbatch scripts and the submitit sweep launcher, 2 CPU ranks on 2 nodes each."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time

import pytest
from helpers.launch import FAST, ROOT, launcher_env, read_metrics, run_launcher

from moetrain.runtime import slurm

# one cluster (slurm_env, a session fixture): the module's tests share a pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]
TRAIN = str(ROOT / "launch" / "train.py")
SLURM = ROOT / "launch" / "slurm"
NODES = "node[1-2]"  # local_cluster.sh's two node names


def run_args(steps: int) -> list[str]:
    """A tiny run of ``steps`` steps, routing metrics at the end; the nodes share this host's cores."""
    return [
        *FAST,
        "+recipe=top2_baseline",
        "trainer.num_threads=1",
        "logging.wandb.mode=disabled",
        f"trainer.max_steps={steps}",
        f"trainer.expert_stats_every={steps}",
    ]


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """The environment that reaches the local cluster (started here if .ci/run did not already)."""
    up = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "up"], capture_output=True, text=True, timeout=600, check=False
    )
    env_line = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "env"], capture_output=True, text=True, check=True
    ).stdout
    conf = env_line.strip().removeprefix("export SLURM_CONF=")
    env = {**launcher_env(tmp_path_factory.getbasetemp()), "SLURM_CONF": conf, "PYTHON": sys.executable}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if up.returncode != 0:
        pytest.skip(f"SLURM could not be started here: local_cluster.sh up exited {up.returncode}: {up.stderr[-500:]}")
    sinfo = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if sinfo.returncode != 0:
        pytest.skip(f"the local SLURM cluster does not answer: sinfo: {sinfo.stderr.strip()[-300:]}")
    assert sorted(line.split()[0] for line in sinfo.stdout.splitlines()) == ["node1", "node2"], sinfo.stdout
    return env


def sbatch(script: str, args: list[str], env: dict[str, str], cwd) -> str:
    """Submit, wait for the end, return the job id; a failed job fails the test with its output."""
    proc = subprocess.run(
        ["sbatch", "--nodes=2", "--ntasks-per-node=1", "--parsable", "-o", f"{cwd}/slurm-%j.out",
         str(SLURM / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    state = wait_for_job(job, env)
    out = (cwd / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", f"job {job} ({script}) ended {state}:\n{out[-6000:]}"
    return job


def wait_for_job(job: str, env: dict[str, str], timeout: float = 600) -> str:
    """Poll the controller until the job ends (``sbatch --wait`` backs off to ~30 s between its checks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        show = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
        state = re.search(r"\bJobState=(\S+)", show.stdout)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state.group(1)
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env, check=False)
    raise AssertionError(f"job {job} did not end within {timeout} s")


def job_nodes(job: str, env: dict[str, str]) -> str:
    """The allocation of a finished job, from SLURM's accounting (or its controller while it remembers)."""
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job], env=env, capture_output=True, text=True
    )
    if acct.returncode == 0 and acct.stdout.strip():
        return acct.stdout.split()[0]
    show = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, check=True)
    return re.search(r"\bNodeList=(\S+)", show.stdout).group(1)


def assert_two_rank_run(run_dir, steps: int) -> dict:
    """One run folder written by 2 ranks: rank 0's config, both ranks' checkpoint state, counts over both."""
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == f"step_{steps:08d}"
    assert sorted(p.name for p in (run_dir / "checkpoints" / latest).glob("rank_state_*.pt")) == [
        "rank_state_00000.pt",
        "rank_state_00001.pt",
    ]
    assert "- ranks: 2" in (run_dir / "report.md").read_text()
    metrics = read_metrics(run_dir)
    # routed assignments summed over both ranks: 2 ranks x steps x micro-batch 4 x 64 tokens x top-2
    assert sum(metrics[steps]["moe/layer0/routed_per_expert"]) == 2 * steps * 4 * 64 * 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == steps and summary["val_loss"] == pytest.approx(metrics[steps]["val/loss"])
    return summary


def test_sbatch_two_nodes_one_run_folder(slurm_env, tmp_path):
    """train.sbatch: 2 tasks on 2 node names train one run; the run folder comes from the job id."""
    steps = 6
    env = {**slurm_env, "MOETRAIN_OUTPUTS": str(tmp_path / "outputs")}
    job = sbatch("train.sbatch", run_args(steps), env, tmp_path)
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [f"slurm-{job}"]
    assert_two_rank_run(tmp_path / "outputs" / f"slurm-{job}", steps)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    # rendezvous.sh's port is moetrain.runtime.slurm's (what a task started without the script would use)
    assert f"job {job}: 2 tasks on {NODES}, rendezvous 127.0.0.1:{slurm.master_port(int(job))}," in out
    assert job_nodes(job, env) == NODES


def test_sbatch_deepspeed_hostfile(slurm_env, tmp_path):
    """train_deepspeed.sbatch: the deepspeed launcher over a hostfile generated from SLURM's node list."""
    steps = 4
    job = sbatch("train_deepspeed.sbatch", [*run_args(steps), f"hydra.run.dir={tmp_path}/run"], slurm_env, tmp_path)
    assert (tmp_path / "run" / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert_two_rank_run(tmp_path / "run", steps)
    assert job_nodes(job, slurm_env) == NODES


def test_submitit_capacity_factor_sweep(slurm_env, tmp_path):
    """hydra/launcher=slurm_cpu: one 2-node job per capacity factor; task 0 returns the all-reduced validation
    loss to the sweeper; the sweep report shows each point's measured numbers."""
    steps = 4
    sweep = tmp_path / "sweep"
    run_launcher(
        [
            sys.executable, TRAIN, "-m", "hydra/launcher=slurm_cpu", "hydra/callbacks=sweep_report",
            f"hydra.sweep.dir={sweep}", *run_args(steps), "moe.capacity_factor=1.0,2.0",
        ],
        tmp_path,
        extra_env=slurm_env,
    )  # fmt: skip
    report = (sweep / "sweep.md").read_text()
    for num, cf in ((0, 1.0), (1, 2.0)):
        summary = assert_two_rank_run(sweep / str(num), steps)
        (stage,) = summary["stages"]
        assert stage["moe.capacity_factor"] == cf
        # task 0's result, as the submitit launcher hands it to Hydra's sweeper
        (result_file,) = sweep.glob(f".submitit/*_{num}/*_{num}_0_result.pkl")
        status, job_return = pickle.loads(result_file.read_bytes())
        assert status == "success" and job_return.return_value == pytest.approx(summary["val_loss"])
        assert (
            f"| {num} | {cf} | train | 0-{steps} | {cf} | {stage['val_loss']:.4f} | {stage['tokens_per_s']:.0f} | "
            f"{stage['dropped_frac']:.4f} |" in report
        )
        # both tasks opened the point's train.log; rank 1 dropped it when its job started
        assert (sweep / str(num) / "train.log").read_text().count("Job completed successfully") == 1
        job = result_file.parent.name  # <array job>_<index>
        assert job_nodes(job, slurm_env) == NODES
    drops = [json.loads((sweep / str(n) / "summary.json").read_text())["stages"][0]["dropped_frac"] for n in (0, 1)]
    assert drops[0] > drops[1] >= 0, "a smaller capacity factor must drop more"
    assert (sweep / "sweep.png").stat().st_size > 0 and (sweep / "pareto.png").stat().st_size > 0
