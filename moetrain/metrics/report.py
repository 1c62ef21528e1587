"""The end-of-run report: ``report.md`` with the per-stage table, the quality table (validation loss and
perplexity at each stage end and right after each pruning round, experts per layer, parameters, optionally a
baseline run) and, in a run with a base model as its reference, the table comparing every stage with the base
(:mod:`moetrain.metrics.comparison`); ``loss.png`` (loss curve with stage boundaries), ``utilization.png``
(per-layer expert utilization heatmap, one panel per stage) and ``pruning.png`` (each round's profile, removed
experts marked)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from moetrain.metrics import comparison as base_comparison

COLUMNS = [
    ("stage", "stage", "{}"),
    ("steps", None, "{}"),
    ("top_k", "moe.top_k", "{}"),
    ("capacity factor", "moe.capacity_factor", "{}"),
    ("drop policy", "moe.drop_policy", "{}"),
    ("aux coef", "aux_loss_coef", "{:.3g}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("tokens/s", "tokens_per_s", "{:.0f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("expert FLOPs/token", "expert_flops_per_token", "{:.4g}"),
    ("dropped", "dropped_frac", "{:.4f}"),
    ("entropy (nats)", "entropy", "{:.3f}"),
    ("experts/layer", "experts_per_layer", "{}"),
    ("params", "params", "{:,}"),
]

log = logging.getLogger("moetrain")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


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


def _heatmaps(path: Path, panels: list[tuple[str, Any, list[tuple[int, int]]]], cmap: str, label: str, x: str):
    """One heatmap per panel (title, layers x experts array, crossed cells) on a shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.5, 3.4), squeeze=False, constrained_layout=True)
    vmax = max((float(np.nanmax(a)) for _, a, _ in panels if a.size), default=1.0)
    im = None
    for ax, (title, a, crosses) in zip(axes[0], panels):
        im = ax.imshow(a, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
        for col, row in crosses:
            ax.plot(col, row, "x", color="cyan", ms=9, mew=2)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
        ax.set_xlabel(x)
        ax.set_ylabel("MoE layer")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label=label)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_utilization(path: Path, summaries: list[dict[str, Any]]) -> None:
    panels = [(f"{s['stage']} (k={s.get('moe.top_k')})", _ragged(s["utilization"]), []) for s in summaries]
    _heatmaps(path, panels, "viridis", "fraction of the layer's computed assignments", "expert")


def _ragged(rows: list[list[float]]):
    """Rows of different lengths (pruned layers) as one array, missing experts as NaN (blank in the heatmap)."""
    import numpy as np

    width = max((len(r) for r in rows), default=0)
    return np.asarray([list(r) + [float("nan")] * (width - len(r)) for r in rows], dtype=float)


def plot_pruning(path: Path, rounds: list[dict[str, Any]]) -> None:
    """One panel per round: each layer's criterion share per expert before the cut; removed experts crossed."""
    panels = []
    for r in rounds:
        crosses = [
            (ids.index(e), j) for j, (gone, ids) in enumerate(zip(r["removed"], r["expert_ids_before"])) for e in gone
        ]
        title = f"round {r['round']} ({r['criterion']}): {r['outcome'].split(' (')[0]}"
        panels.append((title, _ragged(r["shares"]), crosses))
    _heatmaps(path, panels, "magma", "share of the layer's criterion (x: removed)", "expert (current index)")


def quality_rows(
    summaries: list[dict[str, Any]], rounds: list[dict[str, Any]], baseline: dict[str, Any] | None
) -> list[list[str]]:
    """Validation loss and perplexity through the run, in order: baseline, then per stage the pruning round
    at its start (loss right after the cut, before recovery training) and the loss at its end."""

    def row(what: str, loss: float | None, experts, params, note: str = "") -> list[str]:
        ok = loss is not None and not math.isnan(loss)
        return [
            what,
            f"{loss:.4f}" if ok else "-",
            f"{math.exp(loss):.3f}" if ok else "-",
            str(experts),
            note,
            f"{params:,}" if params else "-",
        ]

    rows = []
    if baseline is not None:
        rows.append(
            row(
                f"baseline: {baseline.get('name', 'run')}, {baseline['step']} steps",
                baseline["val_loss"],
                baseline.get("experts_per_layer", "-"),
                baseline.get("params"),
                "reference at equal total steps",
            )
        )
    for s in summaries:
        for r in rounds:
            if r["stage"] == s["stage"]:
                rows.append(
                    row(
                        f"prune round {r['round']} (right after the cut, step {r['step']})",
                        r["val_loss_after"],
                        r["experts_after"],
                        None,
                        f"{r['outcome']}; before: {r['val_loss_before']:.4f}",
                    )
                )
        rows.append(
            row(
                f"end of stage {s['stage']} (step {s['end_step']})",
                s["val_loss"],
                s.get("experts_per_layer", "-"),
                s.get("params"),
            )
        )
    return rows


def tolerance_line(tolerance: dict[str, Any] | None) -> str:
    if not tolerance:
        return "Tolerance: none set (recover.max_nll_gap_pct)."
    t = tolerance
    verdict = "met" if t["met"] else "NOT met"
    gap, allowed = t["nll_gap_pct"], t["max_nll_gap_pct"]
    return f"Tolerance: final NLL gap {gap:+.2f} % of the base's, allowed {allowed:g} %: {verdict}."


def comparison_section(
    comparison: dict[str, Any] | None, summaries: list[dict[str, Any]], rounds: list[dict[str, Any]] = ()
) -> list[str]:
    """report.md's lines comparing every stage with the base model (none without a base measurement)."""
    if not comparison or not comparison.get("base"):
        return []
    return [
        "## Compared with the base model (same validation tokens)",
        "",
        "NLL = mean next-token cross-entropy (nats/token) on the validation batches, at the end of each stage; gap =",
        "NLL - the base's NLL (and in % of it); KL(base||model) = mean over tokens of the KL divergence from the",
        "base's next-token distribution to the model's (temperature 1); top-1 agreement = share of tokens whose",
        "most likely next token is the base's; tokens/s = the stage's training throughput; tokens spent = training",
        "tokens of the run so far, over all ranks.",
        "",
        *markdown_table(
            base_comparison.COLUMNS,
            base_comparison.comparison_rows(comparison["base"], summaries, rounds, comparison.get("export")),
        ),
        "",
        base_comparison.throughput_line(comparison.get("throughput")),
        "",
        base_comparison.recovered_line(comparison.get("recovery") or {}),
        "",
        tolerance_line(comparison.get("tolerance")),
        "",
    ]


def write_report(
    run_dir: Path,
    summaries: list[dict[str, Any]],
    extra: dict[str, Any],
    rounds: list[dict[str, Any]] | None = None,
    baseline: dict[str, Any] | None = None,
    comparison: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.md and its plots into ``run_dir``; return the files written. ``comparison``: the base
    measurement and the one-run throughput of a run with a reference (``{"base", "throughput"}``)."""
    rounds = rounds or []
    files = {"loss": run_dir / "loss.png", "utilization": run_dir / "utilization.png"}
    plot_loss(files["loss"], run_dir / "metrics.jsonl", summaries)
    plot_utilization(files["utilization"], summaries)
    quality = []
    if rounds or baseline:
        q_header = ["when", "val loss", "perplexity", "experts/layer", "note", "params"]
        quality = [
            "## Quality",
            "",
            "Validation loss (nats/token) and perplexity at each stage end and right after each pruning round.",
            "",
            *markdown_table(q_header, quality_rows(summaries, rounds, baseline)),
            "",
        ]
    if rounds:
        files["pruning"] = run_dir / "pruning.png"
        plot_pruning(files["pruning"], rounds)
        quality += ["![pruning rounds](pruning.png)", ""]
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
        *markdown_table([c for c, _, _ in COLUMNS], table_rows(summaries)),
        "",
        *comparison_section(comparison, summaries, rounds),
        *quality,
        "![loss](loss.png)",
        "",
        "![expert utilization](utilization.png)",
        "",
    ]
    files["report"] = run_dir / "report.md"
    files["report"].write_text("\n".join(lines))
    return files


def report_run(
    run_dir: Path,
    summaries: list[dict[str, Any]],
    extra: dict[str, Any],
    rounds: list[dict[str, Any]],
    logging_cfg: Any,
    logger: Any,
    comparison: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """The run's report (:func:`write_report`), with ``logging.baseline_run``'s summary as the reference row,
    also sent to the metrics sinks (its plots and table)."""
    baseline = None
    if logging_cfg.baseline_run:  # a reference run (e.g. top2_baseline at the same total steps)
        path = Path(logging_cfg.baseline_run)
        baseline = {"name": path.name, **json.loads((path / "summary.json").read_text())}
    files = write_report(run_dir, summaries, extra, rounds, baseline, comparison)
    logger.log_report(
        {k: v for k, v in files.items() if v.suffix == ".png"}, [c for c, _, _ in COLUMNS], table_rows(summaries)
    )
    if comparison and comparison.get("base"):  # the same rows as report.md's comparison table
        rows = base_comparison.comparison_rows(comparison["base"], summaries, rounds, comparison.get("export"))
        logger.log_report({}, base_comparison.COLUMNS, rows, table="compared_with_base")
    log.info("report: %s", files["report"])
    return files
