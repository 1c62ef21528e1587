"""The one-line error every bad input ends in, and how a library's exception is folded into one."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid. The message is one line: ``key=value <problem>; allowed: ...``."""


def error_line(e: BaseException) -> str:
    """A library's exception as one line: its type, then its message with line breaks folded (a size mismatch
    or a JSON error spreads its one fact over several lines), cut to a length a terminal line holds."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
