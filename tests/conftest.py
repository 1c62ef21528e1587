"""Session set-up only (the shared helpers are modules under tests/helpers): the schema is in Hydra's
ConfigStore before any test composes a recipe, whichever test runs first; under pytest-xdist every worker runs
torch on one thread (two workers on two cores: more threads only wait for each other, and spin while they wait)."""

from __future__ import annotations

import os

import torch

from moetrain.config import register_configs


def pytest_configure(config) -> None:
    register_configs()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
