"""The compression benchmark's document (``python launch/bench.py compress`` -> docs/compression.md): the
measurements of :mod:`moetrain.metrics.compression_results` as Markdown tables, the targets' verdicts and the
plot. Nothing here measures or judges."""

from __future__ import annotations

from pathlib import Path

from moetrain.metrics.compression_results import (
    BASE_SPEED,
    ONE_SHOT,
    STAGED,
    BenchResults,
    fraction_recovered,
    gap_text,
    md_table,
    one_shot_cut,
    pct,
    signed,
    targets,
)


# ---------------------------------------------------------------------------------------------- tables
def criterion_table(res: BenchResults) -> list[str]:
    """Criterion x removal {25 %, 50 %} x {one-shot, staged}, before any recovery."""
    E, base = res.base.experts, res.base.nll
    rows = []
    for criterion in dict.fromkeys(r.criterion for r in res.cuts):
        for kept in (E - E // 4, E // 2):  # 25 % and 50 % removed
            one = one_shot_cut(res.cuts, criterion, kept)
            staged = next(
                (r for r in res.cuts if r.criterion == criterion and r.schedule == STAGED and r.experts == kept), None
            )
            cells = [criterion, f"{round(100 * (E - kept) / E)} % ({E} -> {kept})"]
            for run in (one, staged):
                q = run.final if run else None
                cells += [gap_text(q, base), f"{q.kl:.4f}", pct(q.agree)] if q else ["-", "-", "-"]
            cells.append(staged.path(E) if staged else "-")
            rows.append(cells)
    header = ["criterion", "removed", "one-shot: NLL gap", "KL", "agreement", "staged: NLL gap", "KL", "agreement",
              "staged path"]  # fmt: skip
    return md_table(header, rows)


def recovery_table(res: BenchResults) -> list[str]:
    """The recovery options at the same cut, after 25 / 50 / 100 % of the budget."""
    base = res.base.nll
    marks = [p.tokens for p in res.recoveries[0].points[1:]] if res.recoveries else []
    header = ["recovery", "distillation", "gap after the cut"]
    header += [f"gap at {t:,} tokens ({100 * t / res.budget_tokens:.0f} %)" for t in marks]
    shares = " / ".join(f"{100 * t / res.budget_tokens:.0f}" for t in marks)
    header += ["KL", "agreement", f"gap recovered at {shares} %"]
    rows = []
    for run in res.recoveries:
        by_tokens = {p.tokens: p.quality for p in run.points[1:]}
        fractions = [fraction_recovered(run.cut.nll, by_tokens[t].nll, base) for t in marks]
        rows.append(
            [run.name, "yes" if run.distill else "no", signed(run.cut.nll - base)]
            + [signed(by_tokens[t].nll - base) for t in marks]
            + [f"{run.final.kl:.4f}", pct(run.final.agree), " / ".join(pct(f, 0) for f in fractions)]
        )
    return md_table(header, rows)


def staged_table(res: BenchResults) -> list[str]:
    """One-shot against staged pruning to the same experts, at equal recovery tokens."""
    base, E = res.base.nll, res.base.experts
    rows = []
    for run in res.staged:
        cut_gaps = ", ".join(signed(p.quality.nll - base) for p, prev in zip(run.points, [None, *run.points]) if
                             prev is None or p.experts != prev.experts)  # fmt: skip
        rows.append(
            [
                run.schedule,
                run.path(E),
                f"{run.tokens:,}",
                cut_gaps,
                gap_text(run.final, base),
                f"{run.final.kl:.4f}",
                pct(run.final.agree),
            ]  # fmt: skip
        )
    header = ["pruning", "experts per layer", "recovery tokens", "gap right after each cut", "final NLL gap", "KL",
              "agreement"]  # fmt: skip
    return md_table(header, rows)


def top1_table(res: BenchResults) -> list[str]:
    """Top-2 -> top-1: the base, top-1 one-shot and after recovery, the final models, with tokens/s."""
    b = res.base
    speeds = {s.name: s for s in res.speeds}

    def speed(name: str | None) -> list[str]:
        s = speeds.get(name) if name else None
        if s is None:
            return ["-", "-"]
        m, lo, hi = s.vs_base
        return [f"{s.tokens_per_s:,.0f}", f"{m:.2f}x ({lo:.2f}-{hi:.2f})"]

    rows = [
        [
            "base",
            str(b.experts),
            str(b.top_k),
            "-",
            f"{b.nll:.4f}",
            "-",
            "-",
            "-",
            f"{b.expert_flops:.3g}",
            f"{b.params:,}",
            *speed(BASE_SPEED),
        ]  # fmt: skip
    ]
    for run in res.top1:
        q = run.final
        rows.append(
            [
                run.name,
                run.path(b.experts),
                str(run.top_k),
                f"{run.tokens:,}",
                f"{q.nll:.4f}",
                gap_text(q, b.nll),
                f"{q.kl:.4f}",
                pct(q.agree),
                f"{run.expert_flops:.3g}",
                f"{run.params:,}",
                *speed(run.speed),
            ]  # fmt: skip
        )
    header = ["model", "experts per layer", "top-k", "recovery tokens", "NLL", "NLL gap", "KL", "agreement",
              "expert FLOPs/token", "params", "training tokens/s", "speed vs base (same rounds)"]  # fmt: skip
    return md_table(header, rows)


def export_table(res: BenchResults) -> list[str]:
    rows = [[e.name, f"`{e.path}`", f"{e.nll_ours:.6f}", f"{e.nll_hf:.6f}", f"{e.rel:.2e}"] for e in res.exports]
    return md_table(["model", "exported to", "NLL (ours)", "NLL (transformers)", "relative difference"], rows)


def targets_table(res: BenchResults) -> list[str]:
    rows = [[t.target, t.measured, "yes" if t.met else "**no**", t.missed_by] for t in targets(res)]
    return md_table(["target", "this run", "met", "missed by"], rows)


# ---------------------------------------------------------------------------------------------- plot
def plot_series(res: BenchResults) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per criterion, ``one-shot`` and ``staged``: (experts kept per layer, NLL gap) sorted by experts, gaps
    clipped at 1e-5 below (a log axis; a cut that lowers the NLL shows at the floor)."""
    out = {}
    for criterion in dict.fromkeys(r.criterion for r in res.cuts):
        out[criterion] = {}
        for schedule in (ONE_SHOT, STAGED):
            rows = sorted((r for r in res.cuts if r.criterion == criterion and r.schedule == schedule),
                          key=lambda r: r.experts)  # fmt: skip
            out[criterion][schedule] = (
                [r.experts for r in rows],
                [max(r.final.nll - res.base.nll, 1e-5) for r in rows],
            )
    return out


def plot_quality(res: BenchResults, path: Path) -> Path:
    """The NLL gap (log scale) against experts kept per layer, one line per criterion (one-shot, before recovery),
    staged cuts as open markers of the same colour (:func:`plot_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for criterion, series in plot_series(res).items():
        (line,) = ax.plot(*series[ONE_SHOT], marker="o", label=criterion)
        ax.plot(*series[STAGED], "o", markerfacecolor="none", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"experts kept per layer (of {res.base.experts}), top-{res.base.top_k}, before recovery")
    ax.set_ylabel("NLL gap to the base (nats/token)")
    ax.set_title("Pruning by criterion, one-shot (open markers: staged in two rounds)")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- document
def render(res: BenchResults, plot_name: str) -> str:
    """The benchmark's section of docs/compression.md: the machine, the command and the base model's own numbers
    at the top, then the three tables, the plot, the export check and the targets."""
    b, E = res.base, res.base.experts
    load = sorted(res.load)
    contention = f"1-minute load average {load[0]:.1f}-{load[-1]:.1f} (median {load[len(load) // 2]:.1f})"
    trained = f"{b.steps} steps, " if b.steps else ""
    flat = f", {b.flatness}" if b.flatness else ""
    own = f"; its pretraining run's final validation loss {b.meta_val_loss:.4f}" if b.meta_val_loss else ""
    share = f", {pct(b.expert_share, 0)} of the forward FLOPs" if b.expert_share else ""
    recovery = res.recoveries[0] if res.recoveries else None
    lines = [
        f"Machine: {res.machine}; {contention} during the run; {res.seconds / 60:.1f} min.",
        "",
        f"Command: `{res.command}`",
        "",
        f"Base model: `{b.path}` ({trained}{b.pretrain_tokens:,} pretraining tokens{flat}): "
        f"validation NLL **{b.nll:.4f}** nats/token on {res.val_tokens:,} validation tokens{own}; {E} experts per "
        f"layer, top-{b.top_k}, {b.params:,} parameters, {b.expert_flops:.3g} expert FLOPs/token{share}.",
        "",
        f"Recovery budget: {res.budget_tokens:,} tokens ({res.budget_tokens / res.tokens_per_step:.0f} steps of "
        f"{res.tokens_per_step:,}) = {pct(res.budget_tokens / b.pretrain_tokens, 2)} of the pretraining tokens "
        f"(asked: {100 * res.budget_fraction:g} %).",
        "",
        f"### 1. Pruning criteria, before recovery (top-{b.top_k})",
        "",
        *criterion_table(res),
        "",
        f"![NLL gap against experts kept]({plot_name})",
        "",
        f"### 2. Recovery at 50 % removed ({E} -> {E // 2} one-shot by `{res.best_criterion}`, the best criterion "
        f"at 50 %; top-{b.top_k})",
        "",
        *recovery_table(res),
        "",
        f"Staged against one-shot at equal recovery tokens (`{res.best_criterion}`, recovery: {res.best_option}; "
        "the staged run splits its tokens evenly after each cut):",
        "",
        *staged_table(res),
        "",
        f"### 3. Top-2 -> top-1 (recovery: {res.best_option}, the best option of table 2)",
        "",
        *top1_table(res),
        "",
        "### Export",
        "",
        *export_table(res),
        "",
        "### Targets",
        "",
        *targets_table(res),
    ]
    if recovery is None:
        lines.insert(0, "No recovery runs in this run.\n")
    return "\n".join(lines)
