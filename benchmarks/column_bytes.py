"""Stored bytes per token of each column of one or more caches (Parquet column chunks, Zarr array files).

    python benchmarks/column_bytes.py CACHE [CACHE ...]

Parquet: the compressed size of each column's chunks (footer metadata), summed over the shards; Zarr: the
bytes of each array's files. Divided by the cache's tokens (sequences x seq_len). Used for the cost of
`observed_logprob` (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def column_bytes(path: str) -> tuple[dict[str, int], int]:
    """({column: stored bytes}, tokens) of the cache at `path` (a local directory)."""
    from storage.reader import TeacherDataset

    ds = TeacherDataset.open(path, verify="off")
    m = ds.manifest
    out: dict[str, int] = {}
    for shard in m.shards:
        f = Path(path) / shard.file
        if m.format == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    name = col.path_in_schema.split(".")[0]
                    out[name] = out.get(name, 0) + col.total_compressed_size
        else:
            for array in sorted(p for p in f.iterdir() if p.is_dir()):
                out[array.name] = out.get(array.name, 0) + sum(x.stat().st_size for x in array.rglob("*")
                                                               if x.is_file())
    return out, m.num_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("caches", nargs="+", help="cache directories (local)")
    args = ap.parse_args()
    for path in args.caches:
        sizes, tokens = column_bytes(path)
        total = sum(sizes.values())
        print(f"{path}: {tokens} tokens, {total / tokens:.3f} B/token over all columns")
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {name:20s} {size / tokens:9.3f} B/token  ({100.0 * size / total:5.1f}%)")


if __name__ == "__main__":
    main()
