"""Packing: windows equal a naive concatenation, ids are global window numbers, fingerprints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from common.packing import PackStats, pack_documents
from common.tokenizer import tokenizer_fingerprint
from tests.helpers import sample_texts, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    d = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), sample_texts(100, seed=5), vocab_size=400)
    return AutoTokenizer.from_pretrained(str(d))


def _naive(texts: list[str], tok, seq_len: int, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // seq_len
    return np.array(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len), len(stream) - n * seq_len


@pytest.mark.parametrize("docs_per_batch", [1, 7, 1000])
def test_windows_equal_naive_concatenation(tok, docs_per_batch: int) -> None:
    texts = sample_texts(60, seed=6) + [""]  # an empty document still contributes its EOS
    stats = PackStats()
    batches = list(pack_documents(texts, tok, seq_len=24, docs_per_batch=docs_per_batch, stats=stats))
    ids = np.concatenate([b.input_ids for b in batches])
    seq = np.concatenate([b.seq_ids for b in batches])
    want, dropped = _naive(texts, tok, 24)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(seq, np.arange(len(want)))
    assert ids.dtype == np.int32 and seq.dtype == np.int64
    assert stats.windows == len(want) and stats.dropped_tokens == dropped and stats.documents == len(texts)
    assert stats.tokens == stats.windows * 24 + dropped


def test_max_tokens_truncates_the_stream(tok) -> None:
    texts = sample_texts(60, seed=7)
    stats = PackStats()
    ids = np.concatenate([b.input_ids for b in pack_documents(texts, tok, seq_len=16, max_tokens=250,
                                                               docs_per_batch=4, stats=stats)])
    want, dropped = _naive(texts, tok, 16, max_tokens=250)
    np.testing.assert_array_equal(ids, want)
    assert stats.truncated and stats.tokens == 250 and stats.dropped_tokens == dropped == 250 % 16


def test_no_eos_is_refused(tok) -> None:
    class NoEos:
        eos_token_id = None

    with pytest.raises(ConfigError, match="EOS"):
        list(pack_documents(["a"], NoEos(), seq_len=4))


def test_tokenizer_fingerprint_depends_on_vocab(tok, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(tok)
    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tmp_path / "copy"))) == fp
    other = AutoTokenizer.from_pretrained(str(train_tiny_tokenizer(tmp_path / "o", sample_texts(100, seed=5), 300)))
    assert tokenizer_fingerprint(other) != fp
