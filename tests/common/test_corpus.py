"""Corpus readers: jsonl, jsonl.gz, parquet, txt, globs; clear one-line errors; fingerprints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.corpus import CorpusConfig, corpus_fingerprint, iter_documents
from common.errors import CorpusError
from tests.helpers import sample_texts, write_jsonl_corpus

ROOT = Path(__file__).resolve().parents[2]


def _docs(dataset: str, **kw) -> list[str]:
    return list(iter_documents(CorpusConfig(dataset=dataset, **kw)))


def test_local_formats_give_the_same_documents(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sample_texts(30, seed=1)
    write_jsonl_corpus(tmp_path / "a.jsonl", texts)
    write_jsonl_corpus(tmp_path / "b.jsonl.gz", texts)
    pq.write_table(pa.table({"body": texts, "n": list(range(30))}), tmp_path / "c.parquet", row_group_size=7)
    assert _docs(str(tmp_path / "a.jsonl")) == texts
    assert _docs(str(tmp_path / "b.jsonl.gz")) == texts
    assert _docs(str(tmp_path / "c.parquet"), text_field="body") == texts
    # glob and comma list: sorted file order, documents concatenated
    assert _docs(str(tmp_path / "*.jsonl*")) == texts + texts
    assert _docs(f"{tmp_path / 'b.jsonl.gz'},{tmp_path / 'a.jsonl'}") == texts + texts
    assert _docs(str(tmp_path / "a.jsonl"), max_documents=5) == texts[:5]


def test_txt_gives_one_document_per_paragraph(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("First para\nstill first.\n\n  \nSecond.\n\n\nThird\n", encoding="utf-8")
    assert _docs(str(tmp_path / "t.txt")) == ["First para\nstill first.", "Second.", "Third"]


def test_errors_name_file_row_and_field(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        _docs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError, match="no file matches"):
        _docs(str(tmp_path / "*.parquet"))
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="no documents"):
        _docs(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"row 1: field 'text' is missing"):
        _docs(str(tmp_path / "bad.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="num.jsonl"):
        _docs(str(tmp_path / "num.jsonl"))


def test_fingerprint_follows_content_and_limits(tmp_path: Path) -> None:
    path = write_jsonl_corpus(tmp_path / "x" / "a.jsonl", ["one", "two"])
    fp, desc = corpus_fingerprint(CorpusConfig(dataset=str(path)))
    assert desc["source"] == "local" and desc["files"][0]["name"] == "a.jsonl"
    moved = write_jsonl_corpus(tmp_path / "y" / "a.jsonl", ["one", "two"])  # same content elsewhere
    assert corpus_fingerprint(CorpusConfig(dataset=str(moved)))[0] == fp
    assert corpus_fingerprint(CorpusConfig(dataset=str(path), max_documents=1))[0] != fp
    write_jsonl_corpus(path, ["one", "three"])
    assert corpus_fingerprint(CorpusConfig(dataset=str(path)))[0] != fp
    hub_fp, hub = corpus_fingerprint(CorpusConfig(dataset="allenai/c4", dataset_config="en"))
    assert hub == {"source": "hub", "dataset": "allenai/c4", "config": "en", "split": "train", "revision": None,
                   "text_field": "text", "max_documents": None, "max_tokens": None}
    assert len(hub_fp) == 64


def test_cli_reports_a_missing_corpus_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "teacher").mkdir()  # beside the output, not holding it (the output rule refuses that first)
    r = subprocess.run([sys.executable, "cli.py", "precompute", "--teacher", str(tmp_path / "teacher"), "--dataset",
                        str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: corpus file {str(tmp_path / 'nope.jsonl')!r} does not exist"]


def test_hub_path_streams_and_checks_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = {}

    def fake_load_dataset(name, config, *, split, revision, streaming):
        calls.update(name=name, config=config, split=split, revision=revision, streaming=streaming)
        if name == "nobody/missing":
            raise FileNotFoundError("Dataset 'nobody/missing' doesn't exist on the Hub\nmore detail")
        return iter([{"text": "first", "url": "a"}, {"text": "second", "url": "b"}, {"url": "c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert _docs("allenai/c4", dataset_config="en", max_documents=2) == ["first", "second"]
    assert calls == dict(name="allenai/c4", config="en", split="train", revision=None, streaming=True)
    with pytest.raises(CorpusError, match=r"row 2: field 'text' is missing \(fields: url\)"):
        _docs("allenai/c4", dataset_config="en")
    with pytest.raises(CorpusError, match="cannot open hub dataset 'nobody/missing': Dataset 'nobody/missing' doesn't exist on the Hub$"):
        _docs("nobody/missing")


def test_hub_partitions_are_its_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed dataset of 4 data files has 4 partitions; partition p reads only file p."""
    import datasets

    from common.corpus import corpus_partitions, iter_partition

    files = [write_jsonl_corpus(tmp_path / f"part-{i}.jsonl", [f"file {i} doc {j}" for j in range(3 + i)])
             for i in range(4)]
    real = datasets.load_dataset

    def local_stream(name, config, *, split, revision, streaming):
        return real("json", data_files=[str(f) for f in files], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", local_stream)
    cfg = CorpusConfig(dataset="someone/corpus", max_documents=8)
    parts = corpus_partitions(cfg)
    assert len(parts) == 4
    assert [list(iter_partition(cfg, p)) for p in parts] == [[f"file {i} doc {j}" for j in range(3 + i)]
                                                             for i in range(4)]
    # max_documents is shared out: 2 per partition
    assert list(iter_documents(cfg)) == [f"file {i} doc {j}" for i in range(4) for j in range(2)]


def test_byte_range_partitions_cover_each_line_once(tmp_path: Path) -> None:
    """Any --partition-bytes: every line is read by exactly one partition, each partition reads its range
    plus at most about one line."""
    from common.corpus import ReadStats, corpus_partitions, iter_partition

    texts = sample_texts(120, seed=5)
    path = write_jsonl_corpus(tmp_path / "c.jsonl", texts)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n\n")  # blank lines are no documents
    longest = max(len(line) for line in path.read_bytes().split(b"\n"))
    for part_bytes in (1, 97, 1000, path.stat().st_size, 10**9):
        cfg = CorpusConfig(dataset=str(path), partition_bytes=part_bytes)
        got = []
        for part in corpus_partitions(cfg):
            stats = ReadStats()
            got += list(iter_partition(cfg, part, stats=stats))
            assert stats.bytes_read <= part.stop - part.start + 2 * longest + 256
        assert got == texts, part_bytes
