"""The report of a sweep (a Hydra multirun folder): ``sweep.md``, ``sweep.png`` (the swept value against
tokens/s, dropped fraction and validation loss, one line per stage) and ``pareto.png`` (tokens/s against
validation loss, the Pareto front marked), all written into the sweep folder.

Each point is a subfolder with ``.hydra/overrides.yaml`` (what this point set) and, once it finished,
``summary.json`` (per-stage numbers, written by the trainer). The swept keys are the overrides whose values
differ between points; the x axis is ``moe.capacity_factor`` when it is swept, else the first swept key.
Every number in the report is copied from the points' ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from moetrain.metrics.report import markdown_table

log = logging.getLogger("moetrain")

PREFERRED_X = "moe.capacity_factor"
# (column, summary key, format) of the per-stage numbers
STAGE_COLUMNS = [
    ("val loss", "val_loss", "{:.4f}"),
    ("tokens/s", "tokens_per_s", "{:.0f}"),
    ("dropped", "dropped_frac", "{:.4f}"),
    ("expert FLOPs/token", "expert_flops_per_token", "{:.4g}"),
]
PLOTS = [("tokens_per_s", "tokens/s"), ("dropped_frac", "dropped fraction"), ("val_loss", "validation loss")]


@dataclass
class SweepPoint:
    folder: Path
    raw: list[str]  # .hydra/overrides.yaml: the overrides as given
    overrides: dict[str, str]  # key (without a leading + or ~) -> value as written on the command line
    summary: dict[str, Any] | None  # None: the run has not finished (no summary.json)

    @property
    def stages(self) -> list[dict[str, Any]]:
        return list((self.summary or {}).get("stages") or [])


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def load_points(sweep_dir: Path) -> list[SweepPoint]:
    """The points of a sweep folder, in job order (numeric subfolder names first)."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep_dir} does not exist")
    points = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        folder = overrides_file.parent.parent
        raw = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]
        summary_file = folder / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        points.append(SweepPoint(folder, raw, dict(_split(o) for o in raw), summary))
    if not points:
        raise FileNotFoundError(f"{sweep_dir} has no points (no */.hydra/overrides.yaml): is it a multirun folder?")
    name = lambda p: p.folder.name
    return sorted(points, key=lambda p: (0, int(name(p)), "") if name(p).isdigit() else (1, 0, name(p)))


def swept_keys(points: list[SweepPoint]) -> list[str]:
    """Override keys whose value differs between points (or that only some points set)."""
    keys: list[str] = []
    for p in points:
        keys += [k for k in p.overrides if k not in keys]
    return [k for k in keys if len({p.overrides.get(k) for p in points}) > 1]


def _number(value: str | None) -> float | None:
    try:
        parsed = yaml.safe_load(value) if value is not None else None
    except yaml.YAMLError:
        return None
    return float(parsed) if isinstance(parsed, int | float) and not isinstance(parsed, bool) else None


def x_order(points: list[SweepPoint], key: str) -> list[str]:
    """The distinct values of ``key``: numbers ascending, then the rest (null = dropless, text) as written."""
    values = list(dict.fromkeys(p.overrides.get(key, "-") for p in points))
    return sorted(values, key=lambda v: (_number(v) is None, _number(v) or 0.0, v))


def pareto_front(pairs: list[tuple[float, float]]) -> list[bool]:
    """For (tokens/s, val loss) pairs: True where no other pair is at least as fast and at least as good
    (lower loss) while strictly better in one of the two. NaN pairs are never on the front."""

    def ok(p: tuple[float, float]) -> bool:
        return not any(math.isnan(v) for v in p)

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    return [ok(p) and not any(ok(q) and dominates(q, p) for q in pairs) for p in pairs]


def _value(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


@dataclass
class Row:
    point: SweepPoint
    x: str
    stage: dict[str, Any]
    pareto: bool = False


def stage_rows(points: list[SweepPoint], key: str) -> list[Row]:
    """One row per finished point and stage, the Pareto flag computed within each stage name."""
    rows = [Row(p, p.overrides.get(key, "-"), s) for p in points for s in p.stages]
    for name in dict.fromkeys(r.stage["stage"] for r in rows):
        group = [r for r in rows if r.stage["stage"] == name]
        pairs = [_speed_loss(r) for r in group]
        for r, on_front in zip(group, pareto_front(pairs)):
            r.pareto = on_front
    return rows


def _float(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else math.nan


def _speed_loss(r: Row) -> tuple[float, float]:
    return _float(r.stage.get("tokens_per_s")), _float(r.stage.get("val_loss"))


def _plot(files: dict[str, Path], rows: list[Row], key: str, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r.stage["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(PLOTS), figsize=(4.2 * len(PLOTS), 3.6), constrained_layout=True)
    for ax, (metric, label) in zip(axes, PLOTS):
        for name in stages:
            pts = sorted((order.index(r.x), _float(r.stage.get(metric))) for r in rows if r.stage["stage"] == name)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name)
        ax.set_xticks(range(len(order)), [("dropless" if v in ("null", "None") else v) for v in order])
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(title="stage", fontsize=8)
    fig.suptitle(f"{key} vs throughput, drops and validation loss (per stage)")
    fig.savefig(files["sweep"], dpi=110)
    plt.close(fig)

    cols = min(len(stages), 3)  # a staged recipe (e.g. 5 stages) wraps into rows of 3 panels
    rows_n = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(stages) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, stages):
        group = [r for r in rows if r.stage["stage"] == name]
        for r in group:
            x, y = _speed_loss(r)
            ax.plot(x, y, "o", color="tab:red" if r.pareto else "tab:grey")
            ax.annotate(r.x, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = sorted(_speed_loss(r) for r in group if r.pareto)
        if front:
            ax.plot(*zip(*front), "-", color="tab:red", label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_title(f"stage {name}; points labelled with {key}", fontsize=9)
        ax.set_xlabel("tokens/s (higher is better)")
        ax.set_ylabel("validation loss (lower is better)")
        ax.grid(alpha=0.3)
    fig.savefig(files["pareto"], dpi=110)
    plt.close(fig)


def write_sweep_report(sweep_dir: str | Path) -> dict[str, Path]:
    """Write sweep.md, sweep.png and pareto.png into ``sweep_dir``; return the files written."""
    sweep_dir = Path(sweep_dir)
    points = load_points(sweep_dir)
    swept = swept_keys(points)
    key = PREFERRED_X if PREFERRED_X in swept or not swept else swept[0]
    order = x_order(points, key)
    rows = stage_rows(points, key)
    files = {"report": sweep_dir / "sweep.md", "sweep": sweep_dir / "sweep.png", "pareto": sweep_dir / "pareto.png"}
    if rows:
        _plot(files, rows, key, order)

    fixed = [o for o in points[0].raw if _split(o)[0] not in swept]
    unfinished = [p.folder.name for p in points if p.summary is None]
    header = ["point", key, "stage", "steps", "stage capacity factor", *(c for c, _, _ in STAGE_COLUMNS), "Pareto"]
    table = [
        [
            r.point.folder.name,
            r.x,
            r.stage["stage"],
            f"{r.stage['start_step']}-{r.stage['end_step']}",
            "dropless" if r.stage.get("moe.capacity_factor") is None else f"{r.stage['moe.capacity_factor']}",
            *(_value(r.stage.get(k), fmt) for _, k, fmt in STAGE_COLUMNS),
            "yes" if r.pareto else "",
        ]
        for r in sorted(rows, key=lambda r: (order.index(r.x), r.stage.get("index", 0)))
    ]
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"- sweep folder: {sweep_dir.resolve()}",
        f"- points: {len(points)} ({len(points) - len(unfinished)} finished"
        + (f"; unfinished: {', '.join(unfinished)})" if unfinished else ")"),
        f"- swept: {', '.join(swept) or 'nothing'}",
        f"- fixed overrides: {' '.join(fixed) or 'none'}",
        "",
        "## Per point and stage",
        "",
        "Numbers from each point's summary.json: validation loss at the end of the stage, tokens/s over the stage,",
        "dropped = fraction of routed assignments dropped by capacity, expert FLOPs/token from the assignments",
        "computed. Pareto = no other point of the same stage is at least as fast with at most the same validation",
        "loss (and better in one).",
        "",
        *markdown_table(header, table),
        "",
    ]
    if rows:
        lines += ["![sweep](sweep.png)", "", "![Pareto front](pareto.png)", ""]
    files["report"].write_text("\n".join(lines))
    return files if rows else {"report": files["report"]}


class SweepReportCallback(Callback):
    """Hydra callback: the sweep report at the end of a multirun (``+hydra/callbacks=sweep_report``)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            files = write_sweep_report(str(config.hydra.sweep.dir))
        except FileNotFoundError as e:  # e.g. every point failed before writing .hydra/
            log.warning("no sweep report: %s", e)
            return
        log.info("sweep report: %s", files["report"])
