"""Expert pruning, LoRA recovery and distillation: selection rules, surgery and adapters against independent
references, a forced rollback, and the 2-rank top1_prune recipe end to end (export, reload, resume)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers.launch import BIN, FAST, ROOT, assert_same_losses, free_port, read_metrics, run_launcher, torchrun_cmd

from moetrain.config import LoRAConfig, ModelConfig, MoEConfig, PruneConfig
from moetrain.model import build_model
from moetrain.runtime.distributed import shm_buffer_paths
from moetrain.surgery.distill import distillation_kl
from moetrain.surgery.lora import LoRAAdapters
from moetrain.surgery.pruning import ExpertProfile, select_survivors


def shares(*rows):
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_select_survivors_per_layer_caps_and_min_experts():
    cfg = PruneConfig(threshold=0.1, max_fraction=0.5, min_experts=2)
    s = shares([0.05, 0.3, 0.02, 0.3, 0.01, 0.32], [0.5, 0.5, 0.0, 0.0])
    # layer 0: three cold (0.01, 0.02, 0.05), cap floor(0.5 * 6) = 3; layer 1: cap min(2, 4 - 2) = 2
    assert select_survivors(s, cfg, ep_size=1) == [[1, 3, 5], [0, 1]]
    # ep_size=2: survivors must be even: layer 0 keeps its warmest candidate (share 0.05)
    assert select_survivors(s, cfg, ep_size=2) == [[0, 1, 3, 5], [0, 1]]
    assert select_survivors(s, PruneConfig(threshold=0.0, max_fraction=0.5), 1) == [list(range(6)), [0, 1, 2, 3]]
    # equal_per_layer: both layers remove 2 (the fewest any layer removes), each its coldest
    even = PruneConfig(threshold=0.1, max_fraction=0.5, min_experts=2, equal_per_layer=True)
    assert select_survivors(s, even, ep_size=1) == [[0, 1, 3, 5], [0, 1]]


def test_select_survivors_global_ranking():
    cfg = PruneConfig(threshold=0.2, max_fraction=0.25, min_experts=1, ranking="global")
    s = shares([0.15, 0.85], [0.01, 0.19, 0.4, 0.4], [0.1, 0.9])
    # 8 experts, budget floor(0.25 * 8) = 2: the two coldest anywhere (0.01 in layer 1, 0.1 in layer 2)
    assert select_survivors(s, cfg, ep_size=1) == [[0, 1], [1, 2, 3], [1]]


def test_profile_shares_per_criterion():
    p = ExpertProfile(
        routed_E=[torch.tensor([6.0, 2.0, 0.0, 2.0])],
        gate_mass_E=[torch.tensor([3.0, 0.5, 0.0, 1.5])],
        saliency_sum_E=[torch.tensor([6.0, 4.0, 0.0, 1.0])],
        tokens=10,
    )
    torch.testing.assert_close(p.shares("frequency")[0], torch.tensor([0.6, 0.2, 0.0, 0.2], dtype=torch.float64))
    torch.testing.assert_close(p.shares("gate_weighted")[0], torch.tensor([0.6, 0.1, 0.0, 0.3], dtype=torch.float64))
    mean = torch.tensor([1.0, 2.0, 0.0, 0.5], dtype=torch.float64)  # saliency per routed token
    torch.testing.assert_close(p.shares("saliency")[0], mean / mean.sum())


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=300, seq_len=16)
    return build_model(cfg, MoEConfig(num_experts=4, top_k=2))


def test_lora_trains_only_adapters_and_merge_equals_adapter_model():
    model = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = LoRAAdapters(LoRAConfig(targets=["router", "experts", "attention"], rank=2, alpha=4.0), "native")
    adapters.attach(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(3):
        x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(i))
        out = model(x)
        loss = F.cross_entropy(out.logits_BSV.flatten(0, 1), x.roll(-1, 1).flatten()) + 0.01 * out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        adapted = model(x).logits_BSV
    adapters.merge(model)
    after = dict(model.named_parameters())
    assert set(after) == set(base)  # the merged model has exactly the original parameters
    with torch.no_grad():
        merged = model(x).logits_BSV
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    changed = {n for n in base if not torch.equal(after[n], base[n])}
    # merging moved exactly the adapted weights (router, experts, attention projections); nothing else
    assert changed and all(("router" in n or "experts" in n or ".attn.w" in n) for n in changed), changed
    assert any("experts" in n for n in changed) and any("router" in n for n in changed)


def test_distillation_kl_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    expected = T * T * (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_kl(s, t, T), expected)
    assert float(distillation_kl(t, t, T)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_surgery_and_expert_lora_under_expert_parallelism(tmp_path):
    """native/deepspeed x ep 1/2 x ZeRO 0/1: pruned == masked, moments carried; LoRA grads ep2 == ep1."""
    cmd = torchrun_cmd(ROOT / "tests" / "dist" / "prune_equivalence.py")
    out = run_launcher(cmd, tmp_path, timeout=900).stdout
    assert out.count("SURGERY-OK") == 5, out[-3000:]
    assert "LORA-EP-OK" in out


PRUNE_FAST = [
    *FAST,
    "+recipe=top1_prune",
    "trainer.max_steps=50",
    "trainer.eval_every=10",
    "trainer.save_every=10",
    "trainer.keep_checkpoints=10",
    *(f"schedule.stages.{i}.steps=10" for i in range(5)),
    "prune.profile_tokens=2048",
    # the threshold rule (cold experts, capped per round) and a LoRA recovery distilled from the pre-prune model:
    # the paths these tests cover (the recipe itself now cuts by budget and recovers by plain training)
    "prune.keep=[]",
    "prune.criterion=frequency",
    "prune.threshold=0.14",
    "prune.max_fraction=0.25",
    "schedule.stages.4.lora=true",
    "lora.targets=[router,experts]",
    "distill.enabled=true",
]


@pytest.mark.slow
def test_forced_bad_round_rolls_back(tmp_path):
    """With distillation on: the teacher that round 1 takes goes with its rollback (the snapshot has none),
    and the final checkpoint's teacher is the one the first kept round took, if any."""
    run_dir = tmp_path / "run"
    overrides = [
        *PRUNE_FAST,
        "prune.threshold=1.0",
        "prune.max_fraction=0.5",
        "prune.max_loss_increase=0.0",
        "distill.enabled=true",
        f"hydra.run.dir={run_dir}",
    ]
    env = {"MOETRAIN_FAULT": "hurt-prune-round:1"}  # the round also scales every expert output up 100x
    run_launcher([sys.executable, str(ROOT / "launch" / "train.py"), *overrides], tmp_path, extra_env=env)
    s = json.loads((run_dir / "summary.json").read_text())
    r = s["prune_rounds"][0]
    assert r["experts_after"] == [4, 4] and r["val_loss_after"] > r["val_loss_before"]
    assert r["outcome"].startswith("rolled back")
    assert r["val_loss_restored"] == r["val_loss_before"]  # weights, structure and routing exactly restored
    assert s["prune_rounds"][1]["experts_before"] == [8, 8]  # round 2 starts from the unpruned model
    assert not any(p.name.startswith("pre_prune") for p in (run_dir / "checkpoints").iterdir())
    kept = [r for r in s["prune_rounds"] if r["outcome"] == "kept"]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    structure = json.loads((run_dir / "checkpoints" / latest / "structure.json").read_text())
    assert structure["teacher_expert_ids"] == (kept[0]["expert_ids_before"] if kept else None)


@pytest.mark.slow
def test_top1_prune_two_ranks_exports_reloads_and_resumes(tmp_path):
    from moetrain.interop.export import load_exported, validation_loss

    def launch(run_dir, *extra):
        port = free_port()
        cmd = [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            str(ROOT / "launch" / "train.py"),
            *PRUNE_FAST,
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        proc = run_launcher(cmd, tmp_path, timeout=900, keep_shm=True)
        assert not shm_buffer_paths("127.0.0.1", str(port))  # every rank released DeepSpeed's shared memory
        return proc

    reference = tmp_path / "reference"  # logging.baseline_run: the report's first quality row reads its summary
    reference.mkdir()
    (reference / "summary.json").write_text(json.dumps({"step": 777, "val_loss": 1.2345, "params": 4321}))
    full = tmp_path / "full"
    launch(full, f"logging.baseline_run={reference}")
    s = json.loads((full / "summary.json").read_text())
    rounds = s["prune_rounds"]
    assert [r["outcome"] for r in rounds] == ["kept", "kept"]
    assert rounds[0]["experts_after"] == [6, 6] and s["experts_per_layer"] == rounds[1]["experts_after"]
    assert s["params"] < s["stages"][0]["params"]  # fewer parameters after pruning
    stages = {st["stage"]: st for st in s["stages"]}
    assert stages["recover"]["experts_per_layer"] == s["experts_per_layer"]
    assert "train/distill_kl" in read_metrics(full)[45]  # distillation runs after the first round
    report = (full / "report.md").read_text()
    assert "Quality" in report and "prune round 1" in report and (full / "pruning.png").is_file()
    assert "| baseline: reference, 777 steps | 1.2345 | 3.437 | - | reference at equal total steps | 4,321 |" in report
    assert f"| end of stage recover (step {s['step']}) | {s['val_loss']:.4f} |" in report

    model, model_cfg, moe_cfg = load_exported(full / "export")
    assert [layer.num_experts for layer in model.moe_layers()] == s["experts_per_layer"]
    from helpers.configs import compose_config

    cfg = compose_config([*PRUNE_FAST])
    cfg.data.cache_dir = str(ROOT / ".pytest_cache" / "moetrain-data")
    with torch.no_grad():
        loss = validation_loss(
            model,
            cfg.data,
            model_cfg.seq_len,
            cfg.trainer.micro_batch_size,
            2,
            cfg.trainer.eval_batches,
            cfg.trainer.seed,
        )
    assert loss == pytest.approx(s["val_loss"], rel=1e-5)

    # resume inside prune2 (pruned structure + teacher) and run through the LoRA stage: same losses
    resumed = tmp_path / "resumed"
    launch(resumed, f"trainer.resume={full}/checkpoints/step_00000030")
    assert_same_losses(read_metrics(resumed), read_metrics(full), range(31, 51), tol=1e-5)
