"""`+recipe=compress` from a Hugging Face directory, recovering the routers only: at the start of recovery the
logged KL(base || model) equals the KL between the base directory (read by transformers) and the cut model of
the checkpoint written there, and recovery changes the router weights and nothing else."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.launch import BIN, FAST, ROOT, read_metrics, run_launcher, val_batches
from test_compress_families import CASES, VOCAB
from test_hf_families import tiny_checkpoint
from transformers import AutoModelForCausalLM

from moetrain.interop.hf.from_run import load_run_model

STAGES = {"top1": 2, "prune1": 2, "recover": 4}


def module_state(checkpoint) -> dict[str, torch.Tensor]:
    saved = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return saved["module"]


@pytest.mark.slow
def test_router_recovery_from_a_base_directory(tmp_path):
    tiny_checkpoint("mixtral", tmp_path / "hf", vocab_size=VOCAB, spec=CASES["mixtral"])
    run = tmp_path / "run"
    cmd = [
        str(BIN / "python"), str(ROOT / "launch" / "train.py"), *FAST, "+recipe=compress",
        f"model.init_from=hf:{tmp_path}/hf", "logging.wandb.mode=disabled", f"hydra.run.dir={run}",
        f"trainer.max_steps={sum(STAGES.values())}", "trainer.eval_every=2", "trainer.save_every=100",
        "trainer.keep_checkpoints=10", "trainer.throughput_rounds=1", "recover.trainable=router",
        *(f"schedule.stages.{i}.steps={n}" for i, n in enumerate(STAGES.values())),
        "prune.keep=[3]", "prune.profile_tokens=512", "prune.max_loss_increase=100",
    ]  # fmt: skip
    run_launcher(cmd, tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert [r["outcome"] for r in s["prune_rounds"]] == ["kept"] and set(s["experts_per_layer"]) == {3}
    start, end = STAGES["top1"] + STAGES["prune1"], sum(STAGES.values())
    ckpt = run / "checkpoints"

    # KL(base || cut model) at the start of recovery, recomputed from the base directory through transformers
    cut, cfg = load_run_model(ckpt / f"step_{start:08d}")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    kl = tokens = 0.0
    with torch.no_grad():
        for x, _ in val_batches(cfg, 1):
            log_p = F.log_softmax(cut(x).logits_BSV.double(), -1)
            log_r = F.log_softmax(base(x).logits.double(), -1)
            kl += float((log_r.exp() * (log_r - log_p)).sum())
            tokens += x.numel()
    logged = read_metrics(run)[start]["val/kl_base"]
    assert logged > 0 and logged == pytest.approx(kl / tokens, rel=1e-4)

    # recover.trainable=router: from the start of recovery to the end only router weights change
    before, after = module_state(ckpt / f"step_{start:08d}"), module_state(ckpt / f"step_{end:08d}")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    routers = {k for k in before if k.endswith("router.weight_ED")}
    assert changed == routers, sorted(changed ^ routers)
