"""Start-up waits that say what they wait for, and DeepSpeed's CPU comm op built without a silent hang.

Why: DeepSpeed JIT-builds its CPU communication op (``deepspeed_shm_comm``) in every rank's first
``deepspeed.init_distributed``, through torch's ``cpp_extension.load``. torch guards the build folder with a
``lock`` file created with ``O_EXCL``; it holds no kernel lock on it and stores no owner, and a rank that finds it
polls until it disappears, with no timeout and no output. A build killed by Ctrl-C or ``kill -9`` leaves the file
behind, and every later launch then waits forever, printing nothing.

:func:`build_deepspeed_comm_op` builds (or loads) the op before DeepSpeed asks for it, one rank of the machine at
a time under an ``flock`` of our own (the kernel releases it when its holder dies, however it dies). Holding it,
a rank knows that no rank of ours is building: a torch ``lock`` that no process has open (``/proc/*/fd``) was
left by a killed build, and is removed with one line naming it. A lock that a live process holds (a build
outside moetrain) is waited for, and :func:`announce_long_wait` names it once a minute. DeepSpeed's own call
then finds the op loaded (its builders cache loaded ops per process).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ANNOUNCE_AFTER_SECONDS = 60.0
COMM_OP_BUILDER = "ShareMemCommBuilder"


def say(line: str) -> None:
    """One line on stderr, before logging is set up (the launchers collect every rank's stderr)."""
    print(f"[moetrain rank {os.environ.get('RANK', '0')}] {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def announce_long_wait(what: str, every: float = ANNOUNCE_AFTER_SECONDS) -> Iterator[None]:
    """Inside the block, say ``still waiting (N s) for <what>`` every ``every`` seconds after the first ``every``."""
    done = threading.Event()
    start = time.monotonic()

    def announce() -> None:
        while not done.wait(every):
            say(f"still waiting ({time.monotonic() - start:.0f} s) for {what}")

    thread = threading.Thread(target=announce, name="moetrain-wait-announcer", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def lock_holders(path: Path) -> list[int]:
    """Pids of the processes that have ``path`` open (those this user may inspect)."""
    target = os.path.realpath(path)
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                holders.append(int(pid))
        except OSError:  # gone, or not ours to read
            continue
    return holders


def remove_stale_lock(lock: Path) -> bool:
    """Remove torch's build ``lock`` if no process has it open (its builder was killed); True if removed.
    Call it only while holding the build folder's flock, so that no builder of ours is between creating the
    lock and opening it."""
    if not lock.exists() or lock_holders(lock):
        return False
    try:
        lock.unlink()
    except FileNotFoundError:  # its builder finished just now
        return False
    say(f"removed a stale build lock {lock}: no process holds it (a build of this op was killed)")
    return True


@contextlib.contextmanager
def exclusive_build(folder: Path, what: str) -> Iterator[None]:
    """One process of this machine at a time in ``folder`` (an ``flock`` on ``folder/moetrain.flock``),
    announcing a long wait for it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "moetrain.flock", "a") as f:
        with announce_long_wait(f"another process building {what} in {folder} (holding {folder / 'moetrain.flock'})"):
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_deepspeed_comm_op() -> None:
    """Build or load DeepSpeed's CPU comm op now, safely (module docstring); nothing where DeepSpeed would not
    build it (no such op for this accelerator, or not compatible with this machine)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(COMM_OP_BUILDER)
    # DeepSpeed probes every op by compiling test programs; setuptools logs each compiler command at INFO
    logging.getLogger("compilers").setLevel(logging.WARNING)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    what = f"DeepSpeed's CPU comm op ({builder.NAME})"
    with exclusive_build(folder, what):
        lock = folder / "lock"
        remove_stale_lock(lock)
        first = not any(folder.glob("*.so"))
        if first:
            say(f"building {what} in {folder}: once per machine, about a minute")
        with announce_long_wait(f"the build of {what} (torch's lock {lock}, held by pids {lock_holders(lock)})"):
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's compiler probes print on stdout
                builder.load()
