"""Manifest (de)serialisation and validation, schema columns, filesystem helpers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from storage_helpers import make_header, write_run

from storage import fs as sfs
from storage.errors import ManifestError
from storage.manifest import Manifest
from storage.schema import columns, shard_header


def test_json_round_trip(tmp_path):
    m, _ = write_run(str(tmp_path), make_header(pooled={3: 8, 11: 16}))
    again = Manifest.from_json((tmp_path / "manifest.json").read_text(), source="manifest.json")
    assert again == m
    assert again.pooled_dims == {3: 8, 11: 16}  # int keys survive JSON's string keys
    assert again.num_tokens == 19 * 16 and again.total_bytes == sum(s.bytes for s in m.shards)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=99), "schema_version 99 is newer"),
    (lambda d: d.pop("seq_len"), "field 'seq_len' is missing"),
    (lambda d: d.update(format="hdf5"), "field 'format' is 'hdf5'"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d["shards"][1].update(first_seq_id=3), r"covers seq ids 3\.\.15, expected 8\.\.15"),
    (lambda d: d["shards"].reverse(), "not sorted by index"),
])
def test_bad_manifests_name_the_field(tmp_path, edit, message):
    write_run(str(tmp_path), make_header())
    d = json.loads((tmp_path / "manifest.json").read_text())
    edit(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d, source="x/manifest.json")


def test_schema_columns():
    cols = columns(make_header(seq_len=16, top_k=4, logprob_dtype="float32", pooled={7: 32}))
    assert list(cols) == ["seq_id", "input_ids", "topk_ids", "topk_logprobs", "entropy", "pooled_7"]
    assert cols["topk_ids"].shape == (16, 4) and cols["topk_ids"].width == 64
    assert cols["topk_logprobs"].dtype == np.float32 and cols["pooled_7"].shape == (32,)
    no_entropy = columns(make_header(entropy_kind="absent", pooled={}))
    assert list(no_entropy) == ["seq_id", "input_ids", "topk_ids", "topk_logprobs"]
    assert list(cols) == make_header(pooled={7: 32}).column_names()


def test_shard_header_ignores_slice_and_notes():
    a = make_header(slice_index=0, num_slices=2, notes={"tokens_per_s": 1234.5})
    b = make_header(slice_index=1, num_slices=2)
    assert shard_header(a) == shard_header(b)
    assert "shards" not in shard_header(a)


def test_resolve_local_and_urls(tmp_path):
    fs, path = sfs.resolve(str(tmp_path))
    assert sfs.is_local(fs) and path == str(tmp_path)
    fs, path = sfs.resolve(f"file://{tmp_path}")
    assert sfs.is_local(fs) and path == str(tmp_path)
    fs, path = sfs.resolve("memory://a/b")
    assert "memory" in fs.protocol and path == "/a/b"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_atomic_write_and_hashes(tmp_path, memory_url, where):
    root = str(tmp_path) if where == "local" else memory_url
    fs, base = sfs.resolve(root)
    sfs.atomic_write_text(fs, sfs.join(base, "d", "a.json"), "first")
    sfs.atomic_write_text(fs, sfs.join(base, "d", "a.json"), "second")
    sfs.atomic_write_bytes(fs, sfs.join(base, "d", "sub", "b.bin"), b"\x00\x01")
    assert sfs.read_text(fs, sfs.join(base, "d", "a.json")) == "second"
    assert sorted(sfs.list_files(fs, sfs.join(base, "d"))) == ["a.json", "sub/b.bin"]  # no temporaries left
    assert sfs.sha256_file(fs, sfs.join(base, "d", "a.json")) == hashlib.sha256(b"second").hexdigest()
    lines = "".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n"
                    for rel, data in sorted({"a.json": b"second", "sub/b.bin": b"\x00\x01"}.items()))
    assert sfs.sha256_dir(fs, sfs.join(base, "d")) == hashlib.sha256(lines.encode()).hexdigest()
    assert sfs.sha256_of(fs, sfs.join(base, "d")) == sfs.sha256_dir(fs, sfs.join(base, "d"))
    assert sfs.size_of(fs, sfs.join(base, "d")) == 8
