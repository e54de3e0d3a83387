"""Tokenizer loading and the tokenizer fingerprint (a manifest contract: caches made with different
tokenizers never join; a student's tokenizer must match its caches').

`load_tokenizer` is the one loader of every command: a directory, a hub id, or a GGUF file (given as the
`.gguf` path itself, or as a directory plus `gguf_file`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.errors import LoadError


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of the vocab (token -> id, sorted by token) and the special tokens with their ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {
        name: [tok, tokenizer.convert_tokens_to_ids(tok)]
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (tok := getattr(tokenizer, name, None)) is not None
    }
    extra = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    payload = json.dumps({"vocab": vocab, "special": special, "all_special": extra}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def split_gguf(path: str) -> tuple[str, str | None]:
    """`dir/model.gguf` -> (`dir`, `model.gguf`); any other path -> (path, None)."""
    p = Path(path)
    return (str(p.parent), p.name) if p.suffix == ".gguf" else (path, None)


def load_tokenizer(path: str, *, gguf_file: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False) -> Any:
    """A transformers fast tokenizer from a directory, a hub id or a GGUF file (`path` ending in `.gguf`,
    or `gguf_file` inside `path`); LoadError (one line) when it cannot be loaded or is not a fast (Rust)
    tokenizer, which packing needs."""
    from transformers import AutoTokenizer

    if gguf_file is None:
        path, gguf_file = split_gguf(path)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot load tokenizer from {path!r}: {str(e).strip().splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise LoadError(f"tokenizer at {path!r} is not a fast (Rust) tokenizer; packing needs one")
    return tok
