"""Every file the entry point reads fails, when it is bad, with one line naming the key and the path: data
files and folders, checkpoints (missing, incomplete, corrupt, of another structure), Hugging Face folders and
their config.json, tokenizer folders. In-process through resolve_config, and through launch/train.py."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from helpers.configs import assert_config_error, cli_config_error, compose_config
from helpers.launch import BIN, FAST, ROOT, run_launcher

from moetrain.config import ConfigError, DataConfig
from moetrain.train.data import tokenize_splits

SUFFIXES = "allowed: .txt, .jsonl, .json, .parquet"
RESUME = "allowed: none, auto, a run folder"
TINY_MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "vocab_size": 300,
    "max_position_embeddings": 256,
}

# the saved_run fixture (a real run, session scope) is made once: the module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("file_errors")


# ---------------------------------------------------------------------------------------------- data
def test_a_data_file_with_an_unknown_suffix(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    assert_config_error(
        [f"data.path={tmp_path}/x.csv"], f"data.path={tmp_path}/x.csv has an unsupported suffix .csv", SUFFIXES
    )
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("doc")
    (tmp_path / "d" / "notes.md").write_text("doc")
    glob = f"{tmp_path}/d/*"  # a glob names the file it matched; a folder would skip notes.md
    assert_config_error(
        [f"data.path='{glob}'"], f"data.path={glob} has an unsupported suffix .md (matched file", SUFFIXES
    )


def test_a_missing_data_path(tmp_path):
    assert_config_error(
        [f"data.path={tmp_path}/missing"], f"data.path={tmp_path}/missing matches no .txt", "no such file"
    )


def test_an_empty_data_file_is_named(tmp_path):
    (tmp_path / "empty.txt").touch()
    assert_config_error(
        [f"data.path={tmp_path}/empty.txt"], f"data.path={tmp_path}/empty.txt is empty (0 bytes)", "allowed:"
    )
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d" / "b.jsonl").touch()
    assert_config_error(
        [f"data.path={tmp_path}/d"], f"data.path={tmp_path}/d: {tmp_path}/d/b.jsonl is empty", "allowed:"
    )


@pytest.mark.parametrize(
    ("name", "content", "key_value", "allowed"),
    [
        (
            "bad.jsonl",
            b'{"text": "a"\n',
            "data.path={f} line 1 is not JSON (JSONDecodeError",
            "one JSON object per line",
        ),
        ("list.jsonl", b"\n[1, 2]\n", "data.path={f} line 2 is a JSON list, not an object", "one JSON object"),
        ("field.jsonl", b'{"body": "a", "id": 1}\n', "data.text_field=text is not a column of {f}", "body, id"),
        ("blank.jsonl", b"\n  \n", "data.path={f} holds only blank lines", "one JSON object per line"),
        ("bad.json", b"text, not json", "data.path={f} is not JSON (it begins with 'text, not json')", "JSON array"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "data.path={f} is not UTF-8 text (byte 3", "UTF-8 text"),
        ("bad.parquet", b"PAR1 not really", "data.path={f} is not a readable parquet file", "allowed: parquet"),
    ],
    ids=["jsonl-malformed", "jsonl-list", "jsonl-field", "jsonl-blank", "json", "txt-latin1", "parquet"],
)
def test_a_data_file_that_is_not_what_its_suffix_says(tmp_path, name, content, key_value, allowed):
    f = tmp_path / name
    f.write_bytes(content)
    assert_config_error([f"data.path={f}"], key_value.format(f=f), allowed)


def test_a_datasets_failure_past_the_first_record_is_named(tmp_path):
    """The entry reads the first record only; a damaged later line fails inside datasets, named there."""
    f = tmp_path / "late.jsonl"
    f.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ConfigError) as err:
        tokenize_splits(DataConfig(path=str(f)), tmp_path / "cache")
    assert str(err.value).startswith(f"data.path={f} cannot be read by datasets' json reader ("), err.value
    assert "\n" not in str(err.value)


def test_an_empty_split_names_the_data_source(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("a single document cannot be split in two")
    with pytest.raises(ConfigError, match=rf"^data.val_fraction=0.05 leaves an empty .* of data.path={f}; allowed"):
        tokenize_splits(DataConfig(path=str(f)), tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="session")
def saved_run(tmp_path_factory) -> Path:
    """A real 2-step run (the FAST model, d_model=128, 8 experts) with its checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("saved")
    run = [str(BIN / "python"), str(ROOT / "launch" / "train.py"), *FAST, "logging.wandb.mode=disabled"]
    run_launcher([*run, "trainer.max_steps=2", "trainer.save_every=2", f"hydra.run.dir={tmp}/run"], tmp)
    return tmp / "run"


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    """A copy of the saved run to damage; its checkpoint folder is ``checkpoints/step_00000002``."""
    shutil.copytree(saved_run / "checkpoints", tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


def step_dir(run: Path) -> Path:
    return run / "checkpoints" / "step_00000002"


def overwrite_same_size(f: Path, text: str) -> None:
    """New content of the old size: the manifest's sizes still match, the content check must find it."""
    size = f.stat().st_size
    f.write_text((text + " " * size)[:size])


def flip_pickle_byte(f: Path) -> None:
    """Damage the pickle inside a torch file without changing its size (the zip CRC no longer matches)."""
    data = bytearray(f.read_bytes())
    with zipfile.ZipFile(f) as z:
        pickle_bytes = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    at = data.find(pickle_bytes) + len(pickle_bytes) // 2
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def garbage_without_manifest(folder: Path) -> None:
    """A checkpoint written before files.json, whose model states are not a torch file (an UnpicklingError
    inside DeepSpeed's loader)."""
    (folder / "files.json").unlink()
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"garbage")


def test_the_saved_checkpoint_resumes_at_the_entry(run_copy):
    assert compose_config([*FAST, f"trainer.resume={run_copy}"]).trainer.resume == str(run_copy)
    assert json.loads((step_dir(run_copy) / "files.json").read_text())["mp_rank_00_model_states.pt"] > 0


def test_a_resume_folder_that_is_no_checkpoint(tmp_path):
    assert_config_error([f"trainer.resume={tmp_path}/nope"], f"trainer.resume={tmp_path}/nope does not exist", RESUME)
    assert_config_error([f"trainer.resume={tmp_path}"], f"trainer.resume={tmp_path} is not a checkpoint folder", RESUME)


def test_latest_naming_a_missing_step(run_copy):
    (run_copy / "checkpoints" / "latest").write_text("step_00000009")
    assert_config_error(
        [*FAST, f"trainer.resume={run_copy}"], f"trainer.resume={run_copy}: {run_copy}/checkpoints/latest names", RESUME
    )


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"garbage"),
            "has mp_rank_00_model_states.pt of 7 bytes",
        ),
        (
            lambda d: flip_pickle_byte(d / "mp_rank_00_model_states.pt"),
            "has a corrupt mp_rank_00_model_states.pt (not a",
        ),
        (lambda d: flip_pickle_byte(d / "rank_state_00000.pt"), "has a corrupt rank_state_00000.pt (not a readable"),
        (
            lambda d: (d / "rank_state_00000.pt").unlink(),
            "is incomplete: 1 of its 5 files are missing (rank_state_00000",
        ),
        (lambda d: garbage_without_manifest(d), "has a corrupt mp_rank_00_model_states.pt (not a readable torch file"),
        (lambda d: overwrite_same_size(d / "layout.json", "{oops"), "has a corrupt layout.json (not readable JSON"),
        (lambda d: (d / "files.json").write_text("[]"), "has a corrupt files.json (JSON list, not an object)"),
    ],
    ids=["overwritten", "corrupt-model-states", "corrupt-rng", "incomplete", "garbage", "layout-json", "manifest"],
)
def test_a_damaged_checkpoint_names_the_file(run_copy, damage, problem):
    damage(step_dir(run_copy))
    assert_config_error([*FAST, f"trainer.resume={run_copy}"], f"trainer.resume={step_dir(run_copy)} {problem}", RESUME)


def test_a_checkpoint_without_a_manifest_still_needs_its_files(run_copy):
    (step_dir(run_copy) / "files.json").unlink()  # as written before files.json: model states + one RNG file per rank
    (step_dir(run_copy) / "rank_state_00000.pt").unlink()
    assert_config_error(
        [*FAST, f"trainer.resume={step_dir(run_copy)}"], f"trainer.resume={step_dir(run_copy)} is incomplete", RESUME
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.d_model=64",
            "was saved with model.d_model=128 and this run has model.d_model=64; allowed: model.d_model=128",
        ),
        ("moe.num_experts=4", "was saved with moe.num_experts=8 and this run has moe.num_experts=4; allowed: moe.num"),
        (
            "moe.backend=deepspeed",
            "was written with moe.backend=native and this run has moe.backend=deepspeed; allowed",
        ),
        ("parallel.ep_size=2", "has parallel.ep_size=1 expert shards; moe.backend=native resumes only with parallel"),
    ],
)
def test_a_checkpoint_of_another_structure(run_copy, override, message):
    assert_config_error(
        [*FAST, f"trainer.resume={run_copy}", override], f"trainer.resume={step_dir(run_copy)} {message}", ""
    )


# ---------------------------------------------------------------------------------------------- HF folders
@pytest.mark.parametrize(
    ("content", "problem", "allowed"),
    [
        ("{not json", "has a config.json that is not readable JSON (JSONDecodeError", "allowed: hf:PATH"),
        ("[1, 2]", "has a config.json that is a JSON list, not an object", "allowed: hf:PATH"),
        ('{"hidden_size": 64}', "has a config.json without a model_type", "allowed: mixtral, qwen2_moe"),
        ('{"model_type": "mixtral", "hidden_size": "x"}', "has a config.json transformers cannot read (", "mixtral"),
    ],
    ids=["malformed", "not-an-object", "no-model-type", "mistyped-value"],
)
def test_a_bad_config_json(tmp_path, content, problem, allowed):
    (tmp_path / "config.json").write_text(content)
    assert_config_error([f"model.init_from=hf:{tmp_path}"], f"model.init_from=hf:{tmp_path} {problem}", allowed)


def test_missing_or_corrupt_hf_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_MIXTRAL))
    assert_config_error(
        [f"model.init_from=hf:{tmp_path}"], f"model.init_from=hf:{tmp_path} has no *.safetensors", "allowed:"
    )
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(10))
    assert_config_error(
        [f"model.init_from=hf:{tmp_path}"],
        f"model.init_from=hf:{tmp_path} has a corrupt model.safetensors (truncated",
        "",
    )
    assert_config_error(
        [f"model.init_from=hf:{tmp_path}/none"], f"model.init_from=hf:{tmp_path}/none has no config.json (no such", ""
    )


# ---------------------------------------------------------------------------------------------- tokenizers
def test_bad_tokenizer_folders(tmp_path):
    allowed = "allowed: byte, hf:PATH"
    assert_config_error(
        [f"data.tokenizer=hf:{tmp_path}/nope"], f"data.tokenizer=hf:{tmp_path}/nope does not exist", allowed
    )
    assert_config_error(
        [f"data.tokenizer=hf:{tmp_path}"], f"data.tokenizer=hf:{tmp_path} has no tokenizer.json or", allowed
    )
    (tmp_path / "tokenizer.json").write_text("{broken")
    assert_config_error(
        [f"data.tokenizer=hf:{tmp_path}"], f"data.tokenizer=hf:{tmp_path} has a corrupt tokenizer.json (", allowed
    )


def test_a_corrupt_baseline_summary(tmp_path):
    (tmp_path / "summary.json").write_text("{")
    assert_config_error(
        [f"logging.baseline_run={tmp_path}"], f"logging.baseline_run={tmp_path} has a corrupt summary.json", ""
    )


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_unknown_suffix_and_empty_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "empty.txt").touch()
    assert cli_config_error(tmp_path, f"data.path={tmp_path}/x.csv") == (
        f"config error: data.path={tmp_path}/x.csv has an unsupported suffix .csv; {SUFFIXES}"
    )
    line = cli_config_error(tmp_path, f"data.path={tmp_path}/empty.txt")
    assert line.startswith(f"config error: data.path={tmp_path}/empty.txt is empty (0 bytes); allowed: "), line


def test_cli_missing_resume_folder_and_malformed_config_json(tmp_path):
    line = cli_config_error(tmp_path, f"trainer.resume={tmp_path}/nope")
    assert line.startswith(f"config error: trainer.resume={tmp_path}/nope does not exist; {RESUME}"), line
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    line = cli_config_error(tmp_path, f"model.init_from=hf:{tmp_path}/hf")
    assert line.startswith(f"config error: model.init_from=hf:{tmp_path}/hf has a config.json that is not readable"), (
        line
    )


def test_cli_corrupt_checkpoint(run_copy, tmp_path):
    flip_pickle_byte(step_dir(run_copy) / "mp_rank_00_model_states.pt")
    line = cli_config_error(tmp_path, *FAST, f"trainer.resume={run_copy}")
    assert line.startswith(
        f"config error: trainer.resume={step_dir(run_copy)} has a corrupt mp_rank_00_model_states.pt"
    ), line


def test_cli_resume_auto_checks_the_checkpoint_when_the_trainer_loads_it(run_copy, tmp_path):
    """trainer.resume=auto names a folder of the run directory (Hydra's): the trainer checks it before loading."""
    flip_pickle_byte(step_dir(run_copy) / "mp_rank_00_model_states.pt")
    overrides = [*FAST, "trainer.resume=auto", "trainer.max_steps=4", "logging.wandb.mode=disabled"]
    line = cli_config_error(tmp_path, *overrides)  # hydra.run.dir=tmp_path/run: run_copy
    assert line.startswith(f"config error: trainer.resume={step_dir(run_copy)} has a corrupt mp_rank_00_model_st"), line


def test_cli_a_checkpoint_the_trainer_cannot_load_is_named(run_copy, tmp_path):
    """What the entry cannot check (auto: the run folder is Hydra's) and the libraries raise while loading (here
    the size mismatch of another d_model) is one line naming trainer.resume and the folder."""
    overrides = [*FAST, "trainer.resume=auto", "trainer.max_steps=4", "logging.wandb.mode=disabled", "model.d_model=64"]
    line = cli_config_error(tmp_path, *overrides)
    assert line.startswith(
        f"config error: trainer.resume={step_dir(run_copy)} cannot be loaded into this run (RuntimeError: "
    ), line
    assert "size mismatch" in line
