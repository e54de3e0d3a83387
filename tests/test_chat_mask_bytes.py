"""benchmarks/chat_mask_bytes.py on a tiny cache of conversations: it re-writes the shards to the stored
bytes exactly, and blanking the targets outside the mask makes them smaller."""

from __future__ import annotations

from tests.chat_helpers import PLAIN_TEMPLATE, sample_conversations, write_chat_corpus
from tests.helpers import load_script, make_tiny_teacher, sample_texts, train_tiny_tokenizer


def test_masked_only_targets_take_fewer_bytes(tmp_path):
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    tok = train_tiny_tokenizer(tmp_path / "tok", sample_texts(100), vocab_size=300)
    teacher = make_tiny_teacher(tmp_path / "teacher", 300, seed=3, tokenizer_dir=tok)
    corpus = write_chat_corpus(tmp_path / "chat.jsonl", sample_conversations(30, seed=2, max_words=8))
    (tmp_path / "t.jinja").write_text(PLAIN_TEMPLATE, encoding="utf-8")
    run_precompute(PrecomputeConfig(
        corpus=CorpusConfig(dataset=str(corpus), corpus_format="chat", chat_template=str(tmp_path / "t.jinja")),
        teacher=TeacherConfig(path=str(teacher), batch_size=8, top_k=8, device="cpu", pool_layers=[]),
        storage=StorageConfig(output=str(tmp_path / "cache"), shard_size=4), seq_len=256, num_slices=1,
        slice_index=0, progress=False))
    r = load_script("benchmarks/chat_mask_bytes.py").measure(str(tmp_path / "cache"))
    assert r["stored_bytes_per_token"] == r["manifest_bytes_per_token"]  # the writer is deterministic
    assert 0 < r["masked_fraction"] < 1 and r["padding"] == r["padding_in_notes"] > 0
    assert r["masked_only_bytes_per_token"] < r["stored_bytes_per_token"] and 0 < r["saving"] < 1
