"""The end of a run: ``summary.json`` (the final numbers, every stage's summary, the structural records and, with
a reference, the base measurement and the one-run throughput) and the report, written by rank 0."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moetrain.config import TrainConfig
from moetrain.runtime.distributed import LaunchEnv
from moetrain.train.components import RunComponents
from moetrain.train.model_state import ModelState
from moetrain.train.reference import STAGE_KEYS, Validation, gap_recovered, tolerance_check
from moetrain.train.stage_runner import StageRunner

log = logging.getLogger("moetrain")


def hook_records(parts: RunComponents) -> dict[str, list[dict[str, Any]]]:
    """Each hook's structural records (pruning rounds), without their bulky profiles."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "profile"} for r in rows]  # noqa: E731
    return {h.summary_key: strip(h.records()) for h in parts.hooks if h.summary_key}


def family_export_row(
    exported: dict[str, Any] | None, summary: dict[str, Any], summaries: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The export's report row: its directory and family, and its validation comparisons (measured on the
    directory as transformers loads it) under the stage summary's keys; the structure is the final model's."""
    if not exported or "val/loss" not in exported:
        return None
    return {
        "stage": f"export ({exported['family']}, loaded by transformers)",
        "dir": exported["dir"],
        "family": exported["family"],
        "val_loss": exported["val/loss"],
        **{key: exported[name] for name, key in STAGE_KEYS.items()},
        "experts_per_layer": summary["experts_per_layer"],
        "params": summary["params"],
        "tokens_spent": summaries[-1].get("tokens_spent") if summaries else None,
    }


def finish_run(
    cfg: TrainConfig,
    run_dir: Path,
    env: LaunchEnv,
    parts: RunComponents,
    state: ModelState,
    stages: StageRunner,
    validation: Validation,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """Collective (the throughput is timed on every rank): the run's summary, written with the report on rank 0.
    ``fields``: what the loop knows (run folder, step, val loss, unigram baseline, checkpoint, export)."""
    records = hook_records(parts)
    rounds = [r for rs in records.values() for r in rs]
    summary = {
        **fields,
        "experts_per_layer": state.experts_per_layer(),
        "params": state.param_count(),
        **records,
        "wandb": parts.logger.wandb_location(),
    }
    comparison = None
    if validation.base is not None:  # a reference: the base measurement and the one-run throughput
        base = validation.base
        comparison = {
            "base": base,
            "throughput": validation.throughput(),
            "recovery": gap_recovered(base, rounds, fields["val_loss"]),
            "tolerance": tolerance_check(base["val_loss"], fields["val_loss"], cfg.recover.max_nll_gap_pct),
        }
        exported = family_export_row(fields.get("family_export"), summary, stages.summaries)
        if exported is not None:
            summary["family_export"] = comparison["export"] = exported
        summary.update(comparison)
        for s in [*stages.summaries, *([exported] if exported else [])]:  # every row's gap, as report.md shows it
            if s.get("val_loss") is not None and s.get("base_val_loss"):
                s["nll_gap"] = s["val_loss"] - s["base_val_loss"]
                s["nll_gap_pct"] = 100 * s["nll_gap"] / s["base_val_loss"]
    if env.is_main:
        summary["stages"] = stages.summaries
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if stages.summaries:  # resumed at the very end: nothing ran, nothing to report
            extra = {
                "steps": summary["step"],
                "unigram baseline (nats/token)": f"{summary['unigram_baseline']:.4f}",
                "backend": cfg.moe.backend,
                "ranks": env.world_size,
                "ep_size": cfg.parallel.ep_size,
            }
            parts.reporter(run_dir, stages.summaries, extra, rounds, cfg.logging, parts.logger, comparison)
        tp = summary.get("throughput")
        log.info(
            "done: val loss %s (unigram baseline %.4f%s) | checkpoint %s | W&B %s",
            summary["val_loss"],
            summary["unigram_baseline"],
            f"; base {validation.base['val_loss']:.4f}" if validation.base else "",
            summary["checkpoint"],
            summary["wandb"],
        )
        if tp:
            log.info("one-run throughput: base %.0f, final %.0f tokens/s (%.2fx)", tp["base_tokens_per_s"],
                     tp["model_tokens_per_s"], tp["speedup"])  # fmt: skip
        if tol := summary.get("tolerance"):
            log.info("final NLL gap %+.2f %% of the base's (recover.max_nll_gap_pct=%g): %s", tol["nll_gap_pct"],
                     tol["max_nll_gap_pct"], "met" if tol["met"] else "NOT met")  # fmt: skip
    parts.logger.finish()
    return summary
