"""Packing: windows equal a naive concatenation, ids are global window numbers, fingerprints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from common.packing import PIECE_CHARS, PackStats, document_pieces, pack_documents
from common.tokenizer import tokenizer_fingerprint
from tests.helpers import (
    sample_texts,
    sample_texts_unicode,
    train_sentencepiece_tokenizer,
    train_tiny_tokenizer,
)


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


# ---- long documents: tokenized in pieces, tokenizing stops at the budget ---------------------------
def _long_documents() -> list[str]:
    """Documents of thousands of characters with single spaces, whitespace runs, newlines and non-ASCII."""
    words = " ".join(sample_texts_unicode(80, seed=11))
    return [words, "  ".join(sample_texts(30, seed=12)), "\n\n".join(sample_texts(30, seed=13)) + "  \n ", "x"]


def test_pieces_cover_the_text_and_cut_before_spaces() -> None:
    for text in _long_documents() + ["", "a" * 1000, "a b" * 10]:
        pieces = list(document_pieces(text, 100))
        assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
        assert (len(pieces) == 1) == (len(text) <= 100)
        for p in pieces[1:]:
            if " " in text:  # every document here has a space within any 100 characters
                assert p[0].isspace()
    assert list(document_pieces("a" * 250, 100)) == ["a" * 100, "a" * 100, "a" * 50]  # no whitespace: anywhere


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    d = train_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"), sample_texts_unicode(100, seed=5))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("piece_chars", [50, 200, 1000])
def test_ids_of_long_documents_equal_whole_document_tokenization(tok, sp_tok, kind: str, piece_chars: int) -> None:
    """Cut at a space between words, the pieces give the whole document's ids for both kinds of tokenizer
    the tests build; documents below the piece size are one piece, tokenized as before."""
    t = tok if kind == "byte-level" else sp_tok
    texts = _long_documents()
    stats = PackStats()
    got = np.concatenate([b.input_ids for b in pack_documents(texts, t, seq_len=16, piece_chars=piece_chars,
                                                              stats=stats)])
    want, _ = _naive(texts, t, 16)
    np.testing.assert_array_equal(got, want)
    assert stats.documents == len(texts)


def test_a_cut_inside_a_word_keeps_the_text(tok) -> None:
    """Without whitespace a piece ends anywhere; the ids next to such a cut may differ from the whole
    document's, but they still decode to the same text (byte-level)."""
    text = "".join(sample_texts(40, seed=14)).replace(" ", "")
    ids = np.concatenate([b.input_ids for b in pack_documents([text], tok, seq_len=2, piece_chars=97)]).ravel()
    decoded = tok.decode([i for i in ids.tolist() if i != tok.eos_token_id])
    assert text.startswith(decoded) and len(decoded) >= len(text) - 20  # the last window may drop one token


class _CountingTokenizer:
    """A tokenizer that counts the characters it is given."""

    def __init__(self, tok) -> None:
        self.tok, self.chars, self.eos_token_id = tok, 0, tok.eos_token_id

    def __call__(self, texts, **kwargs):
        self.chars += sum(len(t) for t in texts)
        return self.tok(texts, **kwargs)


def test_tokenizing_stops_at_the_budget(tok) -> None:
    """A 1 MB document with max_tokens=500: about one piece is tokenized, not the whole document."""
    text = " ".join(sample_texts(4000, seed=15))
    assert len(text) > 10 * PIECE_CHARS
    counting = _CountingTokenizer(tok)
    stats = PackStats()
    got = np.concatenate([b.input_ids for b in pack_documents([text, "never read"], counting, seq_len=16,
                                                              max_tokens=500, stats=stats)])
    assert counting.chars <= PIECE_CHARS and stats.truncated and stats.tokens == 500 and stats.documents == 1
    want, _ = _naive([text[:PIECE_CHARS]], tok, 16, max_tokens=500)
    np.testing.assert_array_equal(got, want)


_HUGE_DOCUMENT_CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from transformers import PreTrainedTokenizerFast
from common.corpus import CorpusConfig, iter_documents
from common.packing import pack_documents, PackStats
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
stats = PackStats()
windows = sum(len(b) for b in pack_documents(iter_documents(CorpusConfig(dataset=sys.argv[3])), tok, seq_len=128,
                                              max_tokens=4096, stats=stats))
print(windows, stats.tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_50_mb_one_line_document_stays_under_1_gb(tok, tmp_path: Path) -> None:
    """One 50 MB single-line jsonl document, --max-tokens 4096: read by the corpus reader and packed as
    precompute packs it, in a child capped at 2 GiB of address space whose peak RSS must stay under 1 GiB
    (tokenizing all of it took 4 GB and 12 s)."""
    import json
    import resource
    import subprocess
    import sys

    block = " ".join(sample_texts(400, seed=16)) + " "
    text = (block * (50_000_000 // len(block) + 1))[:50_000_000]
    corpus = tmp_path / "one-line.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    del text, block
    tok.save_pretrained(tmp_path / "tok")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _HUGE_DOCUMENT_CHILD, str(root), str(tmp_path / "tok"), str(corpus)],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr[-2000:]
    windows, tokens, peak_kib = map(int, proc.stdout.split())
    assert (windows, tokens) == (32, 4096)
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib / 1024:.0f} MiB"
