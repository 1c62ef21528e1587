"""Layer 2, runtime: the process side of a run. Process groups and collectives on torch.distributed
(``distributed``), the launchers' arguments and environment (``launch_args``), SLURM allocations (``slurm``).

It may import ``config`` only.
"""
