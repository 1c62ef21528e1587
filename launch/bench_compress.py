"""``python launch/bench.py compress``: the compression study -> docs/compression.md (its section replaced in place),
docs/compression_quality.png and the run folder's results.json (moetrain/interop/compress_bench.py says what it
measures).

    python launch/bench.py compress                                   the project's base model (built if missing)
    python launch/bench.py compress model.init_from=hf:DIR --pretrain-tokens N       your own imported model
    python launch/bench.py compress --quick                           every table on a tiny model, in its run folder
    python launch/bench.py compress --run-dir DIR ...                 resume: cells DIR/cells.jsonl holds are read
    python launch/bench.py compress --render DIR/results.json         the document again

Options: ``--pretrain-tokens N`` (read from the directory's base_model.json when it has one), ``--methods a,b``,
``--options router,lora,full``, ``--distill both|on|off``, ``--timing-rounds R``, ``--run-dir DIR`` (default
outputs/bench-compress-<time>), ``--doc PATH``. Every other argument is a Hydra override of the study's trainer
(``+recipe=compress`` and the study's settings come first; e.g. ``optim.lr=3e-4``).

``--quick``: a random tiny Mixtral (2 layers of 8 experts, top-2) written into the run folder, unless
``model.init_from`` is given; short sequences, few tokens, one timing round, no extra plot counts; the document
goes to the run folder unless ``--doc`` says otherwise. It checks that every table is measured and written, not
what compression achieves.
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
# --quick: 2 sequences of 32 tokens a step, 2 validation batches; 12,800 "pretraining tokens" make 5 % 10 steps
QUICK_OVERRIDES = ["model.seq_len=32", "trainer.micro_batch_size=2", "trainer.eval_batches=2",
                   "prune.profile_tokens=128", "prune.merge_tokens=128", "data.stdlib_glob='[a-c]*.py'"]  # fmt: skip
QUICK_PRETRAIN_TOKENS = 12_800


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="launch/bench.py compress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="every table on a tiny model (a few minutes at most)")
    ap.add_argument("--pretrain-tokens", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated (default: all)")
    ap.add_argument("--options", default=None, help="comma-separated recovery options (default: router,lora,full)")
    ap.add_argument("--distill", choices=["both", "on", "off"], default="both")
    ap.add_argument("--timing-rounds", type=int, default=None, help="default 5 (1 with --quick)")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=None, help="default docs/compression.md (--quick: the run folder's)")
    ap.add_argument("--render", type=Path, default=None, help="write the document from a run's results.json")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"{bad[0]} is neither an option nor a Hydra override (key=value)")
    return args, overrides


def tiny_base(path: Path) -> Path:
    """A random Mixtral of 2 layers of 8 experts (top-2) saved by transformers, its weights drawn wider than the
    default so routing matters; written once into ``path``."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(str(path))
    return path


def base_meta(overrides: list[str], quick_dir: Path | None) -> tuple[list[str], dict | None]:
    """The overrides with ``model.init_from`` (with ``quick_dir``: a tiny random Mixtral there; else the
    project's base model, built if missing, when none is given) and the base's ``base_model.json`` when its
    directory has one."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("model.init_from=")]
    if not given and quick_dir is not None:
        return [f"model.init_from=hf:{tiny_base(quick_dir)}", *overrides], None
    if not given:
        from moetrain.interop.base_model import ensure_base_model

        base = ensure_base_model([], ranks=2)
        return [base.init_from, *overrides], base.meta
    meta = Path(given[-1].removeprefix("hf:")).expanduser() / "base_model.json"
    return overrides, json.loads(meta.read_text()) if meta.is_file() else None


def _chosen(key: str, given: str | None, allowed: dict) -> list:
    names = [x.strip() for x in given.split(",")] if given else list(allowed)
    bad = [n for n in names if n not in allowed]
    if bad:
        from moetrain.config import ConfigError

        raise ConfigError(f"{key}={given}: {bad[0]} is not known; allowed: {', '.join(allowed)}")
    return [allowed[n] for n in names]


def main(argv: list[str], machine: str, write_section: Callable[[str, str, Path], None]) -> int:
    args, overrides = parse(argv)
    from moetrain.config import ConfigError
    from moetrain.metrics.compression_bench import plot_quality, render
    from moetrain.metrics.compression_results import BenchResults

    run_dir = args.run_dir or ROOT / "outputs" / f"bench-compress-{time.strftime('%Y%m%d-%H%M%S')}"
    doc = args.doc or (run_dir / "compression.md" if args.quick else DOC)
    if args.render:
        results = BenchResults.from_json(args.render.read_text())
    else:
        from moetrain.interop.compress_bench import METHODS, OPTIONS, BenchPlan, compose_bench, run_benchmark

        try:
            if args.quick:
                overrides = [*QUICK_OVERRIDES, *overrides]
            overrides, meta = base_meta(overrides, run_dir / "tiny-base" if args.quick else None)
            tokens = args.pretrain_tokens or (meta or {}).get("pretraining_tokens")
            tokens = tokens or (QUICK_PRETRAIN_TOKENS if args.quick else None)
            if not tokens:
                raise ConfigError("--pretrain-tokens=None: the base's pretraining tokens are not known (no "
                                  "base_model.json); allowed: --pretrain-tokens N")  # fmt: skip
            methods = _chosen("--methods", args.methods, {m.name: m for m in METHODS})
            options = _chosen("--options", args.options, {o.label: o for o in OPTIONS})
            cfg = compose_bench(overrides)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        distill = {"both": (False, True), "on": (True,), "off": (False,)}[args.distill]
        rounds = args.timing_rounds or (1 if args.quick else 5)
        plan = BenchPlan(tokens, tuple(methods), tuple(options), distill, rounds, plot_counts=not args.quick)
        command = shlex.join(["python", "launch/bench.py", "compress", *argv])
        try:
            results = run_benchmark(cfg, run_dir, plan, machine, command, meta, quick=args.quick)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        (run_dir / "results.json").write_text(results.to_json() + "\n")
        print(f"measurements in {run_dir / 'results.json'}")
    plot = plot_quality(results, doc.with_name(doc.stem + "_quality.png"))
    write_section("compress", render(results, plot.name), doc)
    return 0
