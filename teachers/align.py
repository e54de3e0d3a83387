"""Teachers with another tokenizer: positions and vocabulary aligned to the student's tokenizer S.

Corpus packing uses S, so windows and sequence ids are those of any teacher with tokenizer S. For each
window the teacher T sees the window's exact text, tokenized by T:

- **Text.** Each S token has a byte string (`token_bytes`): byte-level BPE tokens map their characters back
  through the GPT-2 byte table, SentencePiece-style tokens turn `▁` into a space and `<0xNN>` into that
  byte. A window's text is the concatenation of its tokens' bytes, so S's token ends are exact *byte*
  offsets, even where a byte-level token ends inside a multi-byte character. S's EOS (the document
  separator packing inserts) is not text: it becomes T's EOS, and every document the teacher sees starts
  with the special tokens T adds by default (`prefix`, e.g. Gemma's `<bos>`); those added tokens cover no
  text. In a window of conversations (`specials_as_text`) S's other special tokens, the markers of S's chat
  template (e.g. `<|im_start|>`) and padding, are given to T as their literal text: the teacher reads the
  conversation rendered with S's template, not its own. Where S's EOS ends a turn (SmolLM2's `<|im_end|>`)
  it still becomes T's EOS, so T's end-of-text probability is the target for S's end of turn.
- **Positions.** T's character offsets (`return_offsets_mapping`) are turned into byte offsets. A teacher
  position u is a *boundary* at byte e when its token is the last teacher token ending at e (so of several
  byte-fallback tokens that share one character's offsets only the last counts, and a zero-width `<bos>`
  after an EOS takes over the EOS's end). Student position t, whose token ends at byte c_t, is aligned to
  the boundary at c_t, if there is one; otherwise it has no target (mask 0). Ends, not starts: byte-level
  and SentencePiece tokenizers disagree about whether a leading space belongs to a token.
- **Observed token.** For t < L-1, when both c_t and c_{t+1} are boundaries (u0 and u1), the teacher's exact
  log-probability of the observed next S token is `sum_{u0 <= j < u1} log p_j(tok_{j+1})`, skipping the
  zero-width tokens T adds itself (a `<bos>` after an EOS, whose probability is not a statement about
  the text). Elsewhere (and at t = L-1, whose next token lies outside the window) it is unavailable (NaN).
- **Vocabulary.** Teacher token v maps to the first S token of its text (`build_vocab_map`), computed once
  with S. Kinds: `whole` (S encodes the text as exactly that one token), `first_subtoken` (S needs several
  tokens, the first is used), `byte_fallback` (a `<0xNN>` token, or one whose bytes are not complete UTF-8:
  mapped to S's token for that first byte when S has one), `special` (T's EOS -> S's EOS), `unmappable`
  (other special/control tokens, empty text, or nothing in S to map to). Unmappable tokens' probability is
  dropped and the projected distribution renormalised over the mapped mass (the dropped mass is recorded).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from common.errors import ConfigError

MAP_KINDS = ("whole", "first_subtoken", "byte_fallback", "special", "unmappable")
KIND_CODES = {name: i for i, name in enumerate(MAP_KINDS)}


class AlignmentError(ConfigError):
    """The two tokenizers cannot be aligned (user input: one line, exit 2)."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE token characters -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """Types of the fast tokenizer's decoder(s), e.g. {'ByteLevel'} or {'Replace', 'ByteFallback', 'Fuse'}."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds: set[str] = set()

    def walk(d: dict) -> None:
        kinds.add(d.get("type", ""))
        for sub in d.get("decoders", []) or []:
            walk(sub)

    walk(spec)
    return kinds


@dataclass
class TokenTable:
    """Byte strings of every id of a fast tokenizer."""

    pieces: list[bytes]
    """[V] the bytes each id stands for (special tokens: their content, see `special`)."""
    special: np.ndarray
    """[V] bool: special (control) tokens, which stand for no text."""
    byte_fallback: np.ndarray
    """[V] bool: `<0xNN>` byte-fallback tokens."""


def token_table(tokenizer: Any) -> TokenTable:
    """The byte string of every token of a transformers fast tokenizer (see the module docstring).

    Raises AlignmentError for decoders this module does not know (it would guess the text otherwise).
    """
    kinds = _decoder_kinds(tokenizer)
    size = len(tokenizer)
    id_to_token = tokenizer.convert_ids_to_tokens(list(range(size)))
    special_ids = set(tokenizer.all_special_ids)
    for tid, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            special_ids.add(int(tid))
    pieces: list[bytes] = []
    special = np.zeros(size, dtype=bool)
    fallback = np.zeros(size, dtype=bool)
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        for i, tok in enumerate(id_to_token):
            if i in special_ids or tok is None:
                special[i] = True
                pieces.append((tok or "").encode("utf-8"))
            elif all(ch in table for ch in tok):
                pieces.append(bytes(table[ch] for ch in tok))
            else:  # an added non-special token written as plain text
                pieces.append(tok.encode("utf-8"))
        return TokenTable(pieces=pieces, special=special, byte_fallback=fallback)
    if kinds & {"Replace", "Metaspace", "ByteFallback"}:
        for i, tok in enumerate(id_to_token):
            if i in special_ids or tok is None:
                special[i] = True
                pieces.append((tok or "").encode("utf-8"))
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">") and "ByteFallback" in kinds:
                fallback[i] = True
                pieces.append(bytes([int(tok[3:5], 16)]))
            else:
                pieces.append(tok.replace("\u2581", " ").encode("utf-8"))
        return TokenTable(pieces=pieces, special=special, byte_fallback=fallback)
    raise AlignmentError(f"cannot align a tokenizer whose decoder is {sorted(kinds) or 'missing'}; alignment "
                         "knows byte-level BPE and SentencePiece-style (▁, <0xNN>) tokenizers")


@dataclass
class VocabMap:
    """Teacher id -> first S token of its text."""

    target: np.ndarray
    """[V_T] int64 S id, -1 for unmappable tokens."""
    kind: np.ndarray
    """[V_T] int8 index into MAP_KINDS."""
    student_vocab: int
    """Size of S's id space (len(S))."""

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == code).sum()) for name, code in KIND_CODES.items()}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.target.astype("<i8").tobytes())
        h.update(self.kind.astype("i1").tobytes())
        return h.hexdigest()


def build_vocab_map(teacher_tok: Any, student_tok: Any, *, teacher_vocab: int | None = None) -> VocabMap:
    """Map every teacher id to the first S token of its text (see the module docstring).

    teacher_vocab: rows of the teacher's output layer, when larger than its tokenizer (extra ids are
    unmappable).
    """
    t_table, s_table = token_table(teacher_tok), token_table(student_tok)
    _check_lossless(student_tok, s_table)
    n_t = max(len(t_table.pieces), teacher_vocab or 0)
    target = np.full(n_t, -1, dtype=np.int64)
    kind = np.full(n_t, KIND_CODES["unmappable"], dtype=np.int8)
    s_byte_ids: dict[bytes, int] = {}
    for sid, piece in enumerate(s_table.pieces):
        if not s_table.special[sid] and len(piece) == 1:
            s_byte_ids.setdefault(piece, sid)
    if teacher_tok.eos_token_id is not None and student_tok.eos_token_id is not None:
        target[teacher_tok.eos_token_id] = student_tok.eos_token_id
        kind[teacher_tok.eos_token_id] = KIND_CODES["special"]
    texts, rows = [], []
    for tid, piece in enumerate(t_table.pieces):
        if t_table.special[tid] or not piece:
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if t_table.byte_fallback[tid] or text is None:
            sid = s_byte_ids.get(piece[:1])
            if sid is not None:
                target[tid], kind[tid] = sid, KIND_CODES["byte_fallback"]
            continue
        texts.append(text)
        rows.append(tid)
    if texts:
        encoded = student_tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        unk = student_tok.unk_token_id
        for tid, ids in zip(rows, encoded, strict=True):
            if not ids or (unk is not None and ids[0] == unk):
                continue
            target[tid] = ids[0]
            kind[tid] = KIND_CODES["whole" if len(ids) == 1 else "first_subtoken"]
    return VocabMap(target=target, kind=kind, student_vocab=len(student_tok))


def _check_lossless(student_tok: Any, table: TokenTable) -> None:
    """S must encode text into tokens whose bytes concatenate back to the text (no added prefix space)."""
    probe = "Probe text, 2 lines:\nnaïve café 日本 ok."
    ids = student_tok(probe, add_special_tokens=False)["input_ids"]
    got = b"".join(table.pieces[i] for i in ids)
    if got != probe.encode("utf-8"):
        raise AlignmentError("the alignment tokenizer does not encode text losslessly (its tokens' bytes "
                             f"give {got[:40]!r} for {probe[:40]!r}); alignment needs a byte-level or "
                             "prefix-free SentencePiece student tokenizer")


@dataclass
class WindowAlignment:
    """One window: the teacher's token ids and how its positions line up with the student's."""

    teacher_ids: np.ndarray
    """[Lt] int64 teacher tokens (its prefix specials included)."""
    source: np.ndarray
    """[L] int64 teacher position aligned to each student position, -1 where none (no target)."""
    chunk_start: np.ndarray
    """[L] int64 u0 for the observed-token log-prob of student position t, -1 where unavailable."""
    chunk_stop: np.ndarray
    """[L] int64 u1 (exclusive): the log-prob is the sum of log p_j(tok_{j+1}) over u0 <= j < u1 with
    `counts[j + 1]`."""
    counts: np.ndarray
    """[Lt] bool: the token covers text (False for zero-width tokens the teacher adds itself)."""


class WindowAligner:
    """Builds each window's teacher input and its position alignment (see the module docstring)."""

    def __init__(self, teacher_tok: Any, student_tok: Any, s_table: TokenTable | None = None, *,
                 specials_as_text: bool = False) -> None:
        self.teacher_tok, self.student_tok = teacher_tok, student_tok
        self.specials_as_text = specials_as_text
        """Conversations (common/chat.py): S's special tokens other than EOS (a chat template's markers such as
        `<|im_start|>`, the padding after a window's last conversation) reach the teacher as their literal
        text, so it reads the conversation as S's template renders it. False (text corpora): refused."""
        self.s_table = s_table if s_table is not None else token_table(student_tok)
        self.s_eos = student_tok.eos_token_id
        self.t_eos = teacher_tok.eos_token_id
        if self.t_eos is None:
            raise AlignmentError("the teacher's tokenizer has no EOS token to stand for the student's document "
                                 "separator")
        with_special = teacher_tok("a", add_special_tokens=True)["input_ids"]
        plain = teacher_tok("a", add_special_tokens=False)["input_ids"]
        start = _find(with_special, plain)
        if start < 0:
            raise AlignmentError("cannot tell which special tokens the teacher's tokenizer adds by default")
        self.prefix = [int(x) for x in with_special[:start]]
        """Special ids the teacher's tokenizer puts before a text (e.g. `<bos>`); added per document."""
        self.suffix = [int(x) for x in with_special[start + len(plain):]]
        """Special ids it puts after a text; appended once at the window's end (they predict nothing used)."""

    def align(self, s_ids: np.ndarray) -> WindowAlignment:
        """Alignment of one window of student ids [L]."""
        s_ids = np.asarray(s_ids)
        L = s_ids.shape[0]
        pieces, special = self.s_table.pieces, self.s_table.special
        # student byte ends; the EOS separator occupies one virtual byte that only the teacher's EOS covers
        s_end = np.empty(L, dtype=np.int64)
        segments: list[tuple[bytes, int] | int] = []  # (text bytes, byte base), or the EOS's byte end
        buf: list[bytes] = []
        base, pos = 0, 0
        for t, sid in enumerate(s_ids.tolist()):
            if sid == self.s_eos or (special[sid] and not self.specials_as_text):
                if sid != self.s_eos:
                    raise AlignmentError(f"window holds the student special token {sid} "
                                         f"({self.student_tok.convert_ids_to_tokens(sid)!r}), which alignment "
                                         "cannot give the teacher (only the EOS separator is supported)")
                if buf:
                    segments.append((b"".join(buf), base))
                    buf = []
                pos += 1
                segments.append(pos)
                base = pos
            else:
                piece = pieces[sid]
                buf.append(piece)
                pos += len(piece)
            s_end[t] = pos
        if buf:
            segments.append((b"".join(buf), base))
        t_ids: list[int] = list(self.prefix)
        t_end: list[int] = [0] * len(self.prefix)
        counts: list[bool] = [False] * len(self.prefix)
        for seg in segments:
            if isinstance(seg, int):
                # EOS covers the virtual byte just after the previous text; the next document gets the prefix
                end = seg
                t_ids.append(self.t_eos)
                t_end.append(end)
                counts.append(True)
                t_ids += self.prefix
                t_end += [end] * len(self.prefix)
                counts += [False] * len(self.prefix)
                continue
            data, seg_base = seg
            text, char_end = _decode_with_byte_ends(data)
            enc = self.teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True,
                                   return_attention_mask=False)
            for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                t_ids.append(int(tid))
                width = b > a
                t_end.append(seg_base + (int(char_end[b - 1]) if b > 0 else 0))
                counts.append(bool(width))
        end_all = t_end[-1] if t_end else 0
        t_ids += self.suffix
        t_end += [end_all] * len(self.suffix)
        counts += [False] * len(self.suffix)
        n_suffix = len(self.suffix)
        # boundary at byte e: the last teacher token (not a trailing suffix special) ending at e
        boundary: dict[int, int] = {}
        last_real = len(t_ids) - n_suffix
        for u in range(last_real):
            boundary[t_end[u]] = u
        source = np.array([boundary.get(int(e), -1) for e in s_end], dtype=np.int64)
        chunk_start = np.full(L, -1, dtype=np.int64)
        chunk_stop = np.full(L, -1, dtype=np.int64)
        ok = (source[:-1] >= 0) & (source[1:] > source[:-1])
        chunk_start[:-1][ok] = source[:-1][ok]
        chunk_stop[:-1][ok] = source[1:][ok]
        return WindowAlignment(teacher_ids=np.asarray(t_ids, dtype=np.int64), source=source,
                               chunk_start=chunk_start, chunk_stop=chunk_stop,
                               counts=np.asarray(counts, dtype=bool))


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    return -1


def _decode_with_byte_ends(data: bytes) -> tuple[str, np.ndarray]:
    """(text, [len(text)] int64 byte end of each character) for UTF-8 `data`.

    Bytes that are not valid UTF-8 (a window that starts or ends inside a character) become U+FFFD, one per
    maximal invalid subsequence as in `bytes.decode(errors="replace")`; its byte end is that subsequence's.
    """
    try:
        text = data.decode("utf-8")
        arr = np.frombuffer(data, dtype=np.uint8)
        starts = np.flatnonzero((arr & 0xC0) != 0x80)
        ends = np.append(starts[1:], len(data)).astype(np.int64)
        return text, ends
    except UnicodeDecodeError:
        pass
    # Python's errors="replace": one U+FFFD per maximal invalid subsequence (as the Rust tokenizers'
    # decoders do); its byte end is the end of that subsequence
    parts: list[str] = []
    ends: list[np.ndarray] = []
    i = 0
    while i < len(data):
        try:
            text = data[i:].decode("utf-8")
            valid, bad_end = len(data) - i, None
        except UnicodeDecodeError as e:
            valid, bad_end = e.start, e.end
            text = data[i:i + valid].decode("utf-8")
        if valid:
            arr = np.frombuffer(data[i:i + valid], dtype=np.uint8)
            starts = np.flatnonzero((arr & 0xC0) != 0x80)
            parts.append(text)
            ends.append(np.append(starts[1:], valid).astype(np.int64) + i)
        if bad_end is None:
            break
        parts.append("\ufffd")
        ends.append(np.asarray([i + bad_end], dtype=np.int64))
        i += bad_end
    return "".join(parts), (np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64))
