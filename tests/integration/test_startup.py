"""Start-up under the real launchers: a fatal error's one line reaches stderr whichever rank finds it first
(moetrain/runtime/fatal.py), and a stale build lock left by a killed DeepSpeed op build neither hangs a launch
nor goes unsaid (moetrain/runtime/startup.py)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from helpers.launch import BIN, EXTENSIONS_DIR, ROOT, free_port, launcher_env

from moetrain.runtime import startup

WORKER = str(ROOT / "tests" / "helpers" / "fatal_worker.py")
LINE = "config error: data.path=/nowhere matches no file (found by rank"


def launch(cmd: list[str], tmp_path: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    env = {**launcher_env(tmp_path), **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *args]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("finders", "delayed", "printer"),
    [
        ("0,1", "0", "1"),  # both find it, the main rank is slow: rank 1 exits first and must print
        ("0,1", "1", "0"),  # both find it, rank 1 is slow
        ("1", "", "1"),  # only rank 1 finds it while the main rank waits (as in a collective)
    ],
    ids=["main-rank-delayed", "other-rank-delayed", "only-rank-1-finds-it"],
)
def test_the_line_reaches_stderr_once_whichever_rank_exits_first(tmp_path, finders, delayed, printer):
    proc = launch(torchrun(WORKER, finders, delayed, "3"), tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count(LINE) == 1, proc.stderr[-3000:]
    assert f"{LINE} {printer})" in proc.stderr


@pytest.mark.slow
def test_the_line_reaches_stderr_under_the_deepspeed_launcher_with_the_main_rank_delayed(tmp_path):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), WORKER, "0,1", "0", "3"]
    proc = launch(cmd, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count(LINE) == 1, proc.stderr[-3000:]


def test_a_single_process_prints_and_exits_non_zero(tmp_path):
    env = {**launcher_env(tmp_path), "WORLD_SIZE": "1"}
    proc = subprocess.run(
        [str(BIN / "python"), WORKER, "0", "", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{LINE} 0)"


def test_a_lock_that_a_process_holds_is_kept_and_one_nobody_holds_is_removed(tmp_path):
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton: held open while its build runs
    try:
        assert os.getpid() in startup.lock_holders(lock)
        assert not startup.remove_stale_lock(lock) and lock.exists()
    finally:
        os.close(fd)
    err = io.StringIO()
    with redirect_stderr(err):
        assert startup.remove_stale_lock(lock)
    assert not lock.exists()
    assert f"removed a stale build lock {lock}" in err.getvalue()


def test_a_long_wait_says_what_it_waits_for():
    err = io.StringIO()
    with redirect_stderr(err), startup.announce_long_wait("the other ranks", every=0.05):
        deadline = time.monotonic() + 30  # a loaded machine may schedule the announcing thread late
        while "still waiting" not in err.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "still waiting" in err.getvalue() and "for the other ranks" in err.getvalue()
    quiet = io.StringIO()
    with redirect_stderr(quiet), startup.announce_long_wait("nothing", every=5):
        pass
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_a_stale_build_lock_is_reported_and_the_launch_goes_on(tmp_path):
    """A lock left by a killed build of DeepSpeed's CPU comm op: the 2-rank deepspeed launch removes it, says so
    in one line naming it, and starts within a minute (torch alone would wait on it forever, silently). In an
    extensions folder of its own (a copy of the built op where there is one), so that no other launch's build
    holds the lock meanwhile."""
    extensions = tmp_path / "torch_extensions"
    built = EXTENSIONS_DIR / "deepspeed_shm_comm"
    if (built / f"{built.name}.so").is_file():  # ninja finds the copy up to date: its outputs are relative
        with startup.exclusive_build(built, "the copy's source"):  # no build of ours is writing it meanwhile
            shutil.copytree(built, extensions / built.name, ignore=shutil.ignore_patterns("lock", "*.flock"))
    lock = extensions / built.name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    worker = str(ROOT / "tests" / "helpers" / "startup_worker.py")
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), worker]
    start = time.monotonic()
    # a first build on a fresh machine takes about a minute
    proc = launch(cmd, tmp_path, timeout=300, TORCH_EXTENSIONS_DIR=str(extensions))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"removed a stale build lock {lock}") == 1, proc.stderr[-3000:]
    assert "rank 0 started" in proc.stdout and "rank 1 started" in proc.stdout
    assert not lock.exists()
    assert time.monotonic() - start < 240
