"""The files a run will read, checked at the entry (:func:`moetrain.interop.entry.resolve_config`): each
problem is one :class:`ConfigError` line naming the key and the path, raised before a library opens the
file and fails inside itself with a traceback that names neither.

Cheap checks only (sizes, headers, the first record; the corpus is not tokenized, no tensor is read):

- ``data.path``: its files exist, have a known suffix, are not empty and begin as their type says (UTF-8
  text; a JSON record holding ``data.text_field``; a parquet footer with that column). ``data.stdlib_glob``
  matches files. A hub dataset (``data.hf_name``) has nothing local to check.
- ``trainer.resume=PATH``: the checkpoint is complete and readable (:func:`check_checkpoint`), its layout
  can be resumed with this backend and ``parallel.ep_size``, and its architecture is this run's.
  ``trainer.resume=auto`` means a folder of the run directory, which only the trainer knows: the same
  checks run there, when :meth:`CheckpointManager.load` is about to read it.
- ``model.init_from=hf:DIR``: ``config.json`` was read (and checked) by ``apply_hf_architecture``; here the
  weights' headers, unless an explicit checkpoint supplies the weights.
- ``data.tokenizer=hf:DIR``: loaded by ``check_tokenizer_vocab`` at the entry, whose loader names a missing
  folder or a corrupt file (:func:`moetrain.train.data.load_hf_tokenizer`).
- ``logging.baseline_run``: its ``summary.json`` is a JSON object (the report reads it at the end of the run).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import asdict
from pathlib import Path

from moetrain.config import ConfigError, DataConfig, TrainConfig, error_line
from moetrain.interop.hf import hf_path
from moetrain.interop.hf.common import safetensors_files
from moetrain.train.checkpoint import (
    CheckpointManager,
    check_checkpoint,
    check_same_structure,
    check_weights_portable,
    file_problem,
    resolve_resume,
    saved_config,
)
from moetrain.train.data import local_files, stdlib_files

SNIFF_BYTES = 1 << 16  # how much of a text file is decoded at the entry (the rest is read by the tokenizer)
MAX_RECORD_BYTES = 16 << 20  # the longest first JSON line read at the entry


def check_inputs(cfg: TrainConfig) -> None:
    """Every file the run will read (see the module docstring); raises ``ConfigError`` with one line."""
    check_data(cfg.data)
    check_resume(cfg)
    check_init_weights(cfg)
    check_baseline_run(cfg.logging.baseline_run)


# ---------------------------------------------------------------------------------------------- data
def check_data(d: DataConfig) -> None:
    if d.hf_name:
        return
    if not d.path:
        stdlib_files(d.stdlib_glob)
        return
    for name in local_files(d.path):  # exist, one known suffix
        check_data_file(Path(name), d)


def check_data_file(f: Path, d: DataConfig) -> None:
    """``f`` (a file of ``data.path``) is not empty and its beginning parses as its suffix says."""
    # "data.path=FILE ..." for a single file; "data.path=DIR: FILE ..." for one file of a folder or glob
    subject = f"data.path={d.path}" + ("" if str(f) == d.path else f": {f}")
    if f.stat().st_size == 0:
        raise ConfigError(f"{subject} is empty (0 bytes); allowed: files that hold documents")
    if f.suffix == ".txt":
        _check_text(f, subject, d.text_field)
    elif f.suffix == ".jsonl":
        _check_json_lines(f, subject, d.text_field)
    elif f.suffix == ".json":
        _check_json(f, subject)
    elif f.suffix == ".parquet":
        _check_parquet(f, subject, d.text_field)


def _missing_field(field: str, f: Path, columns: list[str]) -> ConfigError:
    return ConfigError(f"data.text_field={field} is not a column of {f}; allowed: {', '.join(map(str, columns))}")


def _check_text(f: Path, subject: str, field: str) -> None:
    if field != "text":  # datasets' text reader gives one column, named text
        raise _missing_field(field, f, ["text"])
    with open(f, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    try:  # incremental: a character cut at the end of the sample is not an error unless the file ends there
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{subject} is not UTF-8 text (byte {e.start}: {e.reason}); allowed: UTF-8 text") from e


def _check_json_lines(f: Path, subject: str, field: str) -> None:
    """The first non-blank line is a JSON object with ``field``."""
    with open(f, "rb") as fh:
        for number, line in enumerate(iter(lambda: fh.readline(MAX_RECORD_BYTES), b""), start=1):
            if not line.strip():
                continue
            if len(line) == MAX_RECORD_BYTES and not line.endswith(b"\n"):
                return  # a record too long to read here: datasets' reader (named when it fails) reads it
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise ConfigError(
                    f"{subject} line {number} is not JSON ({error_line(e)}); allowed: one JSON object per line"
                ) from e
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{subject} line {number} is a JSON {type(record).__name__}, not an object; "
                    "allowed: one JSON object per line"
                )
            if field not in record:
                raise _missing_field(field, f, list(record))
            return
    raise ConfigError(f"{subject} holds only blank lines; allowed: one JSON object per line")


def _check_json(f: Path, subject: str) -> None:
    """A .json file may be one large array (not parsed here): it must at least begin as JSON does."""
    with open(f, "rb") as fh:
        head = fh.read(SNIFF_BYTES).removeprefix(codecs.BOM_UTF8).lstrip()
    if head[:1] not in (b"{", b"["):
        found = repr(head[:20].decode("utf-8", errors="replace")) if head else "only whitespace"
        raise ConfigError(f"{subject} is not JSON (it begins with {found}); allowed: a JSON array or JSON lines")


def _check_parquet(f: Path, subject: str, field: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(f).names  # the footer only
    except Exception as e:  # noqa: BLE001 - whatever pyarrow raises on a damaged footer
        raise ConfigError(f"{subject} is not a readable parquet file ({error_line(e)}); allowed: parquet") from e
    if field not in names:
        raise _missing_field(field, f, names)


# ---------------------------------------------------------------------------------------------- checkpoints
def check_resume(cfg: TrainConfig) -> None:
    """``trainer.resume=PATH``: a complete, readable checkpoint this run can load (see the module docstring)."""
    if cfg.trainer.resume in ("none", "auto"):
        return
    found = resolve_resume(cfg.trainer.resume, Path())  # a path: never None, ConfigError when not a checkpoint
    assert found is not None
    folder = found[0] / found[1]
    check_checkpoint(folder)
    layout = CheckpointManager.saved_layout(folder)
    if layout:
        check_weights_portable(folder, layout, cfg.moe.backend, cfg.parallel.ep_size)
    saved = saved_config(folder)
    if saved:
        check_same_structure(folder, saved, asdict(cfg.model), asdict(cfg.moe))


# ---------------------------------------------------------------------------------------------- the rest
def check_init_weights(cfg: TrainConfig) -> None:
    """``model.init_from``'s weights, which the run loads unless it resumes an explicit checkpoint (with
    ``auto`` the checkpoint may not exist yet, so they are needed)."""
    if cfg.model.init_from and cfg.trainer.resume in ("none", "auto"):
        safetensors_files(hf_path(cfg.model.init_from))


def check_baseline_run(baseline_run: str | None) -> None:
    """``validate`` found the run's summary.json; here it must also parse (the report reads it at the end)."""
    if baseline_run is None:
        return
    problem = file_problem(Path(baseline_run) / "summary.json")
    if problem:
        raise ConfigError(
            f"logging.baseline_run={baseline_run} has a corrupt summary.json ({problem}); "
            "allowed: a finished run folder"
        )
