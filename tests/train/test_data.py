"""Data: byte tokens, hash split, packing, deterministic sharded order and exact position restore."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moetrain.config import ConfigError, DataConfig
from moetrain.train.data import (
    EOS_ID,
    ByteTokenizer,
    DataPipeline,
    PackedSequences,
    ShardedOrder,
    TokenSplits,
    tokenize_splits,
)


@pytest.fixture(scope="module")
def stdlib_splits(tmp_path_factory):
    return tokenize_splits(DataConfig(stdlib_glob="[a-f]*.py"), tmp_path_factory.mktemp("cache"))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'π'\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < EOS_ID


def test_stdlib_corpus_is_read_and_split_by_document(stdlib_splits):
    assert len(stdlib_splits.train) > 100_000 and len(stdlib_splits.val) > 1_000
    assert (stdlib_splits.train == EOS_ID).sum() > (stdlib_splits.val == EOS_ID).sum() > 0


def test_local_jsonl_and_txt_sources(tmp_path):
    docs = [f"document number {i} " * (i + 3) for i in range(60)]
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    splits = tokenize_splits(
        DataConfig(path=str(tmp_path / "j"), text_field="body", val_fraction=0.2), tmp_path / "cache"
    )
    total = sum(len(d.encode()) + 1 for d in docs)
    assert len(splits.train) + len(splits.val) == total
    (tmp_path / "t").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "t" / f"{i:03d}.txt").write_text(d)
    txt = tokenize_splits(DataConfig(path=str(tmp_path / "t"), val_fraction=0.2), tmp_path / "cache")
    # the split depends on document text only, not on file format or order
    assert np.array_equal(np.sort(txt.val), np.sort(splits.val))
    with pytest.raises(ConfigError, match="data.text_field=nope"):
        tokenize_splits(DataConfig(path=str(tmp_path / "j"), text_field="nope"), tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.path="):
        tokenize_splits(DataConfig(path=str(tmp_path / "missing")), tmp_path / "cache")


def test_packing_windows_overlap_by_one_token():
    seqs = PackedSequences(np.arange(21, dtype=np.uint16), seq_len=5)
    assert len(seqs) == 4
    x, y = seqs.batch([0, 3])
    assert x.tolist() == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [16, 17, 18, 19, 20]]


def test_order_is_a_permutation_per_epoch_and_deterministic():
    a, b = ShardedOrder(50, seed=7), ShardedOrder(50, seed=7)
    first = [a.index(p) for p in range(50)]
    assert sorted(first) == list(range(50))
    assert first == [b.index(p) for p in range(50)]
    assert first != [a.index(p) for p in range(50, 100)]  # a new epoch reshuffles
    assert first != [ShardedOrder(50, seed=8).index(p) for p in range(50)]


def test_ranks_read_disjoint_shards_that_cover_the_global_batch():
    order = ShardedOrder(1000, seed=1)
    shards = [order.rank_indices(position=96, micro_batch=8, dp_rank=r) for r in range(4)]
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 32
    assert flat == [order.index(p) for p in range(96, 128)]


def test_position_restore_gives_the_same_next_batches():
    rng = np.random.default_rng(0)
    splits = TokenSplits(rng.integers(0, 256, 5000).astype(np.uint16), rng.integers(0, 256, 900).astype(np.uint16))
    a = DataPipeline(splits, seq_len=16, micro_batch=4, dp_rank=1, dp_size=2, seed=3)
    for _ in range(7):
        a.next_train_batch()
    state = a.state_dict()
    expected = [a.next_train_batch() for _ in range(5)]
    b = DataPipeline(splits, seq_len=16, micro_batch=4, dp_rank=1, dp_size=2, seed=3)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, (b.next_train_batch() for _ in range(5))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    # validation batches are fixed
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a.val_batches(3), b.val_batches(3)))


def test_unigram_baseline_by_hand():
    splits = TokenSplits(np.array([0, 0, 0, 1], dtype=np.uint16), np.array([0, 1], dtype=np.uint16))
    # add-one smoothing over vocab 3: p0 = 4/7, p1 = 2/7
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert math.isclose(splits.unigram_baseline(3), expected, rel_tol=1e-9)


def test_without_the_datasets_package_text_sources_split_identically(stdlib_splits, tmp_path, monkeypatch):
    """A machine without ``datasets`` (the GPU check's) reads the stdlib corpus and .txt files itself: the same
    token streams as datasets' text reader; a source only datasets reads is refused in one line."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a)
    )
    plain = tokenize_splits(DataConfig(stdlib_glob="[a-f]*.py"), tmp_path / "cache")
    assert np.array_equal(plain.train, stdlib_splits.train) and np.array_equal(plain.val, stdlib_splits.val)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"^data.path=.*a.jsonl is read through the datasets package"):
        tokenize_splits(DataConfig(path=str(tmp_path / "a.jsonl")), tmp_path / "cache")
