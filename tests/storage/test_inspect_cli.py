"""`cli.py inspect` and `cli.py merge` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from storage_helpers import flip_byte, make_header, truncate, write_run

from tests.helpers import one_error_line, run_cli

_run, _one_error_line = run_cli, one_error_line


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_inspect_directory(tmp_path, fmt):
    m, written = write_run(str(tmp_path), make_header(fmt=fmt))
    result = _run("inspect", tmp_path, "--rows", 2, "--position", 3)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "19 sequences, 304 tokens" in out and "bytes/token" in out
    assert "kind=topk  top_k=4" in out and "log-probs=float16" in out and "entropy=exact" in out
    assert "teacher      tiny" in out and "pooled       2 (d=8), 5 (d=12)" in out
    assert out.count(" ok\n") + out.endswith(" ok") >= 2 and f"shard-000002.{fmt}" in out
    assert "seq 1 position 3:" in out and "top-k mass" in out


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_inspect_shows_a_sampled_cache(tmp_path, fmt):
    m, written = write_run(str(tmp_path), make_header(fmt=fmt, target_kind="sampled", top_k=6))
    result = _run("inspect", tmp_path, "--rows", 2, "--position", 3)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "kind=sampled  samples=6" in out and "seed rule    splitmix64-v1" in out
    assert "sample_counts" in out and "uint16" in out and "top-k mass" not in out
    keep = written.sample_counts[1, 3] > 0
    shown = ", ".join(f"{i}:{c}" for i, c in zip(written.sample_ids[1, 3][keep], written.sample_counts[1, 3][keep],
                                                 strict=True))
    assert "of 6 draws" in out and f"sampled id:count  {shown}" in out
    report = json.loads(_run("inspect", tmp_path, "--rows", 1, "--json").stdout)
    assert report["target_kind"] == "sampled" and report["samples"] == 6
    assert report["columns"]["sample_counts"] == {"dtype": "uint16", "row_shape": [16, 6]}
    assert sum(report["rows"][0]["sample_counts"]) == 6


def test_inspect_json_values(tmp_path):
    m, written = write_run(str(tmp_path), make_header())
    result = _run("inspect", tmp_path, "--rows", 3, "--position", 5, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sequences"] == 19 and report["tokens"] == 19 * 16 and report["top_k"] == 4
    assert report["target_kind"] == "topk" and report["samples"] is None
    assert report["bytes"] == m.total_bytes
    assert report["bytes_per_token"] == pytest.approx(m.total_bytes / (19 * 16))
    assert [s["status"] for s in report["shards"]] == ["ok", "ok", "ok"]
    assert report["columns"]["topk_ids"] == {"dtype": "int32", "row_shape": [16, 4]}
    row = report["rows"][2]
    lp = written.topk_logprobs[2, 5].astype(np.float16).astype(np.float64)
    assert row["topk_ids"] == written.topk_ids[2, 5].tolist()
    assert row["topk_mass"] == pytest.approx(np.exp(lp).sum(), rel=1e-6)
    assert row["entropy"] == pytest.approx(float(written.entropy[2, 5]))


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_inspect_single_shard(tmp_path, fmt):
    write_run(str(tmp_path), make_header(fmt=fmt))
    result = _run("inspect", tmp_path / f"shard-000001.{fmt}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "shard" and report["sequences"] == 8
    assert report["shards"][0]["first_seq_id"] == 8 and report["shards"][0]["status"] == "ok"
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / f"shard-000001.{fmt}").rename(alone / f"shard-000001.{fmt}")
    report = json.loads(_run("inspect", alone / f"shard-000001.{fmt}", "--json").stdout)
    assert report["shards"][0]["status"].startswith("not listed in a manifest")


def test_corrupt_and_missing_shards_exit_2(tmp_path):
    write_run(str(tmp_path), make_header())
    flip_byte(str(tmp_path / "shard-000000.parquet"), 200)
    (tmp_path / "shard-000002.parquet").unlink()
    _one_error_line(_run("inspect", tmp_path), "2 of 3 shard(s) damaged", "shard-000000.parquet (sha256",
                    "shard-000002.parquet (missing)")
    _one_error_line(_run("inspect", tmp_path, "--no-verify"), "1 of 3", "shard-000002.parquet (missing)")


def test_truncated_shard_exit_2(tmp_path):
    write_run(str(tmp_path), make_header())
    path = tmp_path / "shard-000001.parquet"
    truncate(str(path), path.stat().st_size - 10)
    _one_error_line(_run("inspect", tmp_path), "shard-000001.parquet (size is")
    _one_error_line(_run("inspect", path), "shard-000001.parquet: not a readable Parquet file")


def test_newer_schema_exit_2(tmp_path):
    write_run(str(tmp_path), make_header())
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["schema_version"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    _one_error_line(_run("inspect", tmp_path), "manifest.json: schema_version 7 is newer")


def test_merge_command(tmp_path):
    for s in range(2):
        write_run(str(tmp_path), make_header(slice_index=s, num_slices=2), rows=[8, 8, 8])
    result = _run("merge", tmp_path, "--verify")
    assert result.exit_code == 0, result.output
    assert "3 shards, 24 sequences, 384 tokens from 2 slice manifest(s)" in result.stdout
    merged = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["index"] for s in merged["shards"]] == [0, 1, 2] and merged["num_slices"] == 1


def test_merge_refusals_exit_2(tmp_path):
    write_run(str(tmp_path), make_header(slice_index=1, num_slices=2), rows=[8, 8, 8])
    _one_error_line(_run("merge", tmp_path), "1 of 2 slice manifests are missing", "manifest-slice-00000-of-00002")
    write_run(str(tmp_path), make_header(slice_index=0, num_slices=2), rows=[8, 8, 8])
    (tmp_path / "shard-000002.parquet").unlink()
    _one_error_line(_run("merge", tmp_path, "--verify"), "shard-000002.parquet: missing")
    assert not (tmp_path / "manifest.json").exists()
    _one_error_line(_run("merge", tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_inspect_and_merge_on_memory_url(memory_url, fmt):
    for s in range(2):
        write_run(memory_url, make_header(fmt=fmt, slice_index=s, num_slices=2), rows=[8, 8, 2])
    report = json.loads(_run("inspect", memory_url, "--json", "--no-verify").stdout)  # merged on the fly
    assert report["sequences"] == 18 and [s["status"] for s in report["shards"]] == ["size ok"] * 3
    assert _run("merge", memory_url).exit_code == 0
    report = json.loads(_run("inspect", f"{memory_url}/shard-000002.{fmt}", "--json", "--rows", 1).stdout)
    assert report["kind"] == "shard" and report["shards"][0]["status"] == "ok"
    assert report["rows"][0]["seq_id"] == 16
