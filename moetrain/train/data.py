"""Data: documents -> tokens -> packed sequences -> a deterministic, resumable, rank-sharded order.

Tokens: UTF-8 bytes (``data.tokenizer=byte``) or a local Hugging Face tokenizer directory (``hf:PATH``; ``hf``
and ``auto`` mean the directory of ``model.init_from`` and are resolved to ``hf:PATH`` when the config is
built, see :func:`resolve_tokenizer`).

Sources (exactly one): the running Python's standard library (the embedded default corpus, found with
``sysconfig``), the user's local files (``data.path``), or a hub dataset (``data.hf_name``). All go through
Hugging Face ``datasets`` where it is installed; without it (a bare GPU machine) the standard library and .txt
files are read directly, one document a file, into the same token streams. Documents are split into
train/validation by a hash of their text, so the split does not depend on file order or on the number of ranks.

Packing: each split's documents are concatenated (each ends with the end-of-text id) and cut into windows
of ``seq_len + 1`` tokens with stride ``seq_len``; a window gives inputs ``w[:-1]`` and labels ``w[1:]``.

Order: the *global position* p counts training sequences consumed by all ranks together. Sequence p lives
in epoch ``p // N`` at slot ``perm_epoch[p % N]`` of a permutation seeded by ``(seed, epoch)``. A micro-batch
on data-parallel rank r starting at p reads positions ``p + r*mb ... p + (r+1)*mb - 1``. Saving p is enough
to resume exactly, for any rank count.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moetrain.config import ConfigError, DataConfig, error_line

EOS_ID = 256


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is end-of-text. Needs no download and no training."""

    vocab_size = 257
    eos_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_hf_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in HF_TOKENIZER_FILES)


def resolve_tokenizer(tokenizer: str, init_from: str | None) -> str:
    """``data.tokenizer`` as the data pipeline uses it: ``byte`` or ``hf:DIR``.

    ``auto``: the tokenizer of ``model.init_from``'s directory when it has one (tokenizer.json or
    tokenizer_config.json), else bytes. ``hf``: that directory's tokenizer, which must exist.
    """
    if tokenizer not in ("auto", "hf"):
        return tokenizer
    source = Path(init_from[3:]).expanduser() if init_from and init_from.startswith("hf:") else None
    if source is not None and has_hf_tokenizer(source):
        return f"hf:{source}"
    if tokenizer == "hf" and source is None:
        raise ConfigError(
            "data.tokenizer=hf needs model.init_from=hf:PATH (whose tokenizer it means); allowed: byte, hf:PATH"
        )
    if tokenizer == "hf":
        raise ConfigError(
            f"data.tokenizer=hf finds no {' or '.join(HF_TOKENIZER_FILES)} in model.init_from={init_from}; "
            "allowed: byte, hf:PATH"
        )
    return "byte"


TOKENIZER_ALLOWED = "allowed: byte, hf:PATH (a local folder with tokenizer.json or tokenizer_config.json)"
# the JSON files a transformers tokenizer folder may hold: the one that does not parse is named when loading fails
TOKENIZER_JSON = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)


def check_tokenizer_folder(tokenizer: str) -> Path:
    """The folder of ``hf:DIR``; ConfigError when it is missing, not a folder, or holds no tokenizer file."""
    path = Path(tokenizer[3:]).expanduser()
    if not path.exists():
        raise ConfigError(f"data.tokenizer={tokenizer} does not exist; {TOKENIZER_ALLOWED}")
    if not path.is_dir():
        raise ConfigError(f"data.tokenizer={tokenizer} is a file, not a folder; {TOKENIZER_ALLOWED}")
    if not has_hf_tokenizer(path):
        raise ConfigError(f"data.tokenizer={tokenizer} has no {' or '.join(HF_TOKENIZER_FILES)}; {TOKENIZER_ALLOWED}")
    return path


def load_hf_tokenizer(tokenizer: str):
    """The transformers tokenizer of ``hf:DIR`` (local files only, nothing is downloaded). Whatever transformers
    or tokenizers raise on a damaged folder becomes one line naming the file (the JSON file that does not
    parse, when one does not) instead of a traceback from inside the library."""
    import json

    from transformers import AutoTokenizer

    path = check_tokenizer_folder(tokenizer)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the library to read the folder is the folder's
        for name in TOKENIZER_JSON:
            if (path / name).is_file():
                try:
                    json.loads((path / name).read_text(encoding="utf-8"))
                except (OSError, ValueError) as bad:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                    raise ConfigError(
                        f"data.tokenizer={tokenizer} has a corrupt {name} ({error_line(bad)}); {TOKENIZER_ALLOWED}"
                    ) from e
        raise ConfigError(
            f"data.tokenizer={tokenizer} cannot be loaded by transformers ({error_line(e)}); {TOKENIZER_ALLOWED}"
        ) from e


def eos_id_of(tok, tokenizer: str) -> int:
    """The id that ends every document when documents are packed."""
    if tok.eos_token_id is None:
        raise ConfigError(f"data.tokenizer={tokenizer} has no eos_token; documents are separated by it")
    return int(tok.eos_token_id)


def check_tokenizer_vocab(tokenizer: str, vocab_size: int) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    if not tokenizer.startswith("hf:"):
        return
    n = len(load_hf_tokenizer(tokenizer))
    if n > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than data.tokenizer={tokenizer}'s {n} ids; "
            "allowed: a tokenizer whose ids fit the model's embedding"
        )


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOETRAIN_CACHE", Path.home() / ".cache" / "moetrain"))


def stdlib_files(pattern: str) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ConfigError(f"data.stdlib_glob={pattern} matches no file under {root}")
    return files


# a local file's suffix -> the Hugging Face ``datasets`` builder that reads it
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUFFIXES_ALLOWED = f"allowed: {', '.join(BUILDERS)}"


def local_files(path: str) -> list[str]:
    """The files of ``data.path`` (a file, a folder searched recursively, or a glob), all of one known type.
    A folder keeps only the files of known suffixes; a file or a glob names the file whose suffix is not."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in BUILDERS and f.is_file())
    else:
        pattern = any(c in path for c in "*?[")
        files = sorted(f for f in glob.glob(path) if Path(f).is_file()) if pattern else ([path] if p.is_file() else [])
    if not files:
        where = "a folder without them" if p.is_dir() else "no such file" if not p.exists() else "not a file"
        raise ConfigError(
            f"data.path={path} matches no .txt/.jsonl/.json/.parquet file ({where}); "
            "allowed: such a file, a folder or a glob of them"
        )
    for f in files:
        suffix = Path(f).suffix
        if suffix not in BUILDERS:
            which = "" if f == path else f" (matched file {f})"
            raise ConfigError(
                f"data.path={path} has an unsupported suffix {suffix or '(none)'}{which}; {SUFFIXES_ALLOWED}"
            )
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1:
        raise ConfigError(f"data.path={path} mixes file types {sorted(suffixes)}; allowed: files of one type")
    return files


def source_key(cfg: DataConfig) -> str:
    """``key=value`` of the data source, for messages about what it holds."""
    if cfg.path:
        return f"data.path={cfg.path}"
    return f"data.hf_name={cfg.hf_name}" if cfg.hf_name else f"data.stdlib_glob={cfg.stdlib_glob}"


def load_documents(cfg: DataConfig, cache_dir: Path):
    """The source's documents as a ``datasets.Dataset`` with one column, ``text``."""
    import datasets

    # its bars say "Downloading data" even for local files, and redraw as one line each in a log
    datasets.disable_progress_bars()
    hf_cache = str(cache_dir / "hf")
    if cfg.hf_name:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split="train", cache_dir=hf_cache)
    else:
        files = local_files(cfg.path) if cfg.path else stdlib_files(cfg.stdlib_glob)
        builder = BUILDERS[Path(files[0]).suffix] if cfg.path else "text"
        by_document = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **by_document)
        except Exception as e:  # noqa: BLE001 - a file the library cannot parse: named here, not as its traceback
            raise ConfigError(
                f"{source_key(cfg)} cannot be read by datasets' {builder} reader ({error_line(e)}); "
                f"allowed: well-formed {', '.join(s for s, b in BUILDERS.items() if b == builder)} files"
            ) from e
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field={cfg.text_field} is not a column of the data; allowed: {', '.join(ds.column_names)}"
        )
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    return ds.select_columns(["text"])


def plain_documents(cfg: DataConfig) -> list[str] | None:
    """Without the ``datasets`` package (a bare GPU machine): the standard-library corpus or local .txt files read
    directly, one document a file, as datasets' text reader with ``sample_by=document`` reads them. None when
    ``datasets`` is installed (it reads and caches every source)."""
    if importlib.util.find_spec("datasets") is not None:
        return None
    if cfg.hf_name or (cfg.path and BUILDERS[Path(local_files(cfg.path)[0]).suffix] != "text"):
        raise ConfigError(
            f"{source_key(cfg)} is read through the datasets package, which is not installed; allowed without it: "
            "the standard-library corpus (data.stdlib_glob) or .txt files (data.path)"
        )
    files = local_files(cfg.path) if cfg.path else stdlib_files(cfg.stdlib_glob)
    return [Path(f).read_text(encoding="utf-8") for f in files]


def _is_validation(text: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


@dataclass
class TokenSplits:
    train: np.ndarray  # token stream (uint16, uint32 for large vocabularies)
    val: np.ndarray

    def unigram_baseline(self, vocab_size: int) -> float:
        """Cross-entropy (nats/token) of the validation stream under the train stream's unigram distribution
        (add-one smoothed): what a model that ignores context scores."""
        counts = np.bincount(self.train, minlength=vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-logp[self.val].mean())


def tokenize_splits(cfg: DataConfig, cache_dir: Path) -> TokenSplits:
    """Tokenize every document (through ``datasets.map``, cached) and concatenate each split. Token streams
    are uint16, or uint32 for a tokenizer with more than 65536 ids."""
    tokenizer = resolve_tokenizer(cfg.tokenizer, None)
    val_fraction = cfg.val_fraction
    if tokenizer.startswith("hf:"):
        tok = load_hf_tokenizer(tokenizer)
        eos_id, dtype = eos_id_of(tok, tokenizer), token_dtype(len(tok))

        def to_ids(texts: list[str]) -> list[np.ndarray]:
            encoded = tok(texts, add_special_tokens=False)["input_ids"]
            return [np.asarray(ids, dtype=dtype) for ids in encoded]
    else:
        eos_id, dtype = EOS_ID, np.uint16

        def to_ids(texts: list[str]) -> list[np.ndarray]:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def encode(batch: dict) -> dict:
        return {
            "ids": [np.append(a, dtype(eos_id)) for a in to_ids(batch["text"])],
            "is_val": [_is_validation(t, val_fraction) for t in batch["text"]],
        }

    texts = plain_documents(cfg)
    if texts is None:
        encoded = load_documents(cfg, cache_dir).map(encode, batched=True, remove_columns=["text"], desc="tokenizing")
        encoded = encoded.with_format("numpy")
    else:
        encoded = encode({"text": texts})
    is_val = np.asarray(encoded["is_val"], dtype=bool)
    ids = encoded["ids"]
    train = [np.asarray(ids[i], dtype=dtype) for i in np.flatnonzero(~is_val)]
    val = [np.asarray(ids[i], dtype=dtype) for i in np.flatnonzero(is_val)]
    if not train or not val:
        raise ConfigError(
            f"data.val_fraction={val_fraction} leaves an empty {'train' if not train else 'validation'} split over "
            f"the {len(is_val)} documents of {source_key(cfg)}; allowed: a value that leaves documents on both "
            "sides, or more documents"
        )
    return TokenSplits(np.concatenate(train), np.concatenate(val))


class PackedSequences:
    """Fixed windows of ``seq_len + 1`` tokens (stride ``seq_len``) over one token stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.num_sequences = (len(tokens) - 1) // seq_len
        if self.num_sequences < 1:
            raise ConfigError(f"model.seq_len={seq_len} is longer than the split ({len(tokens)} tokens)")

    def __len__(self) -> int:
        return self.num_sequences

    def window(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.stack([self.window(i) for i in indices])
        return w[:, :-1], w[:, 1:]


class ShardedOrder:
    """Maps a global position to sequence indices: shuffled per epoch, sharded across data-parallel ranks."""

    def __init__(self, num_sequences: int, seed: int, shuffle: bool = True) -> None:
        self.num_sequences = num_sequences
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_sequences, generator=g)
        return self._perms[epoch]

    def index(self, position: int) -> int:
        if not self.shuffle:
            return position % self.num_sequences
        epoch, slot = divmod(position, self.num_sequences)
        return int(self._perm(epoch)[slot])

    def rank_indices(self, position: int, micro_batch: int, dp_rank: int) -> list[int]:
        start = position + dp_rank * micro_batch
        return [self.index(p) for p in range(start, start + micro_batch)]


class DataPipeline:
    """Train and validation batches for one data-parallel rank; its state is the global train position."""

    def __init__(
        self, splits: TokenSplits, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        self.train = PackedSequences(splits.train, seq_len)
        self.val = PackedSequences(splits.val, seq_len)
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.train_order = ShardedOrder(len(self.train), seed)
        self.val_order = ShardedOrder(len(self.val), seed, shuffle=False)
        # a fixed sample of training sequences for expert profiling, independent of the training position
        self.profile_order = ShardedOrder(len(self.train), seed + 7919)
        self.position = 0

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch * self.dp_size

    @property
    def epoch(self) -> float:
        return self.position / len(self.train)

    def next_train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.train_order.rank_indices(self.position, self.micro_batch, self.dp_rank)
        self.position += self.global_micro_batch
        return self.train.batch(idx)

    def val_batches(self, num_batches: int):
        """The same ``num_batches`` validation micro-batches every call (wrapping if the split is small)."""
        for b in range(num_batches):
            idx = self.val_order.rank_indices(b * self.global_micro_batch, self.micro_batch, self.dp_rank)
            yield self.val.batch(idx)

    def profile_batches(self, num_tokens: int):
        """This rank's share of a fixed sample of ``num_tokens`` training tokens (whole micro-batches, rounded
        up): the same sequences whenever it is asked, so profiling never moves the training position."""
        tokens_per_batch = self.global_micro_batch * self.train.seq_len
        for b in range(-(-num_tokens // tokens_per_batch)):
            idx = self.profile_order.rank_indices(b * self.global_micro_batch, self.micro_batch, self.dp_rank)
            yield self.train.batch(idx)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
