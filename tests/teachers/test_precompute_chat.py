"""precompute on conversations (--corpus-format chat): the loss_mask and doc_start columns in Parquet and
Zarr, the manifest's loss_mask entry and packing counts, malformed rows as one line with exit 2, and an
aligned teacher (another tokenizer) whose cache is masked in the student's positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from common.chat import ChatPackStats, pack_conversations
from tests.chat_helpers import PLAIN_TEMPLATE, sample_conversations, write_chat_corpus
from tests.helpers import (
    make_tiny_teacher,
    make_two_tokenizer_setup,
    one_error_line,
    sample_texts,
    train_tiny_tokenizer,
)

SEQ_LEN = 256


def _precompute(teacher, corpus, out, *extra):
    return CliRunner().invoke(main, ["precompute", "--teacher", str(teacher), "--dataset", str(corpus),
                                     "--output", str(out), "--seq-len", str(SEQ_LEN), "--top-k", "8",
                                     "--shard-size", "4", "--device", "cpu", "--batch-size", "4", "--no-progress",
                                     "--corpus-format", "chat", *map(str, extra)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = train_tiny_tokenizer(root / "tok", sample_texts(200), vocab_size=400)
    teacher = make_tiny_teacher(root / "teacher", 400, seed=2, tokenizer_dir=tok)
    convs = sample_conversations(40, seed=1, max_words=8)
    convs[3] = sample_conversations(1, seed=9, max_words=400)[0]  # longer than a window: refused
    corpus = write_chat_corpus(root / "chat.jsonl", convs)
    template = root / "template.jinja"
    template.write_text(PLAIN_TEMPLATE, encoding="utf-8")
    return dict(root=root, tok=tok, teacher=teacher, corpus=corpus, convs=convs, template=template)


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_chat_cache_stores_the_mask_and_boundaries_of_packing(setup, fmt):
    from transformers import AutoTokenizer

    from storage.reader import TeacherDataset

    out = setup["root"] / f"cache-{fmt}"
    r = _precompute(setup["teacher"], setup["corpus"], out, "--chat-template", setup["template"], "--format", fmt)
    assert r.exit_code == 0, r.output
    ds = TeacherDataset.open(str(out))
    m = ds.manifest
    assert m.loss_mask["column"] == "loss_mask" and m.loss_mask["boundaries"] == "doc_start"
    assert m.loss_mask["method"] == "offsets" and m.loss_mask["marks"] == "assistant"
    assert m.corpus["corpus_format"] == "chat"
    stats = ChatPackStats()
    tok = AutoTokenizer.from_pretrained(str(setup["tok"]))
    expected = list(pack_conversations(setup["convs"], tok, seq_len=SEQ_LEN, template=PLAIN_TEMPLATE, stats=stats))
    assert m.notes["packing"]["too_long"] == stats.too_long >= 1
    assert m.notes["packing"]["masked_positions"] == stats.masked_positions
    cols = ds.read_columns(np.arange(len(ds)), ["input_ids", "loss_mask", "doc_start"])
    for name in ("input_ids", "loss_mask", "doc_start"):
        np.testing.assert_array_equal(cols[name], np.concatenate([getattr(b, name) for b in expected]), err_msg=name)
    assert cols["loss_mask"].dtype == np.uint8 and 0 < cols["loss_mask"].mean() < 1
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    line = [x for x in shown.output.splitlines() if x.startswith("conversations")][0]
    assert "marks assistant replies" in line and f"{stats.too_long} refused (longer than seq_len)" in line


@pytest.mark.parametrize("row,needle", [
    ([{"role": "user", "content": "hi"}, {"content": "x"}], "message 1 has no role"),
    ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": 3}], "content of type int"),
    ([], "empty conversation"),
])
def test_malformed_row_is_one_line_naming_file_and_row(setup, tmp_path, row, needle):
    convs = sample_conversations(5, seed=2, max_words=8)
    convs.insert(4, row)
    corpus = write_chat_corpus(tmp_path / "bad.jsonl", convs)
    r = _precompute(setup["teacher"], corpus, tmp_path / "out", "--chat-template", setup["template"])
    one_error_line(r, f"{corpus}: row 4", needle, ignore=("Loading weights",))


def test_only_too_long_conversations_is_one_line(setup, tmp_path):
    corpus = write_chat_corpus(tmp_path / "long.jsonl", sample_conversations(2, seed=9, max_words=400))
    r = _precompute(setup["teacher"], corpus, tmp_path / "out", "--chat-template", setup["template"])
    one_error_line(r, "all 2 conversations are longer than seq_len 256", "--truncate-conversations",
                   ignore=("Loading weights",))
    r = _precompute(setup["teacher"], corpus, tmp_path / "cut", "--chat-template", setup["template"],
                    "--truncate-conversations")
    assert r.exit_code == 0, r.output


def test_tokenizer_without_template_is_one_line(setup, tmp_path):
    r = _precompute(setup["teacher"], setup["corpus"], tmp_path / "out")
    one_error_line(r, "no chat template", "--chat-template", ignore=("Loading weights",))
    r = CliRunner().invoke(main, ["precompute", "--teacher", str(setup["teacher"]), "--dataset", str(setup["corpus"]),
                                  "--output", str(tmp_path / "o2"), "--chat-template", str(setup["template"])])
    one_error_line(r, "need --corpus-format chat")


def test_aligned_chat_cache_is_masked_in_the_students_positions(tmp_path):
    """A teacher with another tokenizer scores the text rendered with S's template; the cache's ids, mask and
    boundaries are S's (equal to S's own packing), and its targets sit at S's positions (target_mask)."""
    from transformers import AutoTokenizer

    from storage.reader import TeacherDataset

    made = make_two_tokenizer_setup(tmp_path, texts=sample_texts(120, seed=4), s_vocab=400, t_vocab=320, t_seed=5,
                                    s_seed=6)
    convs = sample_conversations(24, seed=5, max_words=10)
    corpus = write_chat_corpus(tmp_path / "chat.jsonl", convs)
    template = tmp_path / "t.jinja"
    template.write_text(PLAIN_TEMPLATE, encoding="utf-8")
    r = _precompute(made.teacher_t, corpus, tmp_path / "aligned", "--align-tokenizer", made.s_dir,
                    "--chat-template", template)
    assert r.exit_code == 0, r.output
    r = _precompute(made.teacher_s, corpus, tmp_path / "plain", "--chat-template", template)
    assert r.exit_code == 0, r.output
    a, s = TeacherDataset.open(str(tmp_path / "aligned")), TeacherDataset.open(str(tmp_path / "plain"))
    assert a.manifest.loss_mask == s.manifest.loss_mask and a.manifest.alignment is not None
    s_tok = AutoTokenizer.from_pretrained(str(made.s_dir))
    expected = list(pack_conversations(convs, s_tok, seq_len=SEQ_LEN, template=PLAIN_TEMPLATE))
    rows = np.arange(len(a))
    got = a.read_columns(rows, ["input_ids", "loss_mask", "doc_start", "target_mask"])
    for name in ("input_ids", "loss_mask", "doc_start"):
        np.testing.assert_array_equal(got[name], np.concatenate([getattr(b, name) for b in expected]), err_msg=name)
        np.testing.assert_array_equal(got[name], s.read_columns(rows, [name])[name], err_msg=name)
    # the teacher has targets at most masked positions (where one of its tokens ends with S's)
    masked = got["loss_mask"] == 1
    assert got["target_mask"][masked].mean() > 0.5
    # joining the aligned and the plain cache checks the masks agree and trains on them (student/data.py)
    from student.data import join_teachers

    join_teachers([str(tmp_path / "plain"), str(tmp_path / "aligned")])
    assert json.loads((tmp_path / "aligned" / "manifest.json").read_text())["loss_mask"]["column"] == "loss_mask"
