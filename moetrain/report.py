"""The end-of-run report: ``report.md`` with the per-stage table, ``loss.png`` (loss curve with stage
boundaries) and ``utilization.png`` (per-layer expert utilization heatmap, one panel per stage)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = [
    ("stage", "stage", "{}"),
    ("steps", None, "{}"),
    ("top_k", "moe.top_k", "{}"),
    ("capacity factor", "moe.capacity_factor", "{}"),
    ("drop policy", "moe.drop_policy", "{}"),
    ("aux coef", "aux_loss_coef", "{:.3g}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("tokens/s", "tokens_per_s", "{:.0f}"),
    ("expert FLOPs/token", "expert_flops_per_token", "{:.4g}"),
    ("dropped", "dropped_frac", "{:.4f}"),
    ("entropy (nats)", "entropy", "{:.3f}"),
]


def table_rows(summaries: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in summaries:
        row = []
        for _, key, fmt in COLUMNS:
            if key is None:
                row.append(f"{s['start_step']}-{s['end_step']}")
            else:
                v = s.get(key)
                row.append(
                    "dropless"
                    if key == "moe.capacity_factor" and v is None
                    else "-"
                    if v is None or (isinstance(v, float) and math.isnan(v))
                    else fmt.format(v)
                )
        rows.append(row)
    return rows


def _read_losses(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            train.append((row["step"], row["train/loss"]))
        if "val/loss" in row:
            val.append((row["step"], row["val/loss"]))
    return train, val


def plot_loss(path: Path, metrics_path: Path, summaries: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = _read_losses(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation loss")
    top = ax.get_ylim()[1]
    for s in summaries:
        ax.axvline(s["start_step"], color="grey", ls="--", lw=0.8)
        ax.text(s["start_step"], top, f" {s['stage']}", va="top", ha="left", fontsize=8, rotation=90)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss by step; dashed lines: stage starts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_utilization(path: Path, summaries: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(summaries)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.5, 3.4), squeeze=False, constrained_layout=True)
    vmax = max((max(max(r) for r in s["utilization"]) for s in summaries if s["utilization"]), default=1.0)
    im = None
    for ax, s in zip(axes[0], summaries):
        u = np.asarray(s["utilization"], dtype=float)
        im = ax.imshow(u, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{s['stage']} (k={s.get('moe.top_k')})", fontsize=9)
        ax.set_xticks(range(u.shape[1]))
        ax.set_yticks(range(u.shape[0]))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="fraction of the layer's computed assignments")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, summaries: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Path]:
    """Write report.md and its plots into ``run_dir``; return the files written."""
    files = {"loss": run_dir / "loss.png", "utilization": run_dir / "utilization.png"}
    plot_loss(files["loss"], run_dir / "metrics.jsonl", summaries)
    plot_utilization(files["utilization"], summaries)
    header = "| " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        *(f"- {k}: {v}" for k, v in extra.items()),
        "",
        "## Stages",
        "",
        "Validation loss at the end of each stage; tokens/s over the stage; expert FLOPs/token = forward expert-FFN",
        "FLOPs per token counted from the assignments actually computed (after top-k, drops and rerouting);",
        "dropped = fraction of routed assignments dropped; entropy = mean routing entropy per token and layer.",
        "",
        header,
        sep,
        *("| " + " | ".join(r) + " |" for r in table_rows(summaries)),
        "",
        "![loss](loss.png)",
        "",
        "![expert utilization](utilization.png)",
        "",
    ]
    files["report"] = run_dir / "report.md"
    files["report"].write_text("\n".join(lines))
    return files
