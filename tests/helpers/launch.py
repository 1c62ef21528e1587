"""Running the real launchers (torchrun, deepspeed) from tests, and reading what their runs wrote."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.runtime.distributed import shm_buffer_paths

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
BIN = Path(sys.executable).parent
# JIT-built C++ ops (DeepSpeed's CPU comm op) go to one folder per checkout, used by the tests in this process
# and by every launched rank: two checkouts (venvs) never rebuild each other's ops or wait on each other's build
# lock.
EXTENSIONS_DIR = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".pytest_cache" / "torch_extensions")))

__all__ = [
    "BIN",
    "EXTENSIONS_DIR",
    "FAST",
    "RECIPES",
    "ROOT",
    "assert_same_losses",
    "free_port",
    "launcher_env",
    "read_metrics",
    "run_launcher",
    "torchrun_cmd",
    "val_batches",
]


def free_port() -> int:
    """A free port for a launch's rendezvous, from this pytest-xdist worker's own range below Linux's ephemeral
    ports (15000-31999, split evenly between the workers): two workers' launches, which bind their port seconds
    after picking it, never pick the same one, and no outgoing connection is handed it meanwhile."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = (32000 - 15000) // workers
    first = 15000 + index * width
    while True:
        port = random.randrange(first, first + width)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
        return port


def launcher_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MOETRAIN_CACHE=str(ROOT / ".pytest_cache" / "moetrain-data"),
        HYDRA_FULL_ERROR="1",
        TORCH_EXTENSIONS_DIR=str(EXTENSIONS_DIR),
    )
    env.pop("WANDB_API_KEY", None)
    return env


def run_launcher(
    cmd: list[str],
    tmp_path: Path,
    timeout: int = 600,
    cwd: Path = ROOT,
    extra_env: dict[str, str] | None = None,
    keep_shm: bool = False,
) -> subprocess.CompletedProcess:
    env = {**launcher_env(tmp_path), **(extra_env or {})}
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if not keep_shm and "--master_port" in cmd:  # a killed rank cannot release its DeepSpeed buffer
            for path in shm_buffer_paths("127.0.0.1", cmd[cmd.index("--master_port") + 1]):
                path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun_cmd(script: Path | str, *args: str, nproc: int = 2) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl merged by step."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    return by_step


def assert_same_losses(actual: dict[int, dict], expected: dict[int, dict], steps, tol: float = 1e-6) -> None:
    """Training losses of two runs agree step by step (resume against the uninterrupted run)."""
    for step in steps:
        assert actual[step]["train/loss"] == pytest.approx(expected[step]["train/loss"], abs=tol), step


# Small, fast runs for launcher tests: a 2-layer model, short sequences.
FAST = [
    "model.n_layers=2",
    "model.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.eval_batches=2",
    "logging.progress_bar=false",
    "data.stdlib_glob='[a-f]*.py'",
]


def val_batches(cfg, ranks: int):
    """The validation batches of every rank of a ``ranks``-rank run, as the trainer reads them."""
    from moetrain.train.data import DataPipeline, tokenize_splits

    splits = tokenize_splits(cfg.data, ROOT / ".pytest_cache" / "moetrain-data")
    t = cfg.trainer
    for rank in range(ranks):
        yield from DataPipeline(splits, cfg.model.seq_len, t.micro_batch_size, rank, ranks, t.seed).val_batches(
            t.eval_batches
        )
