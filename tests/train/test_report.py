"""The report's quality table, row by row, from hand-made stage summaries, pruning rounds and a baseline."""

from __future__ import annotations

import math

from moetrain.metrics.report import quality_rows

STAGES = [
    {"stage": "top1", "end_step": 100, "val_loss": 2.0, "experts_per_layer": [4, 4], "params": 1000},
    {"stage": "prune1", "end_step": 150, "val_loss": 2.1, "experts_per_layer": [3, 3], "params": 800},
    {"stage": "prune2", "end_step": 200, "val_loss": float("nan"), "experts_per_layer": [3, 3], "params": 800},
]
ROUNDS = [
    {
        "stage": "prune1",
        "round": 1,
        "step": 100,
        "val_loss_after": 2.3,
        "val_loss_before": 2.0,
        "experts_after": [3, 3],
        "outcome": "kept",
    },
    {
        "stage": "prune2",
        "round": 2,
        "step": 150,
        "val_loss_after": 2.9,
        "val_loss_before": 2.1,
        "experts_after": [3, 3],
        "outcome": "rolled back (+0.80 > 0.10)",
    },
]
BASELINE = {"name": "top2", "step": 200, "val_loss": 1.9, "experts_per_layer": [4, 4], "params": 1200}


def test_rows_in_run_order_with_values():
    rows = quality_rows(STAGES, ROUNDS, BASELINE)
    assert [r[0] for r in rows] == [
        "baseline: top2, 200 steps",
        "end of stage top1 (step 100)",
        "prune round 1 (right after the cut, step 100)",
        "end of stage prune1 (step 150)",
        "prune round 2 (right after the cut, step 150)",
        "end of stage prune2 (step 200)",
    ]
    baseline, top1, round1, prune1, round2, prune2 = rows
    assert baseline == ["baseline: top2, 200 steps", "1.9000", f"{math.exp(1.9):.3f}", "[4, 4]",
                        "reference at equal total steps", "1,200"]  # fmt: skip
    assert top1[1:] == ["2.0000", f"{math.exp(2.0):.3f}", "[4, 4]", "", "1,000"]
    assert round1[1:] == ["2.3000", f"{math.exp(2.3):.3f}", "[3, 3]", "kept; before: 2.0000", "-"]
    assert prune1[1] == "2.1000" and prune1[5] == "800"
    assert round2[4] == "rolled back (+0.80 > 0.10); before: 2.1000"
    assert prune2[1:3] == ["-", "-"]  # a stage without a validation shows no number, not nan


def test_no_baseline_no_baseline_row():
    rows = quality_rows(STAGES[:1], [], None)
    assert len(rows) == 1 and rows[0][0] == "end of stage top1 (step 100)"
