"""Progress: a bar in a terminal, one line per 5 % of the steps in a log."""

from __future__ import annotations

import logging

from moetrain.train.progress import Progress


def test_in_a_log_a_line_every_five_percent_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="moetrain")
    progress = Progress(total=203, initial=0, terminal=False)
    for step in range(1, 204):
        progress.update(step, loss="1.000")
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert len(lines) == 203 // 10 + 1  # every 10 steps (5 % of 203, rounded down), and the last step
    assert lines[0] == "train: step 10/203 (4%) loss=1.000"
    assert lines[-1] == "train: step 203/203 (100%) loss=1.000"


def test_in_a_terminal_the_bar_counts_every_step(caplog):
    caplog.set_level(logging.INFO, logger="moetrain")
    progress = Progress(total=5, initial=2, terminal=True)
    for step in range(3, 6):
        progress.update(step, loss="1.000")
    assert progress.bar.n == 5
    progress.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("train: step")]
