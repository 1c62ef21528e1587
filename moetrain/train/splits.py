"""The tokenized corpus of a run, made once per node: rank 0 tokenizes and fills the datasets cache first."""

from __future__ import annotations

from pathlib import Path

from moetrain.config import ConfigError, DataConfig
from moetrain.runtime.distributed import broadcast_object
from moetrain.runtime.startup import announce_long_wait
from moetrain.train.data import default_cache_dir, tokenize_splits


def load_splits_rank0_first(cfg_data: DataConfig, is_main: bool):
    """Rank 0 tokenizes first and fills the datasets cache; the others then read it. A failure on rank 0 is
    broadcast, so the other ranks stop with the same message instead of waiting at a barrier."""
    cache = Path(cfg_data.cache_dir) if cfg_data.cache_dir else default_cache_dir()
    splits, error = None, None
    if is_main:
        try:
            splits = tokenize_splits(cfg_data, cache)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
    with announce_long_wait(f"rank 0 to tokenize the corpus into {cache}"):
        failure = broadcast_object(None if error is None else (type(error) is ConfigError, str(error)))
    if error is not None:
        raise error
    if failure is not None:
        is_config, message = failure
        raise (ConfigError if is_config else RuntimeError)(message)
    return splits if is_main else tokenize_splits(cfg_data, cache)
