"""The comparison with the base model (``distill.teacher=base``): the one-run throughput of the base against the
final model, and the report's table of every stage against the base on the same validation tokens.

Throughput: forward + backward of one training micro-batch (the training loss: cross-entropy + the aux and z
terms) through the base and through the final model, interleaved in rounds (:func:`timing.time_in_rounds`, the
order reversed every other round, each timed run after an untimed one of its own). Every rank times together
(a barrier before each run); a run's time is the slowest rank's, its tokens those of all ranks:
``tokens/s = tokens over all ranks / median over rounds of max over ranks of seconds``, and the speedup is the
median over rounds of ``t_base / t_model``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain.metrics.timing import Entry, median_ratio, one_loss_bwd, time_in_rounds
from moetrain.runtime.distributed import barrier


def _max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def training_loss(model: nn.Module, labels_BS: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training loss of ``model`` on ``labels_BS`` as a function of the inputs, for timing (cross-entropy +
    the aux and z terms; the coefficients change no cost)."""

    def loss(inputs_BS: torch.Tensor) -> torch.Tensor:
        out = model(inputs_BS)
        ce = F.cross_entropy(out.logits_BSV.float().flatten(0, 1), labels_BS.flatten())
        return ce + out.aux_loss + out.z_loss  # coefficients change no cost

    return loss


def _run_together(fn, x: torch.Tensor, module: nn.Module) -> float:
    barrier()  # every rank starts the run at once: the max over ranks is one step's time
    return one_loss_bwd(fn, x, module)


def measure_throughput(
    models: list[nn.Module], inputs_BS: torch.Tensor, labels_BS: torch.Tensor, rounds: int, tokens: int
) -> dict[str, Any]:
    """Collective. ``models``: [base, final]; ``tokens``: one run's tokens over all ranks. Returns
    ``base_tokens_per_s``, ``model_tokens_per_s``, ``speedup`` (median of the per-round ratios) and ``rounds``."""
    entries = [Entry(name, training_loss(m, labels_BS), inputs_BS, m) for name, m in zip(("base", "final"), models)]
    times = time_in_rounds(entries, iters=rounds, warmup=1, alternate=True, run=_run_together)
    slowest = _max_over_ranks(torch.tensor(times, dtype=torch.float64)).tolist()
    base, final = slowest
    return {
        "base_tokens_per_s": tokens / statistics.median(base),
        "model_tokens_per_s": tokens / statistics.median(final),
        "speedup": median_ratio(base, final)[0],
        "rounds": rounds,
    }


COLUMNS = [
    "model",
    "NLL",
    "gap (abs)",
    "gap (%)",
    "KL(base \\|\\| model)",  # a bare | would split the Markdown cell
    "top-1 agreement",
    "expert FLOPs/token",
    "experts/layer",
    "params",
    "tokens/s",
    "tokens spent",
]


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _gap_cells(loss: float | None, ref: float | None) -> list[str]:
    known = loss is not None and ref is not None and not math.isnan(loss)
    return [f"{loss - ref:+.4f}" if known else "-", f"{100 * (loss - ref) / ref:+.2f} %" if known else "-"]


def comparison_rows(
    base: dict[str, Any],
    summaries: list[dict[str, Any]],
    rounds: list[dict[str, Any]] = (),
    export: dict[str, Any] | None = None,
) -> list[list[str]]:
    """The base row, then one row per stage (at its end): NLL, gap to the base's NLL (absolute and in % of it),
    KL(base || model), top-1 agreement, expert FLOPs/token, experts per layer, parameters, the stage's training
    tokens/s, the run's training tokens so far. Before the row of a stage that began with a pruning round, the
    round's row right after the cut (NLL and gap; the rest ``-``). The base row's comparisons are with itself
    (0 gap, 0 KL, agreement 1) and shown as ``-``; its tokens/s are the one-run throughput's
    (:func:`throughput_line`). Last, the ``export`` row (``export.hf``): the exported directory as transformers
    loads it, with the stage summary's keys."""
    ref = base["val_loss"]
    rows = [
        ["base", _num(ref, "{:.4f}"), "-", "-", "-", "-", _num(base["expert_flops_per_token"], "{:.4g}"),
         str(base["experts_per_layer"]), _num(base["params"], "{:,}"), "-", "0"],
    ]  # fmt: skip
    cuts = {r["stage"]: r for r in rounds if r.get("outcome") == "kept"}
    for s in [*summaries, *([export] if export else [])]:
        if (cut := cuts.get(s["stage"])) is not None:
            rows.append(
                [f"{s['stage']}, right after the cut", _num(cut["val_loss_after"], "{:.4f}"),
                 *_gap_cells(cut["val_loss_after"], ref), "-", "-", "-", str(cut["experts_after"]), "-", "-", "-"]
            )  # fmt: skip
        loss = s.get("val_loss")
        rows.append(
            [
                s["stage"],
                _num(loss, "{:.4f}"),
                *_gap_cells(loss, s.get("base_val_loss")),
                _num(s.get("kl_base"), "{:.4f}"),
                _num(None if s.get("agree_base") is None else 100 * s["agree_base"], "{:.2f} %"),
                _num(s.get("expert_flops_per_token"), "{:.4g}"),
                str(s.get("experts_per_layer", "-")),
                _num(s.get("params"), "{:,}"),
                _num(s.get("tokens_per_s"), "{:.0f}"),
                _num(s.get("tokens_spent"), "{:,}"),
            ]
        )
    return rows


def recovered_line(recovered: dict[str, Any]) -> str:
    if not recovered:
        return "Recovery: no pruning round was kept."
    r = recovered
    return (
        f"Recovery: the gap to the base was {r['cut_gap']:+.4f} right after the last cut and is {r['final_gap']:+.4f} "
        f"at the end: recovery took back {100 * r['fraction']:.1f} % of it."
    )


def throughput_line(throughput: dict[str, Any] | None) -> str:
    if not throughput:
        return "One-run throughput: not measured (trainer.throughput_rounds=0)."
    t = throughput
    return (
        f"One-run throughput (forward + backward of a training micro-batch, {t['rounds']} interleaved rounds at the "
        f"end of the run): base {t['base_tokens_per_s']:.0f} tokens/s, final model {t['model_tokens_per_s']:.0f} "
        f"tokens/s, speedup {t['speedup']:.2f}x."
    )
