"""`make demo`'s last screen (launch/demo.py) from a made-up run summary: the base vs compressed rows, the
export's own numbers, the recovery and tolerance verdicts and the lines that load the export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers.launch import ROOT


def demo_module():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "launch" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_shows_base_against_compressed_and_the_export():
    summary = {
        "base": {"val_loss": 2.0, "expert_flops_per_token": 1000.0, "experts_per_layer": [8, 8], "params": 20000},
        "val_loss": 2.08,
        "experts_per_layer": [6, 6],
        "params": 16000,
        "stages": [{"kl_base": 0.05, "agree_base": 0.9, "expert_flops_per_token": 500.0, "tokens_spent": 61440}],
        "throughput": {"base_tokens_per_s": 1000.0, "model_tokens_per_s": 1600.0, "speedup": 1.6},
        "recovery": {"cut_gap": 0.4, "final_gap": 0.08, "fraction": 0.8},
        "tolerance": {"nll_gap_pct": 4.0, "max_nll_gap_pct": 5.0, "met": True},
        "family_export": {"family": "mixtral", "dir": "/runs/x/hf", "val_loss": 2.0801, "nll_gap_pct": 4.006,
                          "kl_base": 0.0501, "agree_base": 0.899},
        "run_dir": "/runs/x",
        "wandb": None,
    }  # fmt: skip
    meta = {"pretraining_tokens": 1228800, "steps": 250, "build_seconds": 120.0}
    text = demo_module().screen(summary, meta, Path("/cache/base"), Path("/runs/x/hf"), 300.0)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("validation NLL"))
    assert row.split()[-4:] == ["2.0000", "2.0800", "+0.0800", "(+4.00%)"]
    assert next(line for line in lines if line.startswith("training tokens/s")).endswith("1.60x")
    assert next(line for line in lines if line.startswith("expert FLOPs/token")).endswith("0.50x")
    assert "  export            mixtral directory as transformers loads it: NLL 2.0801 (+4.01 %), KL 0.0501, " \
           "agreement 89.9%" in lines  # fmt: skip
    assert any("80% of it taken back" in line for line in lines)
    assert any(line.endswith("(recover.max_nll_gap_pct): met") for line in lines)
    assert '  model = AutoModelForCausalLM.from_pretrained("/runs/x/hf")' in lines
    assert "training tokens spent" in text and "5.0% of the base's" in text
