"""`make demo`: compress a trained MoE and say how much worse and how much faster it is than the model it came
from, in numbers.

1. The base model: ``+recipe=pretrain`` (d_model 128, 4 layers of 8 experts of d_ff 512, top-2) trained on the
   embedded corpus, exported as a Mixtral directory and cached by a hash of its config
   (moetrain/interop/base_model.py): built on the first run, reused afterwards. The demo's base trains for
   fewer steps than the benchmark's (``DEMO_OVERRIDES`` of moetrain/interop/base_model.py; docs/compression.md
   has the longer one).
2. ``+recipe=compress model.init_from=hf:BASE`` on 2 CPU ranks through the deepspeed launcher: top-1, one
   pruning round (8 -> 6 experts per layer), recovery distilled from the base.
3. The run exports the compressed model back to the Mixtral layout (``hf/`` of its folder) and measures that
   directory again as transformers loads it. Then one screen: base vs compressed (NLL and the gap, KL,
   agreement, expert FLOPs/token, experts, parameters, tokens/s measured in one run), the export's own
   numbers, where it is and the two lines of Python that load it.

Exit status: 1 when the compressed model's NLL gap to the base is over the recipe's tolerance
(``recover.max_nll_gap_pct``), else 0 (or the failing step's own status).

Extra arguments are Hydra overrides of the compress run (e.g. ``prune.criterion=frequency prune.mode=merge``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        sys.exit(rc)


def main(extra: list[str]) -> int:
    from moetrain.interop.base_model import DEMO_OVERRIDES, ensure_base_model

    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base = ensure_base_model(list(DEMO_OVERRIDES), ranks=2, flat_expected=False)
    run_dir = ROOT / "outputs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    train = [str(deepspeed), "--num_gpus", "2", str(ROOT / "launch" / "train.py"), "+recipe=compress"]
    run([*train, f"model.init_from=hf:{base.path}", f"hydra.run.dir={run_dir}", *extra], env)
    s = json.loads((run_dir / "summary.json").read_text())
    print(screen(s, base.meta, base.path, Path(s["family_export"]["dir"]), time.time() - t0))
    tolerance = s.get("tolerance")
    return 1 if tolerance and not tolerance["met"] else 0


def screen(s: dict, base_meta: dict, base_path: Path, exported: Path, seconds: float) -> str:
    """Base vs compressed, one screen."""
    b, last, tp = s["base"], s["stages"][-1], s["throughput"]
    gap = s["val_loss"] - b["val_loss"]
    tokens = base_meta["pretraining_tokens"]
    rows = [
        ("validation NLL (nats/token)", f"{b['val_loss']:.4f}", f"{s['val_loss']:.4f}",
         f"{gap:+.4f} ({gap / b['val_loss']:+.2%})"),
        ("KL(base || model), top-1 agreement", "-", f"{last['kl_base']:.4f}, {last['agree_base']:.1%}", ""),
        ("expert FLOPs/token (forward)", f"{b['expert_flops_per_token']:.3g}", f"{last['expert_flops_per_token']:.3g}",
         f"{last['expert_flops_per_token'] / b['expert_flops_per_token']:.2f}x"),
        ("experts per layer", str(b["experts_per_layer"]), str(s["experts_per_layer"]), ""),
        ("parameters", f"{b['params']:,}", f"{s['params']:,}", f"{s['params'] / b['params']:.2f}x"),
        ("training tokens/s (one run, fwd+bwd)", f"{tp['base_tokens_per_s']:.0f}", f"{tp['model_tokens_per_s']:.0f}",
         f"{tp['speedup']:.2f}x"),
        ("training tokens spent", "-", f"{last['tokens_spent']:,}",
         f"{last['tokens_spent'] / tokens:.1%} of the base's"),
    ]  # fmt: skip
    recovery, tolerance, export = s.get("recovery") or {}, s.get("tolerance"), s.get("family_export") or {}
    verdicts = []
    if export:
        verdicts.append(
            f"  export            {export['family']} directory as transformers loads it: NLL {export['val_loss']:.4f} "
            f"({export['nll_gap_pct']:+.2f} %), KL {export['kl_base']:.4f}, agreement {export['agree_base']:.1%}"
        )
    if recovery:
        verdicts.append(
            f"  recovery          gap {recovery['cut_gap']:+.4f} right after the cut -> {recovery['final_gap']:+.4f}: "
            f"{recovery['fraction']:.0%} of it taken back"
        )
    if tolerance:
        verdicts.append(
            f"  tolerance         gap {tolerance['nll_gap_pct']:+.2f} % of the base's NLL, allowed "
            f"{tolerance['max_nll_gap_pct']:g} % (recover.max_nll_gap_pct): {'met' if tolerance['met'] else 'NOT met'}"
        )
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'base':>14}  {'compressed':>18}  change"]
    lines += [f"{a:{width}}  {x:>14}  {y:>18}  {c}" for a, x, y, c in rows]
    return "\n".join(
        [
            "",
            f"demo finished in {seconds / 60:.1f} min",
            f"  base model        {base_path}  ({base_meta['steps']} steps, {tokens:,} pretraining tokens; "
            f"built in {base_meta['build_seconds'] / 60:.1f} min, cached)",
            f"  compress run      {s['run_dir']}  (report.md, metrics.jsonl, checkpoints/, W&B {s['wandb'] or 'off'})",
            f"  exported model    {exported}",
            "",
            *lines,
            "",
            *verdicts,
            "",
            "Load the exported model with transformers:",
            "  from transformers import AutoModelForCausalLM",
            f'  model = AutoModelForCausalLM.from_pretrained("{exported}")',
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
