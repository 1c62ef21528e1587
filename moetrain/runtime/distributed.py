"""Process-group setup from the launcher's environment, and rank-0 helpers.

Every launcher we support (``python``, ``torchrun``, the ``deepspeed`` launcher, SLURM's ``srun`` directly, via
the scripts in launch/slurm or via the submitit launcher) describes the job in environment variables; we read
RANK / WORLD_SIZE / LOCAL_RANK (or, in an ``srun`` task that no launcher below SLURM described, SLURM's
equivalents: moetrain.runtime.slurm) and never a ``--local_rank`` argument.
"""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moetrain.runtime import slurm
from moetrain.runtime.startup import announce_long_wait, build_deepspeed_comm_op


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls) -> LaunchEnv:
        env: Mapping[str, str] = os.environ
        if "RANK" not in env:  # an srun task started without torchrun/deepspeed below it
            env = {**slurm.torch_env(env), **env}
        rank = int(env.get("RANK", 0))
        world = int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", 0))
        # torchrun and srun tasks: LOCAL_WORLD_SIZE; deepspeed launcher: LOCAL_SIZE
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        return cls(rank, world, local, local_world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(env: LaunchEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(env: LaunchEnv | None = None) -> LaunchEnv:
    """Initialise the default process group (gloo on CPU, nccl on CUDA) once; single-process runs too,
    so the DeepSpeed engine and collectives work the same way everywhere."""
    env = env or LaunchEnv.from_env()
    if dist.is_initialized():
        return env
    if "RANK" not in os.environ:  # srun task: rendezvous at the allocation's first node (moetrain.runtime.slurm)
        os.environ.update(slurm.rendezvous_env(os.environ))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError(
                "WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun, deepspeed or srun (launch/slurm)"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    # With CUDA, small bookkeeping collectives (counts, metrics) still run on CPU tensors: gloo serves those.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(env))
    else:  # before DeepSpeed's first init_distributed builds it, with no silent wait on a stale lock
        build_deepspeed_comm_op()
    rendezvous = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    with announce_long_wait(f"the {env.world_size} ranks to meet at {rendezvous} (rank {env.rank} is here)"):
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    atexit.register(release_shm_buffer, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], env.local_rank)
    return env


SHM_DIR = Path("/dev/shm")


def shm_buffer_paths(master_addr: str, master_port: str, local_rank: int | str = "*") -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers of one job (one ~66 MB file per local rank, named by the job's
    rendezvous address and port). DeepSpeed never unlinks them: each launch would leave its buffers in shared
    memory until the machine runs out of it."""
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{master_addr}_{master_port}_{local_rank}"))


def release_shm_buffer(master_addr: str, master_port: str, local_rank: int) -> None:
    """At exit: unlink this rank's buffer (the mapping stays valid until the process ends)."""
    for path in shm_buffer_paths(master_addr, master_port, local_rank):
        path.unlink(missing_ok=True)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (in place, and returned)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


_EP_GROUPS: dict[int, Any] = {}


def expert_parallel_group(ep_size: int):
    """This rank's expert-parallel group: consecutive ranks ``[g*ep, (g+1)*ep)``. Every rank must call it
    (``new_group`` is collective); groups are created once per size."""
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size} does not divide the world size {world}")
    if ep_size not in _EP_GROUPS:
        mine = None
        for g in range(world // ep_size):
            ranks = list(range(g * ep_size, (g + 1) * ep_size))
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = group
        _EP_GROUPS[ep_size] = mine
    return _EP_GROUPS[ep_size]
