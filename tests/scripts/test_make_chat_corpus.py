"""The bundled conversations are well-formed chat rows, and regenerating them from python3-doc reproduces them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAT = ROOT / "data/chat"


def _rows(name: str) -> list[dict]:
    with open(CHAT / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_bundled_conversations_are_faq_questions_and_answers_with_disjoint_splits():
    from common.chat import check_conversation

    train, valid = _rows("train.jsonl"), _rows("validation.jsonl")
    assert len(train) > 100 and len(valid) >= 10
    for i, row in enumerate(train + valid):
        assert set(row) == {"messages", "url", "timestamp"}
        msgs = check_conversation(row["messages"], f"row {i}")  # the validation precompute applies
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[0]["content"].endswith("?") and len(msgs[1]["content"]) >= 40
        assert row["url"].startswith("debian:python3-doc/faq/") and row["timestamp"].endswith("Z")
    urls = [r["url"] for r in train + valid]
    assert len(set(urls)) == len(urls)
    assert (CHAT / "LICENSE-python-docs.txt").read_bytes() == (ROOT / "data/corpus/LICENSE-python-docs.txt").read_bytes()


@pytest.mark.skipif(not Path("/usr/share/doc/python3.11/html/_sources/faq").exists(),
                    reason="Debian package python3-doc not installed")
def test_make_chat_corpus_is_deterministic_and_matches_the_bundled_files(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("make_chat_corpus", ROOT / "scripts/make_chat_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--output", str(tmp_path)]) == 0
    for name in ("train.jsonl", "validation.jsonl", "LICENSE-python-docs.txt"):
        assert (tmp_path / name).read_bytes() == (CHAT / name).read_bytes(), name
