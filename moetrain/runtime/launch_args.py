"""Command-line preparation shared by every launcher, done before Hydra parses ``sys.argv``.

* The deepspeed launcher appends ``--local_rank=N``; Hydra would reject it. Rank comes from the environment.
* All ranks of one run must share one run folder. Each rank resolving ``${now:...}`` itself races across a
  second boundary, so rank 0's clock is broadcast and passed to every rank as ``hydra.run.dir``.
* Only rank 0 writes Hydra's ``.hydra/`` folder and the job log file.
* A multirun (``-m``) started on several ranks (``torchrun ... -m``) runs every point on all ranks: the sweep
  folder is resolved once, the same way. Submitit's SLURM tasks share their overrides, so there each task
  writes ``.hydra/`` (the same files) and ranks other than 0 drop the log file once the job starts.
"""

from __future__ import annotations

import logging
import re
import time

from moetrain.runtime.distributed import LaunchEnv, broadcast_object, init_distributed

_LOCAL_RANK = re.compile(r"^--local[_-]rank(=.*)?$")


def strip_local_rank(args: list[str]) -> list[str]:
    out: list[str] = []
    skip_next = False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if _LOCAL_RANK.match(a):
            skip_next = "=" not in a  # "--local_rank N" form
            continue
        out.append(a)
    return out


def prepare_argv(argv: list[str], env: LaunchEnv | None = None) -> list[str]:
    env = env or LaunchEnv.from_env()
    args = strip_local_rank(argv[1:])
    multirun = any(a in ("-m", "--multirun") for a in args)
    if env.world_size > 1:
        key, base = ("hydra.sweep.dir", "multirun") if multirun else ("hydra.run.dir", "outputs")
        if not any(a.startswith(f"{key}=") for a in args):
            init_distributed(env)
            stamp = broadcast_object(time.strftime("%Y-%m-%d/%H-%M-%S"))
            args.append(f"{key}={base}/{stamp}")
        if not env.is_main:
            args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return [argv[0], *args]


def keep_log_file_on_rank0(env: LaunchEnv) -> None:
    """Inside a job: ranks other than 0 stop writing Hydra's job log file (``<job name>.log``), which every
    task of a submitit SLURM job opened in the shared run folder."""
    if env.is_main:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
