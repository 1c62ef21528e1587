"""Where metrics go: ``metrics.jsonl`` in the run folder and Weights & Biases, from rank 0 only.

Values are scalars, or lists of per-expert numbers (logged to W&B as a histogram with one bin per expert).
Callers all-reduce before logging; sinks never communicate.
"""

from __future__ import annotations

import json
import netrc
import os
import re
from pathlib import Path
from typing import Any, Protocol

from moetrain.config import TrainConfig, WandbConfig, plain

Metrics = dict[str, Any]
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class Sink(Protocol):
    def log(self, metrics: Metrics, step: int) -> None: ...

    def log_report(
        self, images: dict[str, Path], columns: list[str], rows: list[list[str]], table: str = "stages"
    ) -> None: ...

    def finish(self) -> None: ...


class JsonlSink:
    """One JSON object per line: ``{"step": N, "key": value, ...}``; flushed every line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)

    def log(self, metrics: Metrics, step: int) -> None:
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_report(
        self, images: dict[str, Path], columns: list[str], rows: list[list[str]], table: str = "stages"
    ) -> None:
        """The report's files already sit in the run folder beside metrics.jsonl."""

    def finish(self) -> None:
        self._f.close()


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    """``logging.wandb.mode``, or online when an API key is configured and offline otherwise."""
    if cfg.mode is not None:
        return cfg.mode
    return "online" if wandb_api_key_configured() else "offline"


def sweep_id(sweep_dir: str | Path) -> str:
    """A sweep folder's name; Hydra's default DATE/TIME layout keeps its date (2025-01-31_12-00-00)."""
    path = Path(sweep_dir)
    return f"{path.parent.name}_{path.name}" if _DATE.match(path.parent.name) else path.name


def join_sweep_group(cfg: WandbConfig, sweep_dir: str | Path) -> None:
    """Put a run of a multirun into its sweep's W&B group (``logging.wandb.group_by_sweep``)."""
    if cfg.group_by_sweep:
        cfg.group = f"{cfg.group}-{sweep_id(sweep_dir)}" if cfg.group else sweep_id(sweep_dir)


class WandbSink:
    def __init__(self, cfg: TrainConfig, run_dir: Path, mode: str) -> None:
        import wandb

        self._wandb = wandb
        w = cfg.logging.wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            group=w.group,
            name=w.name or run_dir.name,
            tags=list(w.tags),
            config=plain(cfg),
            dir=str(run_dir),
            mode=mode,
            settings=wandb.Settings(console="off", silent=True),
        )

    @property
    def run_path(self) -> str:
        return str(Path(self.run.dir).parent)

    def log(self, metrics: Metrics, step: int) -> None:
        import numpy as np

        out: dict[str, Any] = {}
        for k, v in metrics.items():
            if isinstance(v, list | tuple):
                out[k] = self._wandb.Histogram(np_histogram=(np.asarray(v, dtype=float), np.arange(len(v) + 1)))
            elif isinstance(v, dict):
                out[k] = json.dumps(v)
            else:
                out[k] = v
        self.run.log(out, step=step)

    def log_report(
        self, images: dict[str, Path], columns: list[str], rows: list[list[str]], table: str = "stages"
    ) -> None:
        self.run.log(
            {
                **{f"report/{name}": self._wandb.Image(str(path)) for name, path in images.items()},
                f"report/{table}": self._wandb.Table(columns=columns, data=rows),
            }
        )

    def finish(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Fans metrics out to every sink. On ranks other than 0 it has no sinks and does nothing."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, metrics: Metrics, step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def log_report(
        self, images: dict[str, Path], columns: list[str], rows: list[list[str]], table: str = "stages"
    ) -> None:
        for s in self.sinks:
            s.log_report(images, columns, rows, table)

    def finish(self) -> None:
        for s in self.sinks:
            s.finish()

    def wandb_location(self) -> str | None:
        for s in self.sinks:
            if isinstance(s, WandbSink):
                return s.run_path
        return None


def build_logger(cfg: TrainConfig, run_dir: Path, is_main: bool) -> MetricsLogger:
    if not is_main:
        return MetricsLogger([])
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
    mode = resolve_wandb_mode(cfg.logging.wandb)
    if mode != "disabled":
        sinks.append(WandbSink(cfg, run_dir, mode))
    return MetricsLogger(sinks)
