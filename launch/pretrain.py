"""Build (or find) the cached base model: ``+recipe=pretrain`` trained through the deepspeed launcher, exported
as Mixtral and cached by a hash of its config (moetrain.interop.base_model).

    python launch/pretrain.py                              the benchmark's base (the recipe as it is)
    python launch/pretrain.py --demo                       the demo's shorter-trained base (DEMO_OVERRIDES)
    python launch/pretrain.py --ranks 2 trainer.seed=7     any Hydra overrides of the recipe
    python launch/pretrain.py --cache-root /tmp/cache ...  another cache folder (default: data.cache_dir,
                                                           $MOETRAIN_CACHE or ~/.cache/moetrain)

Prints the Hugging Face directory, the override that starts a run from it, and the key numbers. Exit status:
0, 2 for a bad override (one line naming it), 1 for a failed build, 3 when the model was built (and cached)
but its validation loss fails the flatness check (not with --demo: a short base is still improving).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra.errors import ConfigCompositionException

from moetrain.config import ConfigError, error_line
from moetrain.interop.base_model import DEMO_OVERRIDES, BaseModelError, ensure_base_model, flatness_line


def report(meta: dict, flat_expected: bool = True) -> str:
    """The key numbers of a ``base_model.json``."""
    top_k = meta["config"]["moe"]["top_k"]
    flops = meta["flops_per_token"][f"top_k={top_k}"]
    speed = meta.get("median_train_tokens_per_s")
    return "\n".join(
        [
            f"  path              {meta['path']}",
            f"  use it with       {meta['init_from']}",
            f"  key               {meta['key']} (overrides: {' '.join(meta['overrides']) or 'none'})",
            f"  pretraining       {meta['steps']} steps x {meta['tokens_per_step']} tokens = "
            f"{meta['pretraining_tokens']:,} tokens",
            f"  val loss          {meta['final_val_loss']:.4f} nats/token (unigram {meta['unigram_baseline']:.4f})",
            f"  flatness          {flatness_line(meta['flatness'], flat_expected)}",
            f"  forward FLOPs     {flops['total'] / 1e6:.3f} M/token at top-{top_k}, "
            f"{100 * flops['expert_share']:.1f} % in the experts",
            f"  parameters        {meta['params']:,}",
            f"  training speed    {speed:.0f} tokens/s (median)" if speed else "  training speed    n/a",
            f"  build             {meta['build_seconds']:.0f} s on {meta['ranks']} ranks ({meta['built_at']})",
        ]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--demo", action="store_true", help="the demo's shorter-trained base")
    parser.add_argument("--cache-root", type=Path, default=None)
    args, overrides = parser.parse_known_args(argv)
    overrides = [*(DEMO_OVERRIDES if args.demo else ()), *overrides]
    try:
        base = ensure_base_model(overrides, ranks=args.ranks, cache_root=args.cache_root, flat_expected=not args.demo)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ConfigCompositionException as e:  # Hydra names the override, its cause says what was wrong with it
        cause = f" ({error_line(e.__cause__)})" if e.__cause__ else ""
        print(f"config error: {'; '.join(str(e).splitlines())}{cause}", file=sys.stderr)
        return 2
    except BaseModelError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"\nbase model\n{report(base.meta, flat_expected=not args.demo)}")
    return 0 if base.meta["flatness"]["passed"] or args.demo else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
