"""The cached base model (moetrain.interop.base_model): the key, the flatness check, and builds through the real
deepspeed launcher on 2 CPU ranks (exported as Mixtral, loaded by transformers with our logits, reused)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.configs import cli_error_lines
from helpers.launch import launcher_env
from hydra.errors import ConfigCompositionException

from moetrain.config import ConfigError
from moetrain.interop import base_model as bm
from moetrain.interop.export import load_exported
from moetrain.interop.hf import load_hf

TINY = [
    "model.d_model=32",
    "model.d_ff=64",
    "model.n_layers=2",
    "model.seq_len=32",
    "trainer.max_steps=6",
    "trainer.eval_every=2",
    "trainer.eval_batches=2",
    "trainer.micro_batch_size=4",
    "trainer.save_every=6",
    "trainer.expert_stats_every=6",
    "data.stdlib_glob='[a-c]*.py'",
    "logging.wandb.mode=disabled",
]


def key(*overrides: str, ranks: int = 2) -> str:
    return bm.config_key(bm.compose_pretrain(list(overrides), ranks), ranks)


# ---------------------------------------------------------------------------------------------- the key
def test_key_is_stable_and_follows_the_weights_only():
    ref = key(*TINY)
    assert len(ref) == 12 and ref == key(*TINY)
    same = [
        "logging.wandb.mode=offline",
        "logging.progress_bar=true",
        "trainer.eval_every=3",
        "trainer.eval_batches=5",
        "trainer.save_every=2",
        "trainer.log_every=2",
        "trainer.num_threads=1",
        "data.cache_dir=/somewhere/else",
    ]
    for o in same:
        assert key(*TINY, o) == ref, o
    different = [
        "model.d_ff=96",
        "moe.top_k=1",
        "moe.renormalize_top1=true",
        "optim.lr=1e-3",
        "schedule.warmup_steps=3",
        "trainer.max_steps=7",
        "trainer.seed=1",
        "trainer.micro_batch_size=2",
        "data.stdlib_glob='[a-d]*.py'",
        "parallel.zero_stage=1",
    ]
    keys = {o: key(*TINY, o) for o in different}
    assert ref not in keys.values(), keys
    assert len(set(keys.values())) == len(different)
    assert key(*TINY, ranks=1) != ref  # the global batch and the data order change with the world size


def test_surgery_sections_count_only_when_used():
    ref = key(*TINY)
    assert key(*TINY, "prune.criterion=reap") == ref  # no stage prunes: inert
    staged = ["+schedule.stages=[{name: a, steps: 3}, {name: b, steps: 3, prune: true}]"]
    assert key(*TINY, *staged, "prune.criterion=reap") != key(*TINY, *staged)


def test_the_cache_root_is_the_data_pipelines(monkeypatch, tmp_path):
    cfg = bm.compose_pretrain(TINY, 2)
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "env"))
    assert bm.cache_root_of(cfg) == tmp_path / "env"
    cfg.data.cache_dir = str(tmp_path / "cfg")
    assert bm.cache_root_of(cfg) == tmp_path / "cfg"


def test_bad_overrides_fail_before_anything_is_built(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model.d_model=abc"):
        bm.ensure_base_model([*TINY, "model.d_model=abc"], cache_root=tmp_path)
    with pytest.raises(ConfigError, match="^model.d_model=32 is not divisible by model.n_heads=3"):
        bm.ensure_base_model([*TINY, "model.n_heads=3"], cache_root=tmp_path)
    with pytest.raises(ConfigError, match="hydra.run.dir=x is set by the base-model builder"):
        bm.ensure_base_model(["hydra.run.dir=x"], cache_root=tmp_path)
    # a model Mixtral cannot express: top-1 with the raw gate (named before training, not after)
    with pytest.raises(ConfigError, match="moe.renormalize_top1"):
        bm.ensure_base_model([*TINY, "moe.top_k=1"], cache_root=tmp_path)
    with pytest.raises(ConfigError, match="^moe.bias_update_rate=0.01"):
        bm.ensure_base_model([*TINY, "moe.bias_update_rate=0.01"], cache_root=tmp_path)
    assert not (tmp_path / "base").exists()


# ---------------------------------------------------------------------------------------------- flatness
def fake_metrics(tmp_path, curve: dict[int, float]):
    rows = [{"step": s, "train/loss": 9.0} for s in range(1, max(curve) + 1)]
    rows += [{"step": s, "val/loss": v} for s, v in curve.items()]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return bm.val_curve(path)


def test_flatness_on_fake_metrics(tmp_path):
    # N = 1000, s0 = 800: L(800) = 2.00 -> L(1000) = 1.985 is 0.75 % better: flat
    curve = fake_metrics(tmp_path, {200: 3.0, 500: 2.2, 800: 2.0, 900: 1.99, 1000: 1.985})
    assert curve[0] == (200, 3.0) and len(curve) == 5
    c = bm.check_flatness(curve, 1000)
    assert c["passed"] and (c["start_step"], c["end_step"]) == (800, 1000)
    assert c["rel_improvement"] == pytest.approx(0.015 / 2.0)
    assert "passed" in bm.flatness_line(c)
    # the same tail 1.5 % better: not flat, and said loudly
    c = bm.check_flatness(fake_metrics(tmp_path, {400: 2.5, 800: 2.0, 1000: 1.97}), 1000)
    assert not c["passed"] and c["rel_improvement"] == pytest.approx(0.015)
    assert bm.flatness_line(c).startswith("FLATNESS CHECK FAILED")
    # a short base (the demo's) is expected to be still improving: said plainly, not as a failure
    assert bm.flatness_line(c, flat_expected=False).startswith("still improving, as a short-trained base does")
    # s0 falls between evaluations: the last one at or before it (700) starts the window
    c = bm.check_flatness(fake_metrics(tmp_path, {700: 2.0, 900: 1.9, 1000: 1.99}), 1000)
    assert c["start_step"] == 700 and c["passed"]
    # a tolerance and window of one's own
    c = bm.check_flatness(fake_metrics(tmp_path, {500: 2.0, 1000: 1.97}), 1000, window=0.5, tolerance=0.02)
    assert c["start_step"] == 500 and c["passed"]


def test_flatness_cannot_pass_without_the_evaluations_it_needs(tmp_path):
    c = bm.check_flatness(fake_metrics(tmp_path, {900: 2.0, 1000: 2.0}), 1000)
    assert not c["passed"] and c["reason"] == "no evaluation at or before step 800"
    c = bm.check_flatness(fake_metrics(tmp_path, {500: 2.0, 950: 2.0}), 1000)
    assert not c["passed"] and c["reason"] == "no evaluation at step 1000"
    assert bm.flatness_line(c).startswith("FLATNESS CHECK FAILED: no evaluation at step 1000")


# ---------------------------------------------------------------------------------------------- builds
@pytest.fixture
def launch_env(monkeypatch, tmp_path):
    """The launched ranks use the tests' data cache and extension folder (no rebuild of DeepSpeed's op)."""
    for k, v in launcher_env(tmp_path).items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_build_exports_mixtral_with_our_logits_and_is_reused(tmp_path, launch_env, monkeypatch):
    lines: list[str] = []
    base = bm.ensure_base_model(TINY, ranks=2, cache_root=tmp_path, log=lines.append)
    assert base.path == tmp_path / "base" / f"mixtral-{base.key}" and base.key == key(*TINY)
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [base.path.name]  # no temp folder left
    meta = json.loads((base.path / "base_model.json").read_text())
    assert meta == base.meta and meta["overrides"] == TINY and meta["family"] == "mixtral"
    run = base.path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert meta["steps"] == 6 and meta["pretraining_tokens"] == 6 * 2 * 4 * 32
    assert meta["final_val_loss"] == summary["val_loss"]
    assert meta["val_curve"] == [list(p) for p in bm.val_curve(run / "metrics.jsonl")]
    assert [s for s, _ in meta["val_curve"]] == [2, 4, 6]
    assert meta["flatness"] == json.loads(json.dumps(bm.check_flatness(bm.val_curve(run / "metrics.jsonl"), 6)))
    assert bm.flatness_line(meta["flatness"]) in lines  # said, whether it passed or not
    assert meta["flops_per_token"]["top_k=2"]["experts"] == 2 * 2 * 3 * 2 * 32 * 64
    assert not (run / "checkpoints").exists() and (run / "launch.log").is_file()

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base.path)).eval()
    assert hf.config.model_type == "mixtral" and hf.config.num_experts_per_tok == 2
    ours, _, _ = load_exported(run / "export")
    imported, _, _ = load_hf(base.path)
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids).logits_BSV
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(imported.eval()(ids).logits_BSV, expected, atol=1e-5, rtol=0)

    def no_launch(*args, **kwargs):
        raise AssertionError("a cached base model was built again")

    monkeypatch.setattr(bm, "_launch", no_launch)
    again = bm.ensure_base_model(TINY, ranks=2, cache_root=tmp_path, log=lines.append)
    assert again.path == base.path and again.meta == meta
    # what only changes evaluation and logging is the same model
    assert bm.ensure_base_model([*TINY, "trainer.eval_every=3"], ranks=2, cache_root=tmp_path).path == base.path


@pytest.mark.slow
def test_a_failed_build_leaves_no_entry_and_names_the_problem(tmp_path, launch_env):
    # passes the entry's checks, fails in the ranks once the corpus is split: no validation document
    bad = [*TINY, "data.stdlib_glob='ab*.py'", "data.val_fraction=1e-9"]
    with pytest.raises(bm.BaseModelError, match=r"data.val_fraction=1e-09 leaves an empty validation split") as e:
        bm.ensure_base_model(bad, ranks=2, cache_root=tmp_path, log=lambda line: None)
    entry = f"mixtral-{key(*bad)}"
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [f"{entry}.failed.log"]
    assert str(tmp_path / "base" / f"{entry}.failed.log") in str(e.value)
    assert "config error: data.val_fraction" in (tmp_path / "base" / f"{entry}.failed.log").read_text()


def test_cli_names_a_bad_override_in_one_line(tmp_path):
    lines = cli_error_lines(tmp_path, "launch/pretrain.py", "--cache-root", str(tmp_path), "moe.score_func=bad")
    assert len(lines) == 1 and lines[0].startswith("config error: Error merging override moe.score_func=bad")
    assert "expected one of [softmax, sigmoid]" in lines[0]
    assert not (tmp_path / "base").exists()
