"""Session set-up only (the shared helpers are modules under tests/helpers): the schema is in Hydra's
ConfigStore before any test composes a recipe, whichever test runs first."""

from __future__ import annotations

from moetrain.config import register_configs


def pytest_configure(config) -> None:
    register_configs()
