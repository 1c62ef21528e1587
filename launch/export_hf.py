"""Export a training run to a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

python launch/export_hf.py outputs/2026-01-01/12-00-00 exported/ [--family mixtral]

The run (or one of its ``checkpoints/step_*`` folders) must have started from ``model.init_from=hf:DIR``,
whose family it is written as (``--family`` names another), unless ``--family`` is given. See docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys

from moetrain.config import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("out", help="the Hugging Face directory to write")
    parser.add_argument("--family", default=None, help="model_type to write (default: the run's init_from family)")
    args = parser.parse_args()
    from moetrain.interop.hf.from_run import export_run

    try:
        path = export_run(args.checkpoint, args.out, args.family)
    except ConfigError as e:
        print(f"export error: {e}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
