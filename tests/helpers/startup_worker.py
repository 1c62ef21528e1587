"""A launched rank that only starts up: joins the process group as a training run does (which builds or loads
DeepSpeed's CPU comm op first: moetrain.runtime.startup) and exits."""

from __future__ import annotations

from moetrain.runtime.distributed import barrier, init_distributed

if __name__ == "__main__":
    env = init_distributed()
    barrier()
    print(f"rank {env.rank} started", flush=True)
