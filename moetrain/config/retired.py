"""Keys and values that were renamed or left the schema: a command line that still sets one stops with one
line that names what to use, instead of Hydra's "key not in struct" or an Enum's list."""

from __future__ import annotations

from collections.abc import Iterable

from moetrain.config.choices import ExpertImpl
from moetrain.config.errors import ConfigError

# old key -> (new key, old value -> new value)
_RENAMED: dict[str, tuple[str, dict[str, str]]] = {
    "moe.grouped_mm": (
        "moe.expert_impl",
        {"fused": "auto", "grouped": "grouped_mm", "auto": "auto", "loop": "loop"},
    ),
}
# (key, old value) -> (why, the value to use)
_RETIRED_VALUES: dict[tuple[str, str], tuple[str, str]] = {
    ("moe.expert_impl", "cpu_kernel"): ("the C++ CPU kernel was removed: ATen is the CPU path", "auto"),
}
_ALLOWED = {"moe.expert_impl": ", ".join(ExpertImpl.values())}


def check_retired_keys(overrides: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for the first override (``key=value``, ``+key=value``) of a retired key."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and (key, value) in _RETIRED_VALUES:
            why, use = _RETIRED_VALUES[key, value]
            raise ConfigError(f"{key}={value} is retired ({why}); use {key}={use}; allowed: {_ALLOWED[key]}")
        if not sep or key not in _RENAMED:
            continue
        new_key, values = _RENAMED[key]
        hint = f"{new_key}={values[value]}" if value in values else new_key
        allowed = f"; allowed: {_ALLOWED[new_key]}" if new_key in _ALLOWED else ""
        raise ConfigError(f"{key}={value} is retired; use {hint}{allowed}")
