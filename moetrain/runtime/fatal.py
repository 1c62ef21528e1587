"""A fatal error's one line reaches stderr whichever rank finds it, and every rank exits non-zero.

Why not "rank 0 prints": torchrun and the deepspeed launcher stop every other rank as soon as one exits
non-zero. When the ranks all find the same bad input (every rank validates the config), the one that exits
first may be a rank that does not print, and the launcher then kills the printing rank before it prints.

The design has no timing assumption. The ranks of one launch on one node share a claim file, named by the
launcher process that started them (their parent: its pid and start time, so a finished launch's files can
never match a new one) and the rendezvous port:

1. a rank that finds the error creates ``claim`` with ``O_EXCL``: exactly one rank wins;
2. the winner prints the line, flushes stderr, then creates ``printed``, and exits;
3. every other rank that found an error waits for ``printed`` before it exits, so no launcher can stop the
   winner on its account before the line is out. If the winner disappears without printing (killed by
   something else), a waiting rank prints the line itself once ``printed`` is still missing after
   ``FALLBACK_SECONDS``: the line may then appear twice, never zero times.

A rank that did not find the error (e.g. waiting in a collective for the one that did) is stopped by the
launcher after the winner exits, which is after the line is out. A single process just prints. Ranks on
other nodes print on their own node's stderr (one line per node).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

FALLBACK_SECONDS = 30.0
_POLL_SECONDS = 0.05


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; field 22 is the 20th of them


def _marker_root() -> Path:
    return Path(tempfile.gettempdir()) / f"moetrain-fatal-{os.getuid()}"


def _launch_dir() -> Path | None:
    """The folder the ranks of this launch on this node share (None for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    parent = os.getppid()
    start = _process_start(parent)
    if start is None:
        return None
    return _marker_root() / f"{parent}-{start}-{os.environ.get('MASTER_PORT', '0')}"


def _forget_finished_launches(root: Path) -> None:
    """Remove the folders of launchers that no longer run (their pid is gone or now names another process)."""
    for entry in root.glob("*-*-*"):
        pid, start, _ = entry.name.split("-", 2)
        if pid.isdigit() and _process_start(int(pid)) != start:
            for f in entry.iterdir():
                f.unlink(missing_ok=True)
            entry.rmdir()


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def report_once(line: str) -> None:
    """Print ``line`` on stderr once per launch and node, whichever of its ranks call this (see the module
    docstring); returns once the line is out."""
    shared = _launch_dir()
    if shared is None:
        _print(line)
        return
    shared.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(shared / "claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        deadline = time.monotonic() + FALLBACK_SECONDS
        while not (shared / "printed").exists():
            if time.monotonic() > deadline:
                _print(line)
                return
            time.sleep(_POLL_SECONDS)
        return
    _print(line)
    (shared / "printed").touch()
    try:
        _forget_finished_launches(_marker_root())
    except OSError:  # another launch's rank tidying at the same time
        pass


def exit_with_error(line: str, code: int = 2) -> NoReturn:
    """:func:`report_once` the line, then exit with ``code`` (every rank that calls this exits non-zero)."""
    report_once(line)
    sys.exit(code)
