"""`+recipe=compress model.init_from=hf:DIR` from a tiny checkpoint of each imported family: top-1, a pruning
round, recovery distilled from the base, the run's own export back to the family's layout (``hf/``);
transformers loads the smaller top-1 model with our logits. Qwen3-MoE runs on 2 ranks with its experts split
over them (``parallel.ep_size=2``) on DeepSpeed's MoE layer (``moe.backend=deepspeed``)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.launch import BIN, FAST, ROOT, free_port, run_launcher
from test_hf_families import FAMILIES, assert_logits_close, tiny_checkpoint
from transformers import AutoModelForCausalLM

from moetrain.interop.hf.from_run import load_run_model

VOCAB = 320  # the byte tokenizer's 257 ids fit
# one checkpoint per family; DeepSeek without group-limited routing (pruning needs ungrouped routers: a group
# must keep as many experts as every other)
CASES = {
    "mixtral": FAMILIES["mixtral"],
    "qwen2_moe": FAMILIES["qwen2_moe"],
    "qwen3_moe": FAMILIES["qwen3_moe"],
    "olmoe": FAMILIES["olmoe"],
    "deepseek_v2": (
        "deepseek_v2",
        {**FAMILIES["deepseek_v2"][1], "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    ),
    "deepseek_v3": FAMILIES["deepseek_v3_plain"],
}
# Qwen3-MoE (softmax renormalised over the k chosen) on 2 ranks, its experts split over them, on DeepSpeed's layer
SPREAD = {"qwen3_moe": ["moe.backend=deepspeed", "parallel.ep_size=2"]}


def launcher(name: str) -> list[str]:
    if name not in SPREAD:
        return [str(BIN / "python")]
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def checkpoint(name: str, path) -> int:
    """A random checkpoint of ``name`` saved by transformers; returns its experts per MoE layer."""
    cfg = tiny_checkpoint(name, path, vocab_size=VOCAB, spec=CASES[name]).config
    return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_experts)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_compress_from_each_family_exports_what_transformers_loads_with_our_logits(name, tmp_path):
    experts = checkpoint(name, tmp_path / "hf")
    keep = experts // 2 if name in SPREAD else experts * 3 // 4  # split over 2 ranks: an even count
    run = tmp_path / "run"
    cmd = [
        *launcher(name), str(ROOT / "launch" / "train.py"), *FAST, "+recipe=compress",
        f"model.init_from=hf:{tmp_path}/hf", "logging.wandb.mode=disabled", f"hydra.run.dir={run}",
        "trainer.max_steps=6", "trainer.eval_every=2", "trainer.save_every=100", "trainer.throughput_rounds=1",
        *(f"schedule.stages.{i}.steps=2" for i in range(3)),
        f"prune.keep=[{keep}]", "prune.profile_tokens=512", "prune.max_loss_increase=100",
        *SPREAD.get(name, []),
    ]  # fmt: skip
    run_launcher(cmd, tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert [r["outcome"] for r in s["prune_rounds"]] == ["kept"]
    assert set(s["experts_per_layer"]) == {keep}
    assert s["base"]["experts_per_layer"] == [experts] * len(s["experts_per_layer"])
    assert s["stages"][-1]["base_val_loss"] == pytest.approx(s["base"]["val_loss"], rel=1e-9)

    out = run / "hf"  # written by the run (export.hf=true in the recipe)
    assert s["family_export"]["family"] == CASES[name][0] and s["family_export"]["dir"] == str(out)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == CASES[name][0] and hf_cfg["num_experts_per_tok"] == 1
    ours, _ = load_run_model(run)
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(exported(tokens).logits, ours(tokens).logits_BSV)
