"""Tokenize documents, join them with EOS, cut the stream into fixed windows with global sequence ids.

The packed stream is `doc_0 EOS doc_1 EOS doc_2 EOS ...` (no BOS, `add_special_tokens=False`), truncated
at `max_tokens` if given, cut into windows of `seq_len` tokens; window w has global sequence id w. The
final partial window is dropped (its size is reported in `PackStats.dropped_tokens`). Ids therefore depend
only on the corpus, the tokenizer and seq_len: every teacher and every node sees the same sequences.

Memory is bounded whatever the documents' length. A document longer than `PIECE_CHARS` characters is
tokenized as consecutive pieces of at most that many characters (`document_pieces`), a tokenizer call
takes at most about `BATCH_CHARS` characters (and, under `max_tokens`, about what the remaining budget
needs), and tokenizing stops once `max_tokens` is reached: a 50 MB one-line document no longer costs the
tokenizer's ~100-200 bytes per character for all of it (4 GB for 4,096 tokens).

How pieces affect tokens: a document of at most `PIECE_CHARS` characters is one piece, tokenized exactly as
before. A longer one is cut just before a single space that lies between two non-space characters (else
before the first character of a whitespace run, else, in a run of `PIECE_CHARS` characters without
whitespace, anywhere). Tokenizers whose pre-tokenizer splits there anyway - byte-level BPE with the GPT-2,
Llama-3 or Qwen patterns (SmolLM2), SentencePiece-style `Metaspace` / `Split("▁")` - give the same ids as
for the whole document (tested). Others can give different ids next to each cut: tokenizers whose BPE runs
over the whole text without pre-tokenization and merges across spaces (Gemma), and those that add a prefix
to every text they see (a `Prepend("▁")` normalizer); a cut inside a word (no whitespace for `PIECE_CHARS`
characters) splits that word for every tokenizer. The ids depend only on the text and `PIECE_CHARS`, never
on batching or `max_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from common.errors import ConfigError

PIECE_CHARS = 1 << 16
"""Longest text handed to the tokenizer at once (65,536 characters, about 10-15 MB of tokenizer memory);
longer documents are cut into pieces of at most this many characters (see the module docstring)."""
BATCH_CHARS = 1 << 20
"""About the most characters one tokenizer call takes (a batch may exceed it by less than one piece)."""
_CHARS_PER_TOKEN = 16
"""Under `max_tokens`, a batch holds about this many characters per token still wanted: more than almost
any text needs (byte-level BPE averages ~4), and if it falls short the next batch continues."""
_CUTS = (re.compile(r"(?<=\S) (?=\S)"), re.compile(r"(?<=\S)\s"))
"""Where a piece may end, in order of preference: before a single space between two non-spaces, before
the first character of a whitespace run."""
_SCAN = 4096


@dataclass
class PackedBatch:
    """Consecutive packed windows."""

    seq_ids: np.ndarray
    """[B] int64 global sequence ids (window numbers)."""
    input_ids: np.ndarray
    """[B, L] int32 tokens."""
    loss_mask: np.ndarray | None = None
    """[B, L] uint8, conversational corpora only (common/chat.py): 1 where the next token belongs to an
    assistant reply; None for text."""
    doc_start: np.ndarray | None = None
    """[B, L] uint8, conversational corpora only: 1 where a conversation begins; None for text."""

    def __len__(self) -> int:
        return int(self.seq_ids.shape[0])

    def slice(self, start: int, stop: int) -> PackedBatch:
        return PackedBatch(seq_ids=self.seq_ids[start:stop], input_ids=self.input_ids[start:stop],
                           loss_mask=None if self.loss_mask is None else self.loss_mask[start:stop],
                           doc_start=None if self.doc_start is None else self.doc_start[start:stop])

    @staticmethod
    def concat(pieces: list[PackedBatch]) -> PackedBatch:
        """Concatenate batches along the sequence axis."""
        def cat(name: str) -> np.ndarray | None:
            first = getattr(pieces[0], name)
            return None if first is None else np.concatenate([getattr(p, name) for p in pieces])

        return PackedBatch(seq_ids=np.concatenate([p.seq_ids for p in pieces]),
                           input_ids=np.concatenate([p.input_ids for p in pieces]),
                           loss_mask=cat("loss_mask"), doc_start=cat("doc_start"))


@dataclass
class PackStats:
    """Counts about the packed stream, complete once the iterator is exhausted."""

    documents: int = 0
    """Documents whose tokenization began (under `max_tokens`, also the others of the last tokenizer call)."""
    tokens: int = 0
    """Tokens in the stream (documents plus one EOS each), after `max_tokens` truncation."""
    windows: int = 0
    """Full windows produced."""
    dropped_tokens: int = 0
    """Tokens of the final partial window, not stored."""
    truncated: bool = False
    """True when `max_tokens` cut the stream."""

    def to_dict(self) -> dict[str, Any]:
        return dict(documents=self.documents, tokens=self.tokens, windows=self.windows,
                    dropped_tokens=self.dropped_tokens, truncated_by_max_tokens=self.truncated)


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id; ConfigError when it has none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token, which packing needs to join documents")
    return int(eos)


class _Piece(NamedTuple):
    text: str
    first: bool
    """The document's first piece (counted in `PackStats.documents`)."""
    last: bool
    """The document's last piece (EOS follows it)."""


def _cut(text: str, start: int, stop: int) -> int:
    """End of the piece starting at `start`: the last preferred cut in (start, stop], else `stop`."""
    for pattern in _CUTS:
        hi = stop
        while hi > start:  # backwards in windows of _SCAN: a cut is almost always within the last few
            lo = max(start + 1, hi - _SCAN)
            found = [c for m in pattern.finditer(text, lo, hi + 2) if (c := m.start()) <= hi]
            if found:
                return found[-1]
            hi = lo - 1
    return stop


def document_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """`text` as consecutive pieces of at most `piece_chars` characters (one piece when it is not longer;
    an empty text is one empty piece). Their concatenation is `text`; cuts as the module docstring says."""
    if piece_chars < 1:
        raise ValueError(f"piece_chars must be positive, got {piece_chars}")
    start = 0
    while len(text) - start > piece_chars:
        cut = _cut(text, start, start + piece_chars)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _pieces(docs: Iterable[str], piece_chars: int) -> Iterator[_Piece]:
    for doc in docs:
        parts = document_pieces(doc, piece_chars)  # lazily: a huge document is sliced only as far as needed
        piece, first = next(parts), True
        for following in parts:
            yield _Piece(piece, first=first, last=False)
            piece, first = following, False
        yield _Piece(piece, first=first, last=True)


def _take(pieces: Iterator[_Piece], count: int, chars: int) -> list[_Piece]:
    """The next pieces: at least one, until `count` of them or at least `chars` characters."""
    out, total = [], 0
    for piece in pieces:
        out.append(piece)
        total += len(piece.text)
        if len(out) >= count or total >= chars:
            break
    return out


def pack_documents(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    docs_per_batch: int = 1024,
    stats: PackStats | None = None,
    piece_chars: int = PIECE_CHARS,
    batch_chars: int = BATCH_CHARS,
) -> Iterator[PackedBatch]:
    """Yield consecutive windows (seq ids 0, 1, 2, ... across the yielded batches).

    `tokenizer` is a transformers fast tokenizer; pieces of documents (`document_pieces`) are encoded up to
    `docs_per_batch` at a time and about `batch_chars` characters per call (the Rust tokenizer encodes a
    batch on all cores); documents are read from `docs` only as needed, and none once `max_tokens` is
    reached. Pass `stats` to receive the counts.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    stats = stats if stats is not None else PackStats()
    eos = eos_token_id(tokenizer)
    carry = np.zeros(0, dtype=np.int32)  # tokens not yet in a full window
    next_id = 0
    pieces = _pieces(docs, piece_chars)
    while True:
        chars = batch_chars
        if max_tokens is not None:  # near the budget, tokenize about what it still needs
            chars = min(chars, max(1, _CHARS_PER_TOKEN * (max_tokens - stats.tokens)))
        batch = _take(pieces, docs_per_batch, chars)
        if not batch:
            break
        encoded = tokenizer([p.text for p in batch], add_special_tokens=False,
                            return_attention_mask=False)["input_ids"]
        eos_after = np.fromiter((p.last for p in batch), dtype=bool, count=len(batch))
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)) + eos_after
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        eos_at = (np.cumsum(lengths) - 1)[eos_after]
        flat[eos_at] = eos
        body = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=flat.shape[0] - eos_at.shape[0])
        mask = np.ones(flat.shape[0], dtype=bool)
        mask[eos_at] = False
        flat[mask] = body
        stats.documents += sum(p.first for p in batch)
        if max_tokens is not None and stats.tokens + flat.shape[0] >= max_tokens:
            flat = flat[: max_tokens - stats.tokens]
            stats.truncated = True
        stats.tokens += flat.shape[0]
        stream = np.concatenate([carry, flat]) if carry.size else flat
        n = stream.shape[0] // seq_len
        if n:
            windows = stream[: n * seq_len].reshape(n, seq_len)
            yield PackedBatch(seq_ids=np.arange(next_id, next_id + n, dtype=np.int64),
                              input_ids=np.ascontiguousarray(windows))
            next_id += n
            stats.windows += n
        carry = stream[n * seq_len:].copy()
        if stats.truncated:
            break
    stats.dropped_tokens = int(carry.shape[0])
