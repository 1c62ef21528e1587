"""Every stage compared with the base model (distill.teacher=base): the per-batch comparison against a per-token
loop, the report's table from hand-made rows, and a 2-rank run whose summary rows (NLL, base NLL, KL(base ||
model), top-1 agreement; the base measurement) equal values recomputed here from the saved checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from helpers.configs import assert_config_error, cli_config_error, compose_config
from helpers.launch import BIN, FAST, ROOT, free_port, read_metrics, run_launcher, val_batches
from omegaconf import OmegaConf

from moetrain.config import ConfigError, TrainConfig
from moetrain.metrics.comparison import comparison_rows
from moetrain.model import build_model
from moetrain.train.evaluation import COMPARISON, comparison_sums
from moetrain.train.reference import comparison_metrics, gap_recovered, tolerance_check
from moetrain.train.stages import StageSchedule


def per_token_reference(z_BSV: torch.Tensor, r_BSV: torch.Tensor, y_BS: torch.Tensor) -> list[float]:
    """The five sums of ``comparison_sums``, token by token in float64 with plain Python arithmetic."""
    ce = ce_ref = kl = agree = 0.0
    z, r = z_BSV.double().flatten(0, 1).tolist(), r_BSV.double().flatten(0, 1).tolist()
    for zt, rt, y in zip(z, r, y_BS.flatten().tolist()):
        lz, lr = math.log(sum(math.exp(v) for v in zt)), math.log(sum(math.exp(v) for v in rt))
        log_pz, log_pr = [v - lz for v in zt], [v - lr for v in rt]
        ce -= log_pz[y]
        ce_ref -= log_pr[y]
        kl += sum(math.exp(b) * (b - a) for a, b in zip(log_pz, log_pr))
        agree += float(max(range(len(zt)), key=zt.__getitem__) == max(range(len(rt)), key=rt.__getitem__))
    return [ce, ce_ref, kl, agree, float(len(z))]


def test_comparison_sums_equal_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    B, S, V = 3, 5, 11
    z = torch.randn(B, S, V, generator=g) * 2
    r = z + 0.7 * torch.randn(B, S, V, generator=g)  # close to the model: some tokens agree, some do not
    y = torch.randint(0, V, (B, S), generator=g)
    got = comparison_sums(z, r, y)
    want = per_token_reference(z, r, y)
    assert got.dtype == torch.float64 and len(got) == len(COMPARISON)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert 0 < want[3] < B * S  # the agreement count is neither trivial case
    # the model against itself: its own CE twice, no divergence, every token agrees
    same = comparison_metrics(comparison_sums(z, z, y))
    assert same["val/kl_base"] == pytest.approx(0.0, abs=1e-6) and same["val/agree_base"] == 1.0
    assert same["val/nll_gap"] == 0.0
    m = comparison_metrics(got)
    assert m["val/loss"] == pytest.approx(want[0] / (B * S), rel=1e-6)
    assert m["val/nll_gap"] == pytest.approx((want[0] - want[1]) / (B * S), rel=1e-5)


def test_report_rows_against_the_base():
    base = {"val_loss": 2.0, "expert_flops_per_token": 1000.0, "experts_per_layer": [8, 8], "params": 12345}
    stages = [
        {"stage": "top1", "val_loss": 2.1, "base_val_loss": 2.0, "kl_base": 0.125, "agree_base": 0.875,
         "expert_flops_per_token": 500.0, "experts_per_layer": [8, 8], "params": 12345, "tokens_per_s": 1500.4,
         "tokens_spent": 4096},
        {"stage": "prune", "val_loss": float("nan"), "base_val_loss": 2.0, "experts_per_layer": [6, 6],
         "params": 9000, "tokens_per_s": float("nan"), "tokens_spent": 8192},
    ]  # fmt: skip
    rounds = [{"stage": "prune", "outcome": "kept", "val_loss_after": 2.5, "experts_after": [6, 6]}]
    rows = comparison_rows(base, stages, rounds)
    assert rows[0] == ["base", "2.0000", "-", "-", "-", "-", "1000", "[8, 8]", "12,345", "-", "0"]
    assert rows[1] == [
        "top1", "2.1000", "+0.1000", "+5.00 %", "0.1250", "87.50 %", "500", "[8, 8]", "12,345", "1500", "4,096"
    ]  # fmt: skip
    assert rows[2] == [
        "prune, right after the cut",
        "2.5000",
        "+0.5000",
        "+25.00 %",
        *["-"] * 3,
        "[6, 6]",
        "-",
        "-",
        "-",
    ]
    assert rows[3][1:6] == ["-", "-", "-", "-", "-"]  # a stage without numbers shows none, not nan
    assert rows[3][-1] == "8,192"
    export = {
        "stage": "export (mixtral, loaded by transformers)",
        "val_loss": 2.2,
        "base_val_loss": 2.0,
        "kl_base": 0.25,
        "agree_base": 0.75,
        "experts_per_layer": [6, 6],
        "params": 9000,
        "tokens_spent": 8192,
    }
    with_export = comparison_rows(base, stages, rounds, export)
    assert with_export[:-1] == rows  # fmt: skip
    assert with_export[-1] == ["export (mixtral, loaded by transformers)", "2.2000", "+0.2000", "+10.00 %", "0.2500",
                               "75.00 %", "-", "[6, 6]", "9,000", "-", "8,192"]  # fmt: skip


def test_recovery_fraction_and_tolerance():
    base = {"val_loss": 2.0}
    rounds = [
        {"stage": "p1", "outcome": "kept", "val_loss_after": 2.4},
        {"stage": "p2", "outcome": "rolled back (...)", "val_loss_after": 3.0},
    ]
    got = gap_recovered(base, rounds, 2.1)  # the last kept cut opened +0.4; recovery ends at +0.1
    assert got == pytest.approx({"cut_gap": 0.4, "final_gap": 0.1, "fraction": 0.75})
    assert gap_recovered(base, rounds[1:], 2.1) == {}  # nothing was cut
    assert tolerance_check(2.0, 2.05, 5.0) == {"max_nll_gap_pct": 5.0, "nll_gap_pct": pytest.approx(2.5), "met": True}
    assert tolerance_check(2.0, 2.2, 5.0)["met"] is False
    assert tolerance_check(2.0, 2.2, None) is None


@pytest.mark.parametrize(("choice", "trainable", "lora"), [("router", "router", False), ("lora", "all", True),
                                                          ("full", "all", False)])  # fmt: skip
def test_recover_trainable_sets_the_recovery_stage(choice, trainable, lora):
    cfg = compose_config(["+recipe=compress", f"recover.trainable={choice}", "export.hf=false"])  # the entry applies it
    recover = [st for st in cfg.schedule.stages if st.recover]
    assert [st.name for st in recover] == ["recover"]
    assert (recover[0].trainable, recover[0].lora) == (trainable, lora)
    assert all(st.trainable == "all" and not st.lora for st in cfg.schedule.stages if not st.recover)


def test_a_recovery_stage_that_says_what_it_trains_itself_is_refused():
    with pytest.raises(ConfigError, match=r"^schedule.stages\[2\].lora=true in a recovery stage"):
        compose_config(["+recipe=compress", "schedule.stages.2.lora=true", "export.hf=false"])


def test_an_export_without_a_family_is_refused_before_training():
    assert_config_error(["+recipe=compress"], "export.hf=true needs a family: model.init_from=None", "export.family")
    assert_config_error(["+recipe=compress", "export.family=gpt2"], "export.family=gpt2 is not supported",
                        "allowed: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3")  # fmt: skip
    assert compose_config(["+recipe=compress", "export.family=olmoe"]).export.family == "olmoe"


STEPS = {"top2": 4, "top1": 4, "prune": 4, "recover": 4}
RUN = [
    *FAST,
    "logging.wandb.mode=disabled",
    "distill.teacher=base",
    "distill.enabled=true",
    f"trainer.max_steps={sum(STEPS.values())}",
    "trainer.eval_every=4",
    "trainer.save_every=100",  # the stage ends are saved anyway
    "trainer.keep_checkpoints=20",
    "trainer.throughput_rounds=2",
    "schedule.warmup_steps=2",
    "schedule.stages=[{name:top2,steps:4},{name:top1,steps:4,moe:{top_k:1}},{name:prune,steps:4,prune:true},"
    "{name:recover,steps:4}]",
    "prune.keep=[6]",
    "prune.profile_tokens=512",
    "prune.max_loss_increase=100",
]


def checkpoint_models(folder) -> tuple[torch.nn.Module, torch.nn.Module, TrainConfig]:
    """The model of a ``step_*`` checkpoint (its structure and the runtime MoE values of the step it ends) and
    the teacher saved beside it (the base: its own structure, the config's top-k, dropless), in eval mode."""
    from safetensors.torch import load_file

    saved = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved["config"]))
    model = build_model(cfg.model, cfg.moe)
    model.load_state_dict(saved["module"])
    runtime = StageSchedule(cfg.schedule, cfg.moe, cfg.trainer.max_steps).at(int(saved["step"]) - 1).moe
    for core in model.moe_layers():
        for key, value in runtime.items():
            setattr(core, key, value)
    structure = json.loads((folder / "structure.json").read_text())
    assert structure["teacher"] == "base"
    base_moe = replace(cfg.moe, expert_ids=structure["teacher_expert_ids"], capacity_factor=None,
                       eval_capacity_factor=None)  # fmt: skip
    teacher = build_model(cfg.model, base_moe)
    teacher.load_state_dict(load_file(str(folder / "teacher_rank00000.safetensors")))
    return model.eval(), teacher.eval(), cfg


@pytest.mark.slow
def test_two_rank_run_rows_equal_recomputed_checkpoint_values(tmp_path):
    from moetrain.interop.export import validation_loss

    run = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), *RUN, f"hydra.run.dir={run}"]  # fmt: skip
    run_launcher(cmd, tmp_path, timeout=600)
    s = json.loads((run / "summary.json").read_text())
    assert [st["stage"] for st in s["stages"]] == list(STEPS)
    assert [r["outcome"] for r in s["prune_rounds"]] == ["kept"] and s["experts_per_layer"] == [6, 6]
    ckpt = run / "checkpoints"

    # the base measurement: the teacher of any checkpoint is the step-0 model
    _, teacher, cfg = checkpoint_models(ckpt / f"step_{sum(STEPS.values()):08d}")
    base = s["base"]
    ce = tokens = computed = 0.0
    with torch.no_grad():
        for x, y in val_batches(cfg, 2):
            out = teacher(x)
            ce += float(comparison_sums(out.logits_BSV, out.logits_BSV, y)[1])
            tokens += y.numel()
            computed += sum(float(st.tokens_per_expert_E.sum()) for st in out.moe_stats)
    m = cfg.model
    assert base["val_loss"] == pytest.approx(ce / tokens, rel=1e-5)
    flops = computed * 3 * 2 * m.d_model * m.d_ff / tokens
    assert flops == 2 * len(teacher.moe_layers()) * 6 * m.d_model * m.d_ff  # dropless top-2: 2 experts a token
    assert base["expert_flops_per_token"] == pytest.approx(flops, rel=1e-9)
    assert base["experts_per_layer"] == [8, 8]
    assert base["params"] == sum(p.numel() for p in teacher.parameters())
    metrics = read_metrics(run)
    assert metrics[0]["val/base_loss"] == pytest.approx(base["val_loss"], rel=1e-12)  # logged at step 0

    # every stage at its end against the base, recomputed from the checkpoint written there; a stage followed
    # by a pruning round is checked through the round's own validation (its checkpoint holds the cut model)
    pruned_at = {r["step"]: r for r in s["prune_rounds"]}
    checked = []
    for st in s["stages"]:
        step = st["end_step"]
        if step in pruned_at:
            assert st["val_loss"] == pytest.approx(pruned_at[step]["val_loss_before"], rel=1e-9)
            assert st["base_val_loss"] == pytest.approx(base["val_loss"], rel=1e-9)
            continue
        model, teacher, cfg = checkpoint_models(ckpt / f"step_{step:08d}")
        with torch.no_grad():
            sums = sum(comparison_sums(model(x).logits_BSV, teacher(x).logits_BSV, y) for x, y in val_batches(cfg, 2))
            t = cfg.trainer
            nll = validation_loss(model, cfg.data, m.seq_len, t.micro_batch_size, 2, t.eval_batches, t.seed)
        n = float(sums[4])
        want = {"val_loss": float(sums[0]) / n, "base_val_loss": float(sums[1]) / n,
                "kl_base": float(sums[2]) / n, "agree_base": float(sums[3]) / n}  # fmt: skip
        for key, value in want.items():
            assert st[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (st["stage"], key)
        assert st["val_loss"] == pytest.approx(nll, rel=1e-5)  # the plain validation path agrees
        assert st["params"] == sum(p.numel() for p in model.parameters())
        assert metrics[step]["val/kl_base"] == st["kl_base"] and metrics[step]["val/nll_gap"] == pytest.approx(
            st["val_loss"] - st["base_val_loss"], rel=1e-9
        )
        checked.append(st["stage"])
    assert checked == ["top2", "prune", "recover"]
    assert s["stages"][0]["kl_base"] > 0 and s["stages"][-1]["kl_base"] > s["stages"][0]["kl_base"]

    tp = s["throughput"]
    assert tp["rounds"] == 2 and tp["base_tokens_per_s"] > 0 and tp["model_tokens_per_s"] > 0 and tp["speedup"] > 0
    report = (run / "report.md").read_text()
    assert "## Compared with the base model (same validation tokens)" in report
    last = s["stages"][-1]
    gap = last["val_loss"] - base["val_loss"]
    assert (
        f"| recover | {last['val_loss']:.4f} | {gap:+.4f} | {100 * gap / base['val_loss']:+.2f} % | "
        f"{last['kl_base']:.4f} | {100 * last['agree_base']:.2f} % |" in report
    )
    assert f"| base | {base['val_loss']:.4f} | - |" in report and f"speedup {tp['speedup']:.2f}x" in report

    # the checkpoint's teacher is the base: resuming it as another kind of teacher stops with one line
    line = cli_config_error(tmp_path, *RUN, f"trainer.resume={ckpt}/step_00000012", "distill.teacher=pre_prune")
    assert line.startswith("config error: distill.teacher=pre_prune does not match the teacher of the checkpoint")
    assert line.endswith("(base); allowed: the checkpoint's")
