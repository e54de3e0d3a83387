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


def measure(cache: str) -> dict[str, float]:
    """Positions, masked fraction and bytes/position as stored and with unmasked targets blanked."""
    from storage import fs as sfs
    from storage.reader import TeacherDataset
    from storage.schema import columns
    from storage.shards import write_shard

    ds = TeacherDataset.open(cache)
    m = ds.manifest
    if m.loss_mask is None:
        raise SystemExit(f"error: {cache} is not a cache of conversations (its manifest has no loss_mask)")
    names = list(columns(m))
    fs = sfs.resolve(tempfile.gettempdir())[0]
    stored = blanked = positions = masked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for info in m.shards:
            rows = ds.position_of(np.arange(info.first_seq_id, info.last_seq_id + 1))
            data = ds.read_columns(rows, names)
            data["seq_id"] = np.ascontiguousarray(data["seq_id"])
            mask = data["loss_mask"] != 0  # [n, L]
            positions += mask.size
            masked += int(mask.sum())
            again = write_shard(fs, tmp, m, info.index, data)
            stored += again.bytes
            for name in TARGET_COLUMNS:
                if name in data:
                    arr = data[name].copy()
                    arr[~mask] = 0
                    data[name] = arr
            os.makedirs(os.path.join(tmp, "blank"), exist_ok=True)
            blank = write_shard(fs, os.path.join(tmp, "blank"), m, info.index, data)
            blanked += blank.bytes
    return {"positions": positions, "masked": masked, "masked_fraction": masked / positions,
            "stored_bytes_per_token": stored / positions, "masked_only_bytes_per_token": blanked / positions,
            "saving": 1 - blanked / stored, "manifest_bytes_per_token": m.total_bytes / positions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", help="a cache of conversations (precompute --corpus-format chat)")
    args = ap.parse_args(argv)
    r = measure(args.cache)
    print(f"{args.cache}: {r['positions']} positions, {r['masked']} masked ({r['masked_fraction']:.1%}); "
          f"bytes/token stored {r['stored_bytes_per_token']:.1f} (manifest {r['manifest_bytes_per_token']:.1f}), "
          f"targets only at masked positions {r['masked_only_bytes_per_token']:.1f}: saves {r['saving']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
