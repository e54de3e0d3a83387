"""What storing targets only at the loss mask's positions would save, on a cache of conversations.

    python benchmarks/chat_mask_bytes.py caches/chat-smollm2

A cache of conversations (`precompute --corpus-format chat`) stores the teacher's targets at every position,
prompts and padding included, though stage two uses only the positions of its `loss_mask` (the next token
belongs to an assistant reply). This re-writes each shard with the cache's own writer (same format,
compression and layout) twice: as it is, and with the target columns (`topk_ids`, `topk_logprobs`,
`entropy`; `sample_*` for a sampled cache) set to constants outside the mask, which the compressor reduces
to almost nothing: a lower bound on the bytes a masked-only layout would take (it would also need an index
of the masked positions, which the stored `loss_mask` column already is). Bytes are per position of the
cache (every token of every window), so the two figures compare directly with `inspect`'s bytes/token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_COLUMNS = ("topk_ids", "topk_logprobs", "entropy", "sample_ids", "sample_counts")


def measure(cache: str, pad_id: int | None = None) -> dict[str, float]:
    """Positions, masked fraction and bytes/position as stored, with unmasked targets blanked, and with only
    the padding's blanked. pad_id: the padding token (default: that of the tokenizer the cache records)."""
    from storage import fs as sfs
    from storage.reader import TeacherDataset
    from storage.schema import columns
    from storage.shards import write_shard

    ds = TeacherDataset.open(cache)
    m = ds.manifest
    if m.loss_mask is None:
        raise SystemExit(f"error: {cache} is not a cache of conversations (its manifest has no loss_mask)")
    if pad_id is None:
        from common.chat import pad_token_id
        from common.tokenizer import load_tokenizer

        tok_path = m.notes["tokenizer"]
        pad_id = pad_token_id(load_tokenizer(tok_path, gguf_file=m.teacher.gguf_file if tok_path == m.teacher.path
                                             else None))
    names = list(columns(m))
    fs = sfs.resolve(tempfile.gettempdir())[0]
    stored = blanked = unpadded = positions = masked = padding = 0
    with tempfile.TemporaryDirectory() as tmp:
        for info in m.shards:
            rows = ds.position_of(np.arange(info.first_seq_id, info.last_seq_id + 1))
            data = ds.read_columns(rows, names)
            data["seq_id"] = np.ascontiguousarray(data["seq_id"])
            mask = data["loss_mask"] != 0  # [n, L]
            pad = _trailing_padding(data["input_ids"], data["doc_start"], pad_id)  # [n, L] after the last conversation
            positions += mask.size
            masked += int(mask.sum())
            padding += int(pad.sum())
            stored += write_shard(fs, tmp, m, info.index, data).bytes
            unpadded += _blanked_bytes(fs, os.path.join(tmp, "unpadded"), m, info.index, data, ~pad)
            blanked += _blanked_bytes(fs, os.path.join(tmp, "blank"), m, info.index, data, mask)
    return {"positions": positions, "masked": masked, "masked_fraction": masked / positions, "padding": padding,
            "stored_bytes_per_token": stored / positions, "masked_only_bytes_per_token": blanked / positions,
            "saving": 1 - blanked / stored, "manifest_bytes_per_token": m.total_bytes / positions,
            "no_padding_bytes_per_token": unpadded / positions, "padding_saving": 1 - unpadded / stored,
            "padding_in_notes": m.notes.get("packing", {}).get("padding_tokens")}


def _trailing_padding(input_ids: np.ndarray, doc_start: np.ndarray, pad_id: int) -> np.ndarray:
    """[n, L] bool: the run of `pad_id` that ends each window after its last conversation's start (packing's
    padding, provided no conversation ends in the pad id; the total is checked against the manifest's
    packing count)."""
    n, length = input_ids.shape
    is_pad = input_ids == pad_id
    run = np.where(is_pad.all(axis=1), length, np.argmax(~is_pad[:, ::-1], axis=1))  # trailing pad tokens
    last_start = length - 1 - np.argmax(doc_start[:, ::-1] != 0, axis=1)
    first_pad = np.maximum(length - run, last_start + 1)
    return np.arange(length)[None, :] >= first_pad[:, None]


def _blanked_bytes(fs, root: str, m, index: int, data: dict[str, np.ndarray], keep: np.ndarray) -> int:
    """Bytes of the shard written with the target columns set to 0 outside `keep` [n, L] bool."""
    from storage.shards import write_shard

    os.makedirs(root, exist_ok=True)
    copy = dict(data)
    for name in TARGET_COLUMNS:
        if name in copy:
            arr = copy[name].copy()
            arr[~keep] = 0
            copy[name] = arr
    return write_shard(fs, root, m, index, copy).bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", help="a cache of conversations (precompute --corpus-format chat)")
    args = ap.parse_args(argv)
    r = measure(args.cache)
    print(f"{args.cache}: {r['positions']} positions, {r['masked']} masked ({r['masked_fraction']:.1%}), "
          f"{r['padding']} padding ({r['padding'] / r['positions']:.1%}; packing counted {r['padding_in_notes']})")
    print(f"  bytes/token as stored        {r['stored_bytes_per_token']:.1f} (manifest {r['manifest_bytes_per_token']:.1f})")
    print(f"  without padding targets      {r['no_padding_bytes_per_token']:.1f} (saves {r['padding_saving']:.2%})")
    print(f"  masked positions' targets only {r['masked_only_bytes_per_token']:.1f} (saves {r['saving']:.2%}; "
          f"{1 - r['masked_only_bytes_per_token'] / r['no_padding_bytes_per_token']:.2%} of the padding-free figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
