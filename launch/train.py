"""Train an MoE transformer from a Hydra recipe.

python launch/train.py +recipe=top2_baseline
deepspeed --num_gpus 2 launch/train.py +recipe=top2_baseline trainer.max_steps=20
torchrun --nproc_per_node 2 launch/train.py +recipe=top2_baseline
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moetrain.config import ConfigError, register_configs, to_typed, validate
from moetrain.distributed import LaunchEnv
from moetrain.launch_args import prepare_argv

register_configs()


@hydra.main(version_base="1.3", config_path="../recipes", config_name="train")
def main(dcfg: DictConfig) -> float | None:
    env = LaunchEnv.from_env()
    try:
        cfg = to_typed(dcfg)
        validate(cfg, world_size=env.world_size)
        from moetrain.trainer import Trainer  # heavy imports (deepspeed) only once the config is valid

        summary = Trainer(cfg, Path(HydraConfig.get().runtime.output_dir)).fit()
    except ConfigError as e:  # also raised by checks that need the data or the launch (every rank agrees)
        if env.is_main:
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary["val_loss"]


if __name__ == "__main__":
    sys.argv = prepare_argv(sys.argv)
    main()
