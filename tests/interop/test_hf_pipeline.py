"""An imported directory in the training pipeline: its tokenizer feeds the data pipeline, a recipe trains on a
non-Mixtral family, and the result exports back to transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.configs import compose_config
from helpers.launch import BIN, FAST, ROOT, free_port, read_metrics, run_launcher
from test_hf_families import assert_logits_close, tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from moetrain.config import ConfigError
from moetrain.interop.hf.from_run import load_run_model
from moetrain.train.data import _is_validation, tokenize_splits

DOCS = [
    "def add(x, y):\n    return x + y\n",
    "import os\nprint(os.getcwd())\n",
    "class Point:\n    def __init__(self, x):\n        self.x = x\n",
    "for i in range(10):\n    print(i * i)\n",
    "with open('f.txt') as f:\n    data = f.read()\n",
    "def mul(x, y):\n    return x * y\n",
]


def tiny_tokenizer(path) -> None:
    """A byte-level BPE (under 300 ids) trained on a few strings, saved as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        DOCS * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(str(path))


@pytest.fixture
def imported_dir(tmp_path):
    """A tiny DeepSeek-V3 checkpoint with its own tokenizer."""
    path = tmp_path / "hf"
    tiny_checkpoint("deepseek_v3", path, vocab_size=320)
    tiny_tokenizer(path)
    return path


def test_the_data_pipeline_uses_the_imported_tokenizer(imported_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"doc{i}.txt").write_text(doc)
    cfg = compose_config([f"model.init_from=hf:{imported_dir}", f"data.path={corpus}", "data.val_fraction=0.3"])
    assert cfg.data.tokenizer == f"hf:{imported_dir}"  # data.tokenizer=auto picked the directory's tokenizer
    assert cfg.model.attention == "mla" and cfg.model.vocab_size == 320
    splits = tokenize_splits(cfg.data, tmp_path / "cache")

    tok = AutoTokenizer.from_pretrained(str(imported_dir))
    expected = {False: [], True: []}
    for doc in DOCS:  # files are read in name order, one document each
        expected[_is_validation(doc, 0.3)] += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert expected[True] and expected[False]
    np.testing.assert_array_equal(splits.train, expected[False])
    np.testing.assert_array_equal(splits.val, expected[True])
    assert len(tok) > 257 and splits.train.max() > 256  # BPE merges, not bytes

    byte_cfg = compose_config([f"model.init_from=hf:{imported_dir}", f"data.path={corpus}", "data.tokenizer=byte"])
    assert byte_cfg.data.tokenizer == "byte"  # an explicit choice wins


def test_a_tokenizer_larger_than_the_vocabulary_fails_with_one_line(tmp_path):
    tiny_checkpoint("qwen3_moe", tmp_path / "hf", vocab_size=96)
    tiny_tokenizer(tmp_path / "hf")
    with pytest.raises(ConfigError) as err:
        compose_config([f"model.init_from=hf:{tmp_path}/hf"])
    msg = str(err.value)
    assert msg.startswith("model.vocab_size=96 is smaller than data.tokenizer=hf:"), msg
    assert "\n" not in msg
    tiny_checkpoint("qwen3_moe", tmp_path / "bare", vocab_size=300)  # no tokenizer files
    with pytest.raises(ConfigError, match=r"^data.tokenizer=hf finds no tokenizer.json"):
        compose_config([f"model.init_from=hf:{tmp_path}/bare", "data.tokenizer=hf"])
    assert compose_config([f"model.init_from=hf:{tmp_path}/bare"]).data.tokenizer == "byte"  # auto


def train_from(hf_dir, tmp_path, *overrides: str) -> None:
    """``launch/train.py`` with the fast test settings, starting from ``model.init_from=hf:hf_dir``."""
    run = [
        str(BIN / "python"),
        str(ROOT / "launch" / "train.py"),
        *FAST,
        f"model.init_from=hf:{hf_dir}",
        "logging.wandb.mode=disabled",
        f"hydra.run.dir={tmp_path}/run",
        *overrides,
    ]
    run_launcher(run, tmp_path)


def test_a_recipe_trains_an_imported_deepseek_v3_and_exports_it(imported_dir, tmp_path):
    """model.init_from=hf:DIR of a non-Mixtral family: architecture, weights and tokenizer from the directory."""
    train_from(imported_dir, tmp_path, "trainer.max_steps=3", "trainer.eval_every=3")
    metrics = read_metrics(tmp_path / "run")
    assert np.isfinite(metrics[3]["train/loss"]) and np.isfinite(metrics[3]["val/loss"])

    export = [str(BIN / "python"), str(ROOT / "launch" / "export_hf.py"), str(tmp_path / "run"), str(tmp_path / "out")]
    run_launcher(export, tmp_path)
    ours, _ = load_run_model(tmp_path / "run")  # the trainer's export/ (safetensors)
    from_checkpoint, cfg = load_run_model(tmp_path / "run" / "checkpoints" / "step_00000003")
    assert cfg.model.attention == "mla" and cfg.data.tokenizer == f"hf:{imported_dir}"
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        assert_logits_close(exported(tokens).logits, ours(tokens).logits_BSV)
        assert_logits_close(from_checkpoint(tokens).logits_BSV, ours(tokens).logits_BSV)
        trained = ours.layers[1].ffn.router.weight_ED
        imported = AutoModelForCausalLM.from_pretrained(str(imported_dir)).model.layers[1].mlp.gate.weight
        assert 0 < (trained - imported).abs().max() < 0.05  # trained a few steps from the imported weights
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # the directory's tokenizer travels along


@pytest.mark.slow
def test_an_expert_parallel_model_imports_its_slice(tmp_path):
    tiny_checkpoint("deepseek_v3", tmp_path / "hf")
    script = ROOT / "tests" / "dist" / "hf_expert_parallel.py"
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = run_launcher([*torchrun, str(script), str(tmp_path / "hf")], tmp_path, timeout=180)
    assert "HF-EP-OK rank=0" in proc.stdout and "HF-EP-OK rank=1" in proc.stdout


@pytest.mark.slow
def test_top1_prune_from_an_imported_mixtral_exports_a_smaller_mixtral(tmp_path):
    """The issue's workflow: import a Mixtral, switch to top-1, prune in two rounds, recover with LoRA and
    distillation, export back; transformers loads the smaller top-1 Mixtral with our logits."""
    tiny_checkpoint("mixtral", tmp_path / "hf", vocab_size=320)  # 4 experts, top-2
    stages = [f"schedule.stages.{i}.steps=4" for i in range(5)]
    train_from(
        tmp_path / "hf",
        tmp_path,
        "+recipe=top1_prune",
        "trainer.max_steps=20",
        "trainer.eval_every=4",
        *stages,
        "prune.profile_tokens=1024",
        "prune.keep=[]",
        "schedule.stages.4.lora=true",
        "distill.enabled=true",
        "prune.threshold=1.0",  # every expert is a candidate: the caps decide (1 per layer and round)
        "prune.max_fraction=0.34",
        "prune.equal_per_layer=true",  # one expert count for the exported config
        "prune.max_loss_increase=100",
        "moe.renormalize_top1=true",  # Mixtral's own top-1 gating (gate 1.0), which its format can express
    )
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["outcome"] for r in s["prune_rounds"]] == ["kept", "kept"]
    assert s["experts_per_layer"] == [2, 2, 2]
    export = [str(BIN / "python"), str(ROOT / "launch" / "export_hf.py"), str(tmp_path / "run"), str(tmp_path / "out")]
    run_launcher(export, tmp_path)
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["model_type"] == "mixtral"
    assert hf_cfg["num_local_experts"] == 2 and hf_cfg["num_experts_per_tok"] == 1
    ours, _ = load_run_model(tmp_path / "run")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        assert_logits_close(exported(tokens).logits, ours(tokens).logits_BSV)
