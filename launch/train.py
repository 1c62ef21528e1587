"""Train an MoE transformer from a Hydra recipe.

python launch/train.py +recipe=top2_baseline
deepspeed --num_gpus 2 launch/train.py +recipe=top2_baseline trainer.max_steps=20
torchrun --nproc_per_node 2 launch/train.py +recipe=top2_baseline
sbatch launch/slurm/train.sbatch +recipe=top2_baseline                     (docs/slurm.md)
python launch/train.py -m hydra/launcher=slurm +recipe=top1_prune moe.capacity_factor=1.0,1.25,1.5,2.0

Returns the validation loss (all-reduced over ranks) as the objective of a sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from moetrain.config import ConfigError, register_configs
from moetrain.config.retired import check_retired_keys
from moetrain.interop.entry import resolve_config
from moetrain.metrics.tracking import join_sweep_group
from moetrain.runtime.distributed import LaunchEnv
from moetrain.runtime.fatal import exit_with_error
from moetrain.runtime.launch_args import keep_log_file_on_rank0, prepare_argv

register_configs()


@hydra.main(version_base="1.3", config_path="../recipes", config_name="train")
def main(dcfg: DictConfig) -> float | None:
    env = LaunchEnv.from_env()
    keep_log_file_on_rank0(env)
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        cfg = resolve_config(dcfg, world_size=env.world_size, cuda=torch.cuda.is_available())
        if sweep:
            join_sweep_group(cfg.logging.wandb, hydra_cfg.sweep.dir)
        from moetrain.interop.assemble import build_trainer  # heavy imports (deepspeed) once the config is valid

        summary = build_trainer(cfg, Path(hydra_cfg.runtime.output_dir)).fit()
    except ConfigError as e:  # also raised by checks that need the data or the launch (every rank agrees)
        if sweep:
            raise  # this point fails; Hydra reports it with its overrides, and the other points still run
        exit_with_error(f"config error: {e}")  # whichever rank finds it, the line is printed once
    return summary["val_loss"]


if __name__ == "__main__":
    sys.argv = prepare_argv(sys.argv)
    try:
        check_retired_keys(sys.argv[1:])
    except ConfigError as e:
        exit_with_error(f"config error: {e}")
    main()
