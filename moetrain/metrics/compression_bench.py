"""The compression study's document (``python launch/bench.py compress`` -> docs/compression.md): the measurements
of :mod:`moetrain.metrics.compression_results` as five Markdown tables, the targets' verdicts and the plot.
Nothing here measures or judges."""

from __future__ import annotations

from pathlib import Path

from moetrain.metrics.compression_results import (
    BASE_SPEED,
    ONE_SHOT,
    RECOVERY_SHARES,
    SHORT,
    STAGED,
    BenchResults,
    Quality,
    fraction_recovered,
    gap_text,
    md_table,
    one_shot,
    pct,
    recovered_at,
    recovery_label,
    share_tokens,
    signed,
    targets,
)

QUALITY = ["NLL gap", "KL", "agreement"]


def _quality(q: Quality | None, base: float) -> list[str]:
    return [gap_text(q, base), f"{q.kl:.4f}", pct(q.agree)] if q else ["-", "-", "-"]


def _removals(E: int) -> list[int]:
    """Experts kept at 25 % and 50 % removed."""
    return [E - E // 4, E // 2]


# ---------------------------------------------------------------------------------------------- tables
def one_shot_table(res: BenchResults) -> list[str]:
    """(a) Every method, one-shot to 25 % and 50 % fewer experts, before any recovery."""
    E, base = res.base.experts, res.base.nll
    header = ["method"]
    for kept in _removals(E):
        header += [f"{E} -> {kept}: {QUALITY[0]}", QUALITY[1], QUALITY[2]]
    rows = []
    for method in dict.fromkeys(r.method for r in res.table("one_shot")):
        cells = [method]
        for kept in _removals(E):
            run = one_shot(res.runs, method, kept)
            cells += _quality(run.final if run else None, base)
        rows.append(cells)
    return md_table(header, rows)


def staged_table(res: BenchResults) -> list[str]:
    """(b) Staged (two rounds) against one-shot to the same experts, at equal recovery tokens."""
    base, E = res.base.nll, res.base.experts
    rows = []
    runs = sorted(res.table("staged"), key=lambda r: (r.method, r.experts, r.schedule != ONE_SHOT))
    for run in runs:
        if run.schedule == ONE_SHOT and run.experts != E // 2:
            continue  # the 25 % cells are the plot's
        cut_gaps = ", ".join(signed(p.quality.nll - base) for p, prev in zip(run.points, [None, *run.points])
                             if prev is None or p.experts != prev.experts)  # fmt: skip
        ratio = "-"
        if run.schedule == STAGED:
            one = next((r for r in runs if r.method == run.method and r.schedule == ONE_SHOT and
                        r.experts == run.experts), None)  # fmt: skip
            if one is not None and one.final.nll != base:
                ratio = f"{(run.final.nll - base) / (one.final.nll - base):.2f}x"
        rows.append([run.method, run.schedule, run.path(E), recovery_label(run), f"{run.tokens:,}", cut_gaps,
                     *_quality(run.final, base), ratio])  # fmt: skip
    header = ["method", "pruning", "experts per layer", "recovery", "recovery tokens", "gap right after each cut",
              *QUALITY, "final gap / one-shot's"]  # fmt: skip
    return md_table(header, rows)


def recovery_table(res: BenchResults) -> list[str]:
    """(c) Each recovery option at the same cut (50 % removed), with and without distillation: the gap and the
    fraction of it taken back after each share of the pretraining tokens."""
    b = res.base
    marks = [share_tokens(s, b.pretrain_tokens, res.tokens_per_step) for s in RECOVERY_SHARES]
    header = ["method", "recovery", "gap after the cut"]
    header += [f"gap / recovered at {100 * s:g} % ({t:,} tokens)" for s, t in zip(RECOVERY_SHARES, marks)]
    header += ["KL at the end", "agreement"]
    rows = []
    for run in res.table("recovery"):
        cells = [run.method, recovery_label(run), signed(run.cut.nll - b.nll)]
        for t in marks:
            q = run.at(t)
            cells.append(f"{signed(q.nll - b.nll)} / {pct(recovered_at(run, t, b.nll), 0)}" if q else "-")
        rows.append([*cells, f"{run.final.kl:.4f}", pct(run.final.agree)])
    return md_table(header, rows)


def _speed_cells(res: BenchResults, name: str | None) -> list[str]:
    s = next((s for s in res.speeds if s.name == name), None) if name else None
    if s is None:
        return ["-", "-"]
    m, lo, hi = s.vs_base
    return [f"{s.tokens_per_s:,.0f}", f"{m:.2f}x ({lo:.2f}-{hi:.2f})"]


def top1_table(res: BenchResults) -> list[str]:
    """(d) Top-2 -> top-1: one-shot, then after each recovery option; tokens/s of the base and of top-1."""
    b = res.base
    rows = [[f"base (top-{b.top_k})", "-", "0", f"{b.nll:.4f}", "-", "-", "-", "-", *_speed_cells(res, BASE_SPEED)]]
    for run in res.table("top1"):
        frac = fraction_recovered(res.table("top1")[0].final.nll, run.final.nll, b.nll) if run.option else None
        rows.append([run.name, recovery_label(run) if run.option else "-", f"{run.tokens:,}", f"{run.final.nll:.4f}",
                     *_quality(run.final, b.nll), pct(frac) if frac is not None else "-",
                     *_speed_cells(res, run.speed)])  # fmt: skip
    header = ["model", "recovery", "recovery tokens", "NLL", *QUALITY, "gap recovered", "training tokens/s",
              "speed vs base (same rounds)"]  # fmt: skip
    return md_table(header, rows)


def final_table(res: BenchResults) -> list[str]:
    """(e) The full recipe: top-1 with 25 % and 50 % fewer experts, recovered."""
    b = res.base
    rows = [[f"base (top-{b.top_k})", str(b.experts), "-", "0", f"{b.nll:.4f}", "-", "-", "-", f"{b.expert_flops:.3g}",
             f"{b.params:,}", *_speed_cells(res, BASE_SPEED)]]  # fmt: skip
    for run in res.table("final"):
        rows.append([run.name, run.path(b.experts), recovery_label(run), f"{run.tokens:,}", f"{run.final.nll:.4f}",
                     *_quality(run.final, b.nll), f"{run.expert_flops:.3g}", f"{run.params:,}",
                     *_speed_cells(res, run.speed)])  # fmt: skip
    header = ["model", "experts per layer", "recovery", "recovery tokens", "NLL", *QUALITY, "expert FLOPs/token",
              "params", "training tokens/s", "speed vs base (same rounds)"]  # fmt: skip
    return md_table(header, rows)


def export_table(res: BenchResults) -> list[str]:
    rows = [[e.name, f"`{e.path}`", f"{e.nll_ours:.6f}", f"{e.nll_hf:.6f}", f"{e.rel:.2e}"] for e in res.exports]
    return md_table(["model", "exported to", "NLL (ours)", "NLL (transformers)", "relative difference"], rows)


def targets_table(res: BenchResults) -> list[str]:
    rows = [[t.target, t.measured, "yes" if t.met else "**no**", t.missed_by] for t in targets(res)]
    return md_table(["target", "this run", "met", "missed by"], rows)


# ---------------------------------------------------------------------------------------------- plot
def plot_series(res: BenchResults) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per method, ``before`` (one-shot cuts, table a and the plot's extra counts) and ``after`` (one-shot cuts
    recovered with the study's recovery at 2 %, table b): (experts kept per layer, NLL gap) sorted by experts,
    gaps clipped at 1e-5 below (a log axis; a model that beats the base shows at the floor)."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    after = [r for r in res.table("staged") if r.schedule == ONE_SHOT]
    for method in dict.fromkeys(r.method for r in res.table("one_shot")):
        out[method] = {}
        for key, runs in (("before", res.table("one_shot")), ("after", after)):
            rows = sorted((r for r in runs if r.method == method), key=lambda r: r.experts)
            out[method][key] = ([r.experts for r in rows], [max(r.final.nll - res.base.nll, 1e-5) for r in rows])
    return out


def plot_quality(res: BenchResults, path: Path) -> Path:
    """The NLL gap (log scale) against experts kept per layer, one line per method: solid before recovery,
    dashed after it (:func:`plot_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, series in plot_series(res).items():
        (line,) = ax.plot(*series["before"], marker="o", label=method)
        if series["after"][0]:
            ax.plot(*series["after"], "--", marker="s", markerfacecolor="none", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"experts kept per layer (of {res.base.experts}), top-{res.base.top_k}")
    ax.set_ylabel("NLL gap to the base (nats/token)")
    ax.set_title(f"One-shot by method: solid before recovery, dashed after {100 * SHORT:g} % of pretraining tokens")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- document
def render(res: BenchResults, plot_name: str) -> str:
    """The study's section of docs/compression.md: the machine, the command and the base model's own numbers at
    the top, then the five tables, the plot, the export check and the targets."""
    b, E = res.base, res.base.experts
    load = sorted(res.load)
    contention = f"1-minute load average {load[0]:.1f}-{load[-1]:.1f} (median {load[len(load) // 2]:.1f})"
    trained = f"{b.steps} steps, " if b.steps else ""
    flat = f", {b.flatness}" if b.flatness else ""
    own = f"; its pretraining run's final validation loss {b.meta_val_loss:.4f}" if b.meta_val_loss else ""
    share = f", {pct(b.expert_share, 0)} of the forward FLOPs" if b.expert_share else ""
    short = share_tokens(SHORT, b.pretrain_tokens, res.tokens_per_step)
    lines = [
        f"Machine: {res.machine}; {contention} during the run; {res.seconds / 60:.1f} min.",
        "",
        f"Command: `{res.command}`",
        "",
        f"Base model: `{b.path}` ({trained}{b.pretrain_tokens:,} pretraining tokens{flat}): "
        f"validation NLL **{b.nll:.4f}** nats/token on {res.val_tokens:,} validation tokens{own}; {E} experts per "
        f"layer, top-{b.top_k}, {b.params:,} parameters, {b.expert_flops:.3g} expert FLOPs/token{share}. "
        f"Training steps of {res.tokens_per_step:,} tokens.",
        "",
        f"### (a) One-shot, before recovery (top-{b.top_k})",
        "",
        *one_shot_table(res),
        "",
        f"![NLL gap against experts kept]({plot_name})",
        "",
        f"### (b) Staged ({E} -> {E - E // 4} -> {E // 2}) against one-shot ({E} -> {E // 2}), at equal recovery "
        f"tokens ({short:,}, {100 * SHORT:g} %; recovery: {res.best_option}; the staged run splits them evenly "
        "after each cut)",
        "",
        *staged_table(res),
        "",
        f"### (c) Recovery at 50 % removed ({E} -> {E // 2} one-shot; top-{b.top_k})",
        "",
        "Each cell: the NLL gap to the base, then the fraction of the cut's gap taken back, "
        "`(L_cut - L_rec) / (L_cut - L_base)`.",
        "",
        *recovery_table(res),
        "",
        f"### (d) Top-{b.top_k} -> top-1, one-shot and after each recovery option ({short:,} tokens)",
        "",
        *top1_table(res),
        "",
        f"### (e) The full recipe: top-1 with 25 % and 50 % fewer experts by `{res.best_method}`, recovered "
        f"({res.best_option})",
        "",
        *final_table(res),
        "",
        "### Export",
        "",
        *export_table(res),
        "",
        "### Targets",
        "",
        *targets_table(res),
    ]
    return "\n".join(lines)
