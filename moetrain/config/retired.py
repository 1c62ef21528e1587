"""Keys that were renamed or left the schema: a command line that still sets one stops with one line that
names the new key, instead of Hydra's "key not in struct"."""

from __future__ import annotations

from collections.abc import Iterable

from moetrain.config.choices import ExpertImpl
from moetrain.config.errors import ConfigError

# old key -> (new key, old value -> new value)
_RENAMED: dict[str, tuple[str, dict[str, str]]] = {
    "moe.grouped_mm": (
        "moe.expert_impl",
        {"fused": "cpu_kernel", "grouped": "grouped_mm", "auto": "auto", "loop": "loop"},
    ),
    "trainer.cpu_malloc": ("MOETRAIN_CPU_MALLOC (an environment variable)", {}),
    "trainer.cpu_huge_pages": ("MOETRAIN_CPU_HUGE_PAGES (an environment variable, on | off)", {}),
}
_ALLOWED = {"moe.expert_impl": ", ".join(ExpertImpl.values())}


def check_retired_keys(overrides: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for the first override (``key=value``, ``+key=value``) of a retired key."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in _RENAMED:
            continue
        new_key, values = _RENAMED[key]
        hint = f"{new_key}={values[value]}" if value in values else new_key
        allowed = f"; allowed: {_ALLOWED[new_key]}" if new_key in _ALLOWED else ""
        raise ConfigError(f"{key}={value} is retired; use {hint}{allowed}")
