"""Verified stamps: written where a sha256 was computed anyway, trusted by `stamp`, never by `full`."""

from __future__ import annotations

import json

import pytest
from storage_helpers import flip_byte, make_header, truncate, write_run

import storage.fs as sfs_module
from storage.errors import ShardCorruptError, StorageError
from storage.merge import open_manifest
from storage.stamps import verify_shards


@pytest.fixture
def hash_count(monkeypatch):
    calls: list[str] = []
    original = sfs_module.sha256_of

    def counting(fs, path):
        calls.append(path)
        return original(fs, path)

    monkeypatch.setattr(sfs_module, "sha256_of", counting)
    return calls


def _verify(root, mode):
    fs, inner = sfs_module.resolve(str(root))
    return verify_shards(fs, inner, open_manifest(str(root)).shards, mode=mode, by="test")


def test_writer_stamps_and_stamp_mode_hashes_nothing(tmp_path, hash_count):
    write_run(str(tmp_path), make_header())
    stamps = list(tmp_path.glob("verified-*.json"))
    assert len(stamps) == 1 and json.loads(stamps[0].read_text())["by"] == "precompute"
    hash_count.clear()
    r = _verify(tmp_path, "stamp")
    assert (r.shards, r.hashed, r.trusted, len(hash_count)) == (3, 0, 3, 0)
    r = _verify(tmp_path, "full")
    assert (r.hashed, len(hash_count)) == (3, 3)
    hash_count.clear()
    assert _verify(tmp_path, "off").hashed == 0 and not hash_count


def test_without_a_stamp_each_shard_is_hashed_once_then_trusted(tmp_path, hash_count):
    write_run(str(tmp_path), make_header())
    for p in tmp_path.glob("verified-*.json"):
        p.unlink()
    hash_count.clear()
    assert _verify(tmp_path, "stamp").hashed == 3 and len(hash_count) == 3
    assert _verify(tmp_path, "stamp").hashed == 0 and len(hash_count) == 3  # the first check stamped them


def test_size_is_always_checked_and_full_finds_a_flipped_byte(tmp_path):
    write_run(str(tmp_path), make_header(shard_size=8), rows=[8, 8])
    flip_byte(str(tmp_path / "shard-000001.parquet"), 100)
    assert _verify(tmp_path, "stamp").trusted == 2  # a stamp vouches for the sha256; the size is unchanged
    with pytest.raises(ShardCorruptError, match=r"shard-000001\.parquet: sha256"):
        _verify(tmp_path, "full")
    truncate(str(tmp_path / "shard-000000.parquet"), 50)
    for mode in ("off", "stamp"):
        with pytest.raises(ShardCorruptError, match=r"shard-000000\.parquet: size is 50 bytes"):
            _verify(tmp_path, mode)


def test_a_stamp_that_does_not_match_its_hash_is_refused(tmp_path):
    write_run(str(tmp_path), make_header())
    stamp = next(tmp_path.glob("verified-*.json"))
    body = json.loads(stamp.read_text())
    body["shards"][0]["sha256"] = "0" * 64
    stamp.write_text(json.dumps(body))
    with pytest.raises(StorageError, match="does not match its manifest_hash; delete it"):
        _verify(tmp_path, "stamp")
