"""SLURM's description of a job step, turned into torch.distributed's environment variables.

Inside an ``srun`` step every task has SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the step's node list;
torch.distributed wants RANK / LOCAL_RANK / WORLD_SIZE and a rendezvous address. The sbatch scripts in
launch/slurm export those themselves; tasks started another way (a plain ``srun python ...``, the submitit
launcher) get the same values from here. The batch script itself (no SLURM_STEP_ID) is not a task: a
``python launch/train.py`` run there stays a single process.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping

# Ports below Linux's ephemeral range (32768+), so an outgoing connection cannot already hold the port.
# launch/slurm/rendezvous.sh uses the same formula.
PORT_BASE, PORT_SPAN = 10000, 20000

_TASKS_PER_NODE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def in_slurm_step(env: Mapping[str, str]) -> bool:
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def master_port(job_id: int) -> int:
    """One port per job, the same on every node, without any communication."""
    return PORT_BASE + job_id % PORT_SPAN


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed count, e.g. ``"2(x3),1"`` = 2, 2, 2, 1."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = _TASKS_PER_NODE.match(part.strip())
        if not m:
            raise ValueError(f"SLURM tasks-per-node value {tasks_per_node!r} is not like '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} is outside the {len(counts)} nodes of {tasks_per_node!r}")
    return counts[node_id]


def torch_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE of an ``srun`` task (empty outside a step)."""
    if not in_slurm_step(env):
        return {}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env["SLURM_NTASKS"]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0)))),
    }


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def first_node_address(nodelist: str) -> str:
    """The address of the allocation's first node: its NodeAddr (the node name unless slurm.conf sets one;
    several node names on one host share that host's address)."""
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", first))
    return m.group(1) if m else first


def rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT of an ``srun`` task, where the launcher has not set them."""
    if not in_slurm_step(env):
        return {}
    out: dict[str, str] = {}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_node_address(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(master_port(int(env["SLURM_JOB_ID"])))
    return out
