"""Parquet shards: plain-pyarrow readability, layout, corruption detection (round trip and determinism of
every format: test_formats.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from storage_helpers import flip_byte, make_header, make_targets, truncate, write_run

from storage.errors import ShardCorruptError
from storage.reader import TeacherDataset


def test_plain_pyarrow_reads_a_shard(tmp_path):
    """What the README shows: no project code needed to read a shard."""
    header = make_header(seq_len=16, top_k=4)
    _, written = write_run(str(tmp_path), header)

    table = pq.read_table(tmp_path / "shard-000001.parquet")
    L, k = 16, 4
    topk_ids = table["topk_ids"].combine_chunks().flatten().to_numpy().reshape(-1, L, k)
    logprobs = table["topk_logprobs"].combine_chunks().flatten().to_numpy().reshape(-1, L, k)

    np.testing.assert_array_equal(table["seq_id"].to_numpy(), np.arange(8, 16))
    np.testing.assert_array_equal(topk_ids, written.topk_ids[8:16])
    np.testing.assert_array_equal(logprobs, written.topk_logprobs[8:16].astype(np.float16))
    assert table.schema.field("topk_logprobs").type.list_size == L * k


def test_plain_pyarrow_reads_a_sampled_shard(tmp_path):
    header = make_header(seq_len=16, top_k=5, target_kind="sampled")
    _, written = write_run(str(tmp_path), header)

    table = pq.read_table(tmp_path / "shard-000001.parquet")
    ids = table["sample_ids"].combine_chunks().flatten().to_numpy().reshape(-1, 16, 5)
    counts = table["sample_counts"].combine_chunks().flatten().to_numpy().reshape(-1, 16, 5)
    target = counts / 5.0  # the unbiased estimate of the teacher's probability at `ids`
    np.testing.assert_array_equal(ids, written.sample_ids[8:16])
    assert counts.dtype == np.uint16 and (target.sum(-1) == 1).all()
    assert "topk_ids" not in table.column_names
    meta = json.loads(pq.read_schema(tmp_path / "shard-000001.parquet").metadata[b"distill.manifest"])
    assert meta["target_kind"] == "sampled" and meta["samples"] == 5 and meta["sample_seed"].startswith("splitmix64")


def test_top_k_shards_do_not_record_the_new_fields(tmp_path):
    """A top-k cache's manifest and shard headers are what they were before sampled caches existed."""
    write_run(str(tmp_path), make_header())
    meta = json.loads(pq.read_schema(tmp_path / "shard-000000.parquet").metadata[b"distill.manifest"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for d in (meta, manifest):
        assert not {"target_kind", "samples", "sample_seed"} & set(d)


def test_layout_row_group_per_sequence_no_dictionary(tmp_path):
    header = make_header()
    write_run(str(tmp_path), header)
    meta = pq.ParquetFile(tmp_path / "shard-000000.parquet").metadata
    assert meta.num_row_groups == header.shard_size
    for i in range(meta.num_columns):
        col = meta.row_group(0).column(i)
        assert col.compression == "ZSTD"
        assert not any("DICT" in e for e in col.encodings), (col.path_in_schema, col.encodings)
    encodings = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i).encodings
                 for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_logprobs.list.element"]


def _column_chunk_middle(path, row_group: int, column: str) -> int:
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    for i in range(meta.num_columns):
        col = meta.column(i)
        if col.path_in_schema == f"{column}.list.element":
            return col.data_page_offset + col.total_compressed_size // 2
    raise AssertionError(column)


def test_flipped_byte_detected_without_verify(tmp_path):
    header = make_header()
    write_run(str(tmp_path), header)
    path = str(tmp_path / "shard-000001.parquet")
    flip_byte(path, _column_chunk_middle(path, 2, "topk_logprobs"))
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    ds.read_columns([8 + 1])  # an untouched row group still reads
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.parquet.*(checksum|CRC|decode)"):
        ds.read_columns([8 + 2])
    TeacherDataset.open(str(tmp_path))  # default "stamp": the writer's stamp vouches for the sha256, size ok
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.parquet: sha256"):
        TeacherDataset.open(str(tmp_path), verify="full")


def test_truncated_file_detected_without_verify(tmp_path):
    header = make_header()
    write_run(str(tmp_path), header)
    path = str(tmp_path / "shard-000000.parquet")
    truncate(path, os.path.getsize(path) // 2)
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    with pytest.raises(ShardCorruptError, match=r"shard-000000\.parquet: not a readable Parquet file"):
        ds.read_columns([0])
    with pytest.raises(ShardCorruptError, match=r"shard-000000\.parquet: size is \d+ bytes"):
        TeacherDataset.open(str(tmp_path))


def test_rows_differ_from_manifest(tmp_path):
    """A shard replaced by another valid shard is refused on read (rows) even without verify."""
    header = make_header()
    write_run(str(tmp_path), header)
    os.replace(tmp_path / "shard-000002.parquet", tmp_path / "shard-000001.parquet")
    ds = TeacherDataset.open(str(tmp_path), verify=False)
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.parquet: has 3 rows, the manifest says 8"):
        ds.read_columns([8])


def test_float16_input_is_kept_exactly(tmp_path):
    header = make_header(logprob_dtype="float16")
    targets = make_targets(header, 0, logprob_dtype=np.float16)
    from storage.writer import TargetsWriter

    with TargetsWriter(str(tmp_path), header) as w:
        w.write_shard(0, targets)
    got = TeacherDataset.open(str(tmp_path)).read_columns([3], ["topk_logprobs"])["topk_logprobs"]
    assert got.dtype == np.float16 and got.tobytes() == targets.topk_logprobs[3:4].tobytes()
