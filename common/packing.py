"""Tokenize documents, join them with EOS, cut the stream into fixed windows with global sequence ids.

The packed stream is `doc_0 EOS doc_1 EOS doc_2 EOS ...` (no BOS, `add_special_tokens=False`), truncated
at `max_tokens` if given, cut into windows of `seq_len` tokens; window w has global sequence id w. The
final partial window is dropped (its size is reported in `PackStats.dropped_tokens`). Ids therefore depend
only on the corpus, the tokenizer and seq_len: every teacher and every node sees the same sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from common.errors import ConfigError


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
    """Documents tokenized."""
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


def pack_documents(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    docs_per_batch: int = 1024,
    stats: PackStats | None = None,
) -> Iterator[PackedBatch]:
    """Yield consecutive windows (seq ids 0, 1, 2, ... across the yielded batches).

    `tokenizer` is a transformers fast tokenizer; documents are encoded `docs_per_batch` at a time (the
    Rust tokenizer encodes a batch on all cores). Pass `stats` to receive the counts.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    stats = stats if stats is not None else PackStats()
    eos = eos_token_id(tokenizer)
    carry = np.zeros(0, dtype=np.int32)  # tokens not yet in a full window
    next_id = 0
    it = iter(docs)
    while True:
        texts = list(islice(it, docs_per_batch))
        if not texts:
            break
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        flat[ends - 1] = eos
        body = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(lengths.sum()) - len(encoded))
        mask = np.ones(flat.shape[0], dtype=bool)
        mask[ends - 1] = False
        flat[mask] = body
        stats.documents += len(texts)
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
