"""Conversational corpora: rows holding a list of `{role, content}` messages, rendered with a chat template.

    convs = iter_conversation_rows(path, start, stop, messages_field, stats)   # validated, one list per row
    r = render(tokenizer, messages, template)          # token ids + which tokens belong to assistant replies
    for batch in pack_conversations(convs, tokenizer, seq_len=L, template=t, stats=s): ...

A row is malformed when its messages are not a non-empty list of objects with a `role` among `ROLES` and a
string `content`; `CorpusError` then names the file and the row (one line, exit 2 at the CLI). Nothing is
dropped silently.

The loss mask is in positions, not tokens: position t is marked when the token at t + 1 belongs to an
assistant reply (its content and the end-of-turn token that closes it), since the prediction made at t is of
token t + 1. Two ways to find the assistant tokens, chosen per template:

- the template marks replies with `{% generation %}` blocks: transformers' `apply_chat_template(...,
  return_assistant_tokens_mask=True)`;
- otherwise from rendered character offsets: each message's content is located in the rendered text, in
  order; an assistant reply's span is its content plus the end-of-turn text that directly follows it (the
  tokenizer's EOS token, e.g. SmolLM2's `<|im_end|>`), and a token is an assistant token when its
  `offset_mapping` range overlaps such a span.

Packing (`pack_conversations`) never splits a conversation: whole conversations are placed in a window
while they fit; the rest of the window is padding (mask 0). A conversation longer than the window is refused
and counted (`ChatPackStats.too_long`), or cut to the window when `truncate` is set (counted as
`truncated_conversations`). `PackedBatch.doc_start` records where each conversation begins.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, CorpusError
from common.packing import PackedBatch, PackStats, eos_token_id

ROLES = ("system", "user", "assistant")
"""Roles a message may have."""
MASK_METHODS = ("generation", "offsets")
"""How assistant tokens are found: the template's `{% generation %}` blocks, or rendered character offsets."""
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

Message = dict[str, str]


def check_conversation(value: Any, where: str) -> list[Message]:
    """The row's messages as a list of `{role, content}` dicts, or CorpusError naming `where` (file and row)."""
    if not isinstance(value, list):
        what = "missing" if value is None else f"a {type(value).__name__}, not a list of messages"
        raise CorpusError(f"{where}: messages are {what}")
    if not value:
        raise CorpusError(f"{where}: empty conversation (no messages)")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise CorpusError(f"{where}: message {i} is a {type(msg).__name__}, not an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role is None:
            raise CorpusError(f"{where}: message {i} has no role")
        if role not in ROLES:
            raise CorpusError(f"{where}: message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            what = "no content" if content is None else f"content of type {type(content).__name__}, not a string"
            raise CorpusError(f"{where}: message {i} ({role}) has {what}")
        out.append({"role": role, "content": content})
    return out


# ---- reading ---------------------------------------------------------------------------------------------
def iter_jsonl_conversations(path: str, lines: Iterable[tuple[int, bytes]], messages_field: str,
                             where: str = "") -> Iterator[list[Message]]:
    """Validated conversations of JSON lines (`lines`: (offset, block of whole lines) pairs)."""
    row = 0
    for _, block in lines:
        for line in block.split(b"\n"):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}: row {row}{where}: not UTF-8 text ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: row {row}{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}: row {row}{where}: not a JSON object")
            yield check_conversation(obj.get(messages_field), f"{path}: row {row}{where}: field {messages_field!r}")
            row += 1


def gzip_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """One (0, whole decompressed file) block of a `.jsonl.gz` file."""
    try:
        with gzip.open(path, "rb") as f:
            yield 0, f.read()
    except (OSError, EOFError) as e:
        raise CorpusError(f"{path}: cannot decompress ({e}); damaged or truncated file?") from None


def iter_parquet_conversations(path: str, messages_field: str) -> Iterator[list[Message]]:
    """Validated conversations of a Parquet file's `messages_field` column (a list of structs)."""
    from common.corpus_files import open_parquet_field

    pf = open_parquet_field(path, messages_field, "--messages-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[messages_field]):
        for value in batch.column(0).to_pylist():
            yield check_conversation(value, f"{path}: row {row}: field {messages_field!r}")
            row += 1


def iter_hub_conversations(rows: Iterable[dict[str, Any]], messages_field: str, what: str) -> Iterator[list[Message]]:
    """Validated conversations of a streamed hub dataset's rows (`what` names dataset and partition)."""
    for row, example in enumerate(rows):
        if messages_field not in example:
            raise CorpusError(f"{what}: row {row}: no field {messages_field!r} (fields: {', '.join(example)}); "
                              "use --messages-field")
        yield check_conversation(example[messages_field], f"{what}: row {row}: field {messages_field!r}")


# ---- templates and masks ---------------------------------------------------------------------------------
def read_chat_template(path: str) -> str:
    """The Jinja template in file `path` (ConfigError, one line, when it cannot be read)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {path}: cannot read ({e})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty")
    return text


def resolve_template(tokenizer: Any, template_file: str | None) -> str:
    """The template to render with: the file's, else the tokenizer's own (ConfigError when it has none)."""
    if template_file is not None:
        return read_chat_template(template_file)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise ConfigError("the tokenizer has no chat template; give one with --chat-template FILE")
    return template


def template_sha256(template: str) -> str:
    """sha256 hex of a template's text (recorded in the manifest: joined caches must use the same)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def mask_method(template: str) -> str:
    """`generation` when the template marks assistant replies with `{% generation %}` blocks, else `offsets`."""
    return "generation" if _GENERATION.search(template) else "offsets"


@dataclass
class Rendered:
    """One conversation rendered and tokenized."""

    input_ids: np.ndarray
    """[n] int32 tokens of the rendered conversation (no special tokens added beyond the template's)."""
    assistant: np.ndarray
    """[n] bool: the token belongs to an assistant reply (content and its end-of-turn token)."""

    @property
    def loss_mask(self) -> np.ndarray:
        """[n] bool per position: the NEXT token is an assistant token (False at the last position)."""
        mask = np.zeros_like(self.assistant)
        mask[:-1] = self.assistant[1:]
        return mask


def render(tokenizer: Any, messages: list[Message], template: str, *, method: str | None = None) -> Rendered:
    """Render `messages` with `template` and mark the assistant tokens (see the module docstring).

    method: `generation` or `offsets`; None picks `generation` when the template has `{% generation %}`
    blocks, else `offsets`.
    """
    method = method or mask_method(template)
    if method == "generation":
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = np.asarray(out["input_ids"], dtype=np.int32)
        return Rendered(input_ids=ids, assistant=np.asarray(out["assistant_masks"], dtype=bool).reshape(ids.shape))
    if method != "offsets":
        raise ValueError(f"unknown mask method {method!r}; expected one of {MASK_METHODS}")
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    spans = assistant_spans(text, messages, end_of_turn=getattr(tokenizer, "eos_token", None))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    assistant = np.zeros(ids.shape[0], dtype=bool)
    for lo, hi in spans:
        assistant |= (offsets[:, 0] < hi) & (offsets[:, 1] > lo) & (offsets[:, 1] > offsets[:, 0])
    return Rendered(input_ids=ids, assistant=assistant)


def assistant_spans(text: str, messages: list[Message], *, end_of_turn: str | None) -> list[tuple[int, int]]:
    """[start, stop) character spans of the assistant replies in the rendered `text`: each message's content
    is found in order after the previous one; a reply's span runs over its content and over `end_of_turn`
    when that directly follows it (whitespace the template strips from the content is tolerated)."""
    spans, cursor = [], 0
    for i, msg in enumerate(messages):
        content = msg["content"]
        found = text.find(content, cursor) if content else cursor
        if found < 0 and content.strip():
            content = content.strip()
            found = text.find(content, cursor)
        if found < 0:
            raise ConfigError(f"message {i} ({msg['role']}) does not appear verbatim in the rendered conversation; "
                              "this template rewrites message content, so give one with {% generation %} blocks "
                              "(--chat-template FILE)")
        stop = found + len(content)
        if msg["role"] == "assistant":
            end = stop
            if end_of_turn and text.startswith(end_of_turn, stop):
                end = stop + len(end_of_turn)
            spans.append((found, end))
        cursor = stop
    return spans


# ---- packing ---------------------------------------------------------------------------------------------
@dataclass
class ChatPackStats(PackStats):
    """PackStats of a conversational corpus plus what packing whole conversations did."""

    conversations_packed: int = 0
    """Conversations placed in windows."""
    too_long: int = 0
    """Conversations longer than seq_len that were refused (not packed)."""
    truncated_conversations: int = 0
    """Conversations longer than seq_len that were cut to seq_len (`truncate`)."""
    padding_tokens: int = 0
    """Padding after the last whole conversation of each window (mask 0)."""
    masked_positions: int = 0
    """Positions whose next token is an assistant token (the positions the loss uses)."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "conversations_packed": self.conversations_packed, "too_long": self.too_long,
                "truncated_conversations": self.truncated_conversations, "padding_tokens": self.padding_tokens,
                "masked_positions": self.masked_positions}

    def add(self, other: ChatPackStats) -> None:
        """Add another partition's counts to these."""
        for name in ("documents", "tokens", "windows", "dropped_tokens", "conversations_packed", "too_long",
                     "truncated_conversations", "padding_tokens", "masked_positions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.truncated = self.truncated or other.truncated


def pad_token_id(tokenizer: Any) -> int:
    """The id padding a window after its last conversation: the pad token, else EOS."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_token_id(tokenizer)


def pack_conversations(convs: Iterable[list[Message]], tokenizer: Any, *, seq_len: int, template: str,
                       truncate: bool = False, max_tokens: int | None = None,
                       stats: ChatPackStats | None = None, windows_per_batch: int = 64) -> Iterator[PackedBatch]:
    """Yield windows of whole conversations (seq ids 0, 1, ... across the batches) with `loss_mask` and
    `doc_start`. At most `max_tokens // seq_len` windows; the last, partly filled window is kept (padded)."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    stats = stats if stats is not None else ChatPackStats()
    method, pad = mask_method(template), pad_token_id(tokenizer)
    max_windows = None if max_tokens is None else max_tokens // seq_len
    if max_windows == 0:
        return
    ids, mask, start = (np.full((windows_per_batch, seq_len), pad, np.int32),
                        np.zeros((windows_per_batch, seq_len), np.uint8), np.zeros((windows_per_batch, seq_len), np.uint8))
    row, fill, next_id = 0, 0, 0

    def flush(rows: int) -> PackedBatch:
        nonlocal next_id
        batch = PackedBatch(seq_ids=np.arange(next_id, next_id + rows, dtype=np.int64), input_ids=ids[:rows].copy(),
                            loss_mask=mask[:rows].copy(), doc_start=start[:rows].copy())
        next_id += rows
        stats.windows += rows
        ids.fill(pad)
        mask.fill(0)
        start.fill(0)
        return batch

    for messages in convs:
        stats.documents += 1
        r = render(tokenizer, messages, template, method=method)
        n, conv_mask = r.input_ids.shape[0], r.loss_mask
        if n > seq_len:
            if not truncate:
                stats.too_long += 1
                continue
            stats.truncated_conversations += 1
            n, conv_mask = seq_len, conv_mask[:seq_len].copy()
            conv_mask[-1] = False  # its next token is cut off
        if n == 0:
            continue
        if fill + n > seq_len:  # close this window (padding after its last conversation)
            stats.padding_tokens += seq_len - fill
            row, fill = row + 1, 0
            if max_windows is not None and next_id + row >= max_windows:
                stats.truncated = True
                break
            if row == windows_per_batch:
                yield flush(row)
                row = 0
        ids[row, fill:fill + n] = r.input_ids[:n]
        mask[row, fill:fill + n] = conv_mask
        start[row, fill] = 1
        fill += n
        stats.tokens += n
        stats.conversations_packed += 1
        stats.masked_positions += int(conv_mask.sum())
    else:
        if fill:
            stats.padding_tokens += seq_len - fill
            row += 1
    if row:
        yield flush(row)
