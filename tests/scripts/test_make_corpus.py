"""The bundled corpus is well-formed, and regenerating it from the Debian packages reproduces it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "data/corpus"


def _rows(name: str) -> list[dict]:
    with open(CORPUS / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_bundled_corpus_is_c4_style_with_three_domains_and_disjoint_splits():
    train, valid = _rows("train.jsonl"), _rows("validation.jsonl")
    for row in train + valid:
        assert set(row) == {"text", "url", "timestamp"}
        assert row["text"].strip() and row["url"].startswith("debian:")
        assert row["timestamp"].endswith("Z")
    sources = {r["url"].split("/")[0] for r in train}
    assert sources == {"debian:bible-kjv-text", "debian:jargon-text", "debian:python3-doc"}
    assert {r["url"].split("/")[0] for r in valid} == sources
    train_urls = [r["url"] for r in train]
    assert len(set(train_urls)) == len(train_urls)
    assert not set(train_urls) & {r["url"] for r in valid}
    # interleaved: the first 30 documents already hold all three domains
    assert {u.split("/")[0] for u in train_urls[:30]} == sources
    size = (CORPUS / "train.jsonl").stat().st_size + (CORPUS / "validation.jsonl").stat().st_size
    assert 1_000_000 < size < 3_000_000


@pytest.mark.skipif(
    shutil.which("bible") is None
    or not Path("/usr/share/doc/python3.11/html/_sources").exists()
    or not Path("/usr/share/doc/jargon-text/jargon.txt.gz").exists(),
    reason="Debian packages bible-kjv, jargon-text, python3-doc not installed",
)
def test_make_corpus_is_deterministic_and_matches_the_bundled_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts/make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_corpus"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    assert mod.main(["--output", str(tmp_path)]) == 0
    for name in ("train.jsonl", "validation.jsonl", "LICENSE-python-docs.txt"):
        assert (tmp_path / name).read_bytes() == (CORPUS / name).read_bytes(), name
