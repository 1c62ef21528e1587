"""Hydra's compose API over recipes/, and the one family of config-error checks: a bad value (or file) fails
with one line that starts with ``key=value`` and names what is allowed, in-process and through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from helpers.launch import RECIPES, ROOT, launcher_env
from moetrain.config import ConfigError, TrainConfig, register_configs
from moetrain.interop.entry import resolve_config

register_configs()


def compose_config(overrides: list[str] | None = None) -> TrainConfig:
    """The typed config the entry point would train with (composition, HF architecture, tokenizer, validation)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return resolve_config(compose(config_name="train", overrides=overrides or []))


def assert_config_error(overrides: list[str], key_value: str, allowed: str) -> None:
    """Composing ``overrides`` fails with one line that starts with ``key_value`` and contains ``allowed``."""
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    msg = str(err.value)
    assert msg.startswith(key_value), msg
    assert allowed in msg
    assert "\n" not in msg


def assert_composition_error(overrides: list[str], allowed: str) -> None:
    """Composing ``overrides`` fails at composition (an Enum choice): Hydra names the override, OmegaConf the
    allowed values (``expected one of [allowed]``)."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(overrides)
    assert overrides[0] in str(err.value)
    assert f"expected one of [{allowed}]" in str(err.value.__cause__)


def cli_error_lines(tmp_path: Path, script: str, *args: str) -> list[str]:
    """``script`` (a path under the repository) with ``args`` exits 2 without a traceback; returns its non-empty
    stderr lines."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=launcher_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def cli_config_error(tmp_path: Path, *overrides: str) -> str:
    """``launch/train.py`` with ``overrides`` exits 2; returns its last stderr line (the one-line error)."""
    return cli_error_lines(tmp_path, "launch/train.py", *overrides, f"hydra.run.dir={tmp_path / 'run'}")[-1]
