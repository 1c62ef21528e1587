"""`make demo`: the top1_prune recipe (top-2 warm-up -> top-1 -> two pruning rounds -> LoRA recovery with
distillation) on the tiny MoE and the embedded corpus, 2 CPU ranks through the deepspeed launcher; then say
where everything went (report, export, checkpoint, W&B) and how the validation loss compares with the unigram
baseline. Extra arguments are Hydra overrides (e.g. ``logging.baseline_run=outputs/<a top2_baseline run>``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(extra: list[str]) -> int:
    run_dir = ROOT / "outputs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed),
        "--num_gpus",
        "2",
        str(ROOT / "launch" / "train.py"),
        "+recipe=top1_prune",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        return rc
    s = json.loads((run_dir / "summary.json").read_text())
    verdict = "below" if s["val_loss"] < s["unigram_baseline"] else "NOT below"
    print(f"""
demo finished after {s["step"]} steps
  run folder        {s["run_dir"]}
  metrics           {s["run_dir"]}/metrics.jsonl
  report            {s["run_dir"]}/report.md
  exported model    {s["export"]}   (moetrain.interop.export.load_exported)
  experts per layer {s["experts_per_layer"]}, {s["params"]:,} parameters
  checkpoint        {s["checkpoint"]}
  W&B run           {s["wandb"] or "disabled"}   (upload later with: wandb sync <that folder>)
  validation loss   {s["val_loss"]:.4f} nats/token, {verdict} the unigram baseline {s["unigram_baseline"]:.4f}
""")
    return 0 if s["val_loss"] < s["unigram_baseline"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
