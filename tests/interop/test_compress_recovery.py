"""`+recipe=compress` from a Hugging Face directory, recovering the routers only: at the start of recovery the
logged KL(base || model) equals the KL between the base directory (read by transformers) and the cut model of
the checkpoint written there; recovery changes the router weights and nothing else; the final report rows (the
last stage's and the export's) equal NLL, KL and agreement recomputed from the exported directory and the base
directory, both read by transformers."""

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
from moetrain.train.evaluation import comparison_sums

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

    # the final rows against the export and the base directory, both as transformers loads them
    exported = AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    assert exported.config.num_local_experts == 3 and exported.config.num_experts_per_tok == 1
    with torch.no_grad():
        sums = sum(comparison_sums(exported(x).logits, base(x).logits, y) for x, y in val_batches(cfg, 1))
    n = float(sums[4])
    want = {"val_loss": float(sums[0]) / n, "base_val_loss": float(sums[1]) / n, "kl_base": float(sums[2]) / n,
            "agree_base": float(sums[3]) / n}  # fmt: skip
    row, last = s["family_export"], s["stages"][-1]
    assert row["dir"] == str(run / "hf") and row["family"] == "mixtral"
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert last[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key  # our model = its export
    assert want["base_val_loss"] == pytest.approx(s["base"]["val_loss"], rel=1e-5)
    assert 0 < want["agree_base"] < 1 and want["kl_base"] > 0
    report = (run / "report.md").read_text()
    assert f"| export (mixtral, loaded by transformers) | {row['val_loss']:.4f} |" in report
