"""``python launch/bench.py compress``: the compression benchmark -> docs/compression.md (its section replaced in
place) and docs/compression_quality.png (moetrain/interop/compress_bench.py says what it measures).

    python launch/bench.py compress                                   the project's base model (built if missing)
    python launch/bench.py compress model.init_from=hf:DIR --pretrain-tokens N       your own imported model
    python launch/bench.py compress --render outputs/bench-compress-.../results.json  the document again

Options: ``--budget F`` (recovery budget, fraction of the pretraining tokens, 0.02), ``--pretrain-tokens N``
(read from the directory's base_model.json when it has one), ``--criteria a,b``, ``--options "full training,router
only"``, ``--distill both|on|off``, ``--timing-rounds R``, ``--run-dir DIR`` (default
outputs/bench-compress-<time>), ``--doc PATH``. Every other argument is a Hydra override of the benchmark's trainer
(``+recipe=compress`` and the benchmark's settings come first; e.g. ``prune.mode=merge``, ``optim.lr=3e-4``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compression.md"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="launch/bench.py compress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--pretrain-tokens", type=int, default=None)
    ap.add_argument("--criteria", default=None, help="comma-separated (default: all six)")
    ap.add_argument("--options", default=None, help="comma-separated recovery options (default: all five)")
    ap.add_argument("--distill", choices=["both", "on", "off"], default="both")
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--render", type=Path, default=None, help="write the document from a run's results.json")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"{bad[0]} is neither an option nor a Hydra override (key=value)")
    return args, overrides


def base_meta(overrides: list[str]) -> tuple[list[str], dict | None]:
    """The overrides with ``model.init_from`` (the project's base model, built if missing, when none is given)
    and the base's ``base_model.json`` when its directory has one."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("model.init_from=")]
    if not given:
        from moetrain.interop.base_model import ensure_base_model

        base = ensure_base_model([], ranks=2)
        return [base.init_from, *overrides], base.meta
    meta = Path(given[-1].removeprefix("hf:")).expanduser() / "base_model.json"
    return overrides, json.loads(meta.read_text()) if meta.is_file() else None


def main(argv: list[str], machine: str, write_section: Callable[[str, str, Path], None]) -> int:
    args, overrides = parse(argv)
    from moetrain.config import ConfigError
    from moetrain.metrics.compression_bench import plot_quality, render
    from moetrain.metrics.compression_results import BenchResults

    if args.render:
        results = BenchResults.from_json(args.render.read_text())
    else:
        from moetrain.config import PRUNE_CRITERIA
        from moetrain.interop.compress_bench import OPTIONS, BenchPlan, compose_bench, run_benchmark

        try:
            overrides, meta = base_meta(overrides)
            tokens = args.pretrain_tokens or (meta or {}).get("pretraining_tokens")
            if not tokens:
                raise ConfigError("--pretrain-tokens=None: the base's pretraining tokens are not known (no "
                                  "base_model.json); allowed: --pretrain-tokens N")  # fmt: skip
            cfg = compose_bench(overrides)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        labels = {o.label: o for o in OPTIONS}
        options = [x.strip() for x in args.options.split(",")] if args.options else list(labels)
        criteria = [c.strip() for c in args.criteria.split(",")] if args.criteria else list(BenchPlan.criteria)
        for key, values, allowed in (("--options", options, labels), ("--criteria", criteria, PRUNE_CRITERIA)):
            if any(v not in allowed for v in values):
                print(f"config error: {key}={','.join(values)}; allowed: {', '.join(allowed)}", file=sys.stderr)
                return 2
        distill = {"both": (False, True), "on": (True,), "off": (False,)}[args.distill]
        plan = BenchPlan(tokens, args.budget, tuple(criteria), tuple(labels[o] for o in options), distill,
                         args.timing_rounds)  # fmt: skip
        run_dir = args.run_dir or ROOT / "outputs" / f"bench-compress-{time.strftime('%Y%m%d-%H%M%S')}"
        command = shlex.join(["python", "launch/bench.py", "compress", *argv])
        results = run_benchmark(cfg, run_dir, plan, machine, command, meta)
        (run_dir / "results.json").write_text(results.to_json() + "\n")
        print(f"measurements in {run_dir / 'results.json'}")
    plot = plot_quality(results, args.doc.with_name(args.doc.stem + "_quality.png"))
    write_section("compress", render(results, plot.name), args.doc)
    return 0
