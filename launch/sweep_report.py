"""Report of a sweep: sweep.md + sweep.png + pareto.png in the multirun folder.

python launch/sweep_report.py multirun/2025-01-31/12-00-00
"""

from __future__ import annotations

import argparse
import sys

from moetrain.metrics.sweep_report import write_sweep_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun folder (one subfolder per point)")
    args = parser.parse_args(argv)
    try:
        files = write_sweep_report(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in files.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
