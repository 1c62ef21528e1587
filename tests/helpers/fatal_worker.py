"""A rank of a launched job that finds a fatal error: ``python fatal_worker.py FINDERS DELAYED SECONDS``.

Ranks in FINDERS (comma-separated) call :func:`moetrain.runtime.fatal.exit_with_error`; a rank in DELAYED first
sleeps SECONDS, so another rank is sure to exit first. Ranks that find nothing wait (as in a collective) until
the launcher stops them. Every rank reports its own line text with its rank, so a test can tell who printed."""

from __future__ import annotations

import os
import sys
import time

from moetrain.runtime.distributed import LaunchEnv
from moetrain.runtime.fatal import exit_with_error
from moetrain.runtime.launch_args import strip_local_rank

if __name__ == "__main__":
    finders_arg, delayed_arg, seconds = strip_local_rank(sys.argv[1:])
    rank = LaunchEnv.from_env().rank
    finders = {int(r) for r in finders_arg.split(",") if r}
    if rank in {int(r) for r in delayed_arg.split(",") if r}:
        time.sleep(float(seconds))
    if rank in finders:
        exit_with_error(f"config error: data.path=/nowhere matches no file (found by rank {rank})")
    time.sleep(120)  # a rank waiting for the others: the launcher must stop it
    os._exit(0)
