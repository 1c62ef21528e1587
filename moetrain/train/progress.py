"""Training progress for a person: a bar in a terminal, a line every few percent in a log.

Why two: tqdm redraws its bar with a carriage return; when stderr is a file or a pipe (CI, ``make demo > log``,
a SLURM job's output) every redraw becomes a line of its own, so a 2000-step run writes about 2000 lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("moetrain")
LOG_PERCENT = 5  # in a log: one line per this share of the run's steps


class Progress:
    """``update(step, **fields)`` after every optimizer step of a run of ``total`` steps; ``close()`` at the end.
    ``terminal`` (default: whether stderr is one) picks the bar or the lines."""

    def __init__(self, total: int, initial: int, terminal: bool | None = None) -> None:
        self.total = total
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.every = max(1, total * LOG_PERCENT // 100)
        self.bar = None
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, **fields: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**fields)
        elif step % self.every == 0 or step == self.total:
            shown = " ".join(f"{k}={v}" for k, v in fields.items())
            log.info("train: step %d/%d (%d%%) %s", step, self.total, 100 * step // self.total, shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
