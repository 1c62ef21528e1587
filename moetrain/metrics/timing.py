"""Timing for benchmarks (``launch/bench.py``): forward + backward of a module from a fixed output gradient,
timed in rounds so that the ratios between rows measured in the same rounds hold on a noisy, shared machine."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def timing_groups(shapes: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """The (d_model, d_ff, E, k) cells timed together in rounds: every E and k of one (d_model, d_ff), so that
    the ratios the targets name (top-1 against top-2, 64 experts against 8) compare rows measured in the same
    rounds."""
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for d, f, E in shapes:
        groups.setdefault((d, f), []).extend((d, f, E, k) for k in (1, 2))
    return list(groups.values())


def round_order(per_cell: list[list[Entry]]) -> list[tuple[int, int]]:
    """(cell, row) pairs in the order a round runs them: implementation by implementation, each over every cell.

    Why: a target's ratio compares one implementation's rows of different cells (E = 64 against E = 8, top-1
    against top-2). Run one after another they are measured seconds apart, not the half minute that a round of a
    width's ~60 rows takes, so a slow spell of the shared machine falls on both sides of the ratio or on neither."""
    names = [[e.name for e in entries] for entries in per_cell]
    if any(n != names[0] for n in names):
        raise ValueError(f"every cell must list the same implementations in the same order, got {names}")
    return [(c, i) for i in range(len(per_cell[0])) for c in range(len(per_cell))]


def median_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """The median, lowest and highest of num[r] / den[r] over rounds r: the ratio of two rows timed in the same
    rounds, with the spread the rounds give it."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


@functools.cache
def output_gradient(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed gradient every backward of an output of this shape starts from (seeded: the same in every run)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def one_fwd_bwd(module_fn, x: torch.Tensor, module: nn.Module) -> float:
    """Seconds of one forward + backward; the backward starts from a fixed output gradient (``output_gradient``,
    the output has x's shape). Why not a loss: its own passes over the output are no part of the layer (what a
    square-sum loss costs is in docs/benchmarks.md, "How it is timed").

    ``module``'s gradients are set to None first, outside the timing, as a training loop's ``zero_grad()`` does:
    each backward writes fresh gradients instead of adding to the last ones."""
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    dout = output_gradient(tuple(x.shape), x.dtype, x.device)
    t0 = time.perf_counter()
    out = module_fn(xi)
    out.backward(dout)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_fwd_bwd(module_fn, x: torch.Tensor, iters: int, module: nn.Module, warmup: int = 3) -> float:
    """Median seconds of ``one_fwd_bwd`` over ``iters`` iterations after ``warmup``."""
    times = [one_fwd_bwd(module_fn, x, module) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


@dataclass
class Entry:
    """One row of the table: what runs (x_TD -> y_TD), on which input, whose gradients reset."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    module: nn.Module


def one_loss_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: nn.Module) -> float:
    """Seconds of one forward + backward from a scalar loss (``loss_fn(x)``, e.g. a whole model's training loss
    on token ids, which take no gradient); ``module``'s gradients are set to None first, outside the timing."""
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_fn(x).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_in_rounds(
    entries: list[Entry], iters: int, warmup: int = 2, alternate: bool = False, run: Callable | None = None
) -> list[list[float]]:
    """Seconds of forward + backward of each entry in each round (one list per entry, one value per round), timed
    in rounds: after ``warmup`` untimed rounds, each of ``iters`` rounds runs every entry twice in turn, the first
    run untimed. ``alternate``: every other round runs the entries in reverse order, so that a drift within a
    round (the heap growing, a slow spell starting) does not always fall on the later entry of a pair. ``run``:
    what one run is, ``run(fn, x, module) -> seconds`` (default :func:`one_fwd_bwd`; :func:`one_loss_bwd` for
    entries whose ``fn`` returns a loss).

    Why rounds: on a shared machine a slow spell lasting seconds would otherwise fall on whichever entries ran
    then; in rounds it falls on all of them alike, so the ratios between rows of one shape hold. Why the untimed
    run first: the entry before leaves the caches, the allocator's free lists and the thread pool in its own
    state (at 64 experts a fresh heap for the 96 MiB of expert gradients alone is page-faulted again); one run of
    its own restores what back-to-back iterations of one layer would see (docs/benchmarks.md)."""
    run = run or one_fwd_bwd
    times: list[list[float]] = [[] for _ in entries]
    for r in range(warmup + iters):
        order = range(len(entries) - 1, -1, -1) if alternate and r % 2 else range(len(entries))
        for i in order:
            e = entries[i]
            run(e.fn, e.x, e.module)
            if r >= warmup:
                times[i].append(run(e.fn, e.x, e.module))
    return times
