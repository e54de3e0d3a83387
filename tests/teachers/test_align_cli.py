"""Aligned caches through the CLI: precompute --align-tokenizer, inspect, join rules, and every mismatch as
one `error:` line with exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import make_two_tokenizer_setup, one_error_line, sample_texts_unicode  # noqa: E402


def _precompute(teacher, corpus, out, *extra):
    return CliRunner().invoke(main, ["precompute", "--teacher", str(teacher), "--dataset", str(corpus),
                                     "--output", str(out), "--seq-len", "32", "--top-k", "8", "--shard-size", "4",
                                     "--max-tokens", str(32 * 12), "--device", "cpu", "--batch-size", "4",
                                     "--no-progress", *map(str, extra)])



def _fails_with(result, *needles: str) -> str:
    # transformers may draw its "Loading weights" bar on stderr first; the error is the one other line
    return one_error_line(result, *needles, ignore=("Loading weights",))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_cli")
    made = make_two_tokenizer_setup(root, texts=sample_texts_unicode(60, seed=11), s_vocab=400, t_vocab=320,
                                    t_seed=5, s_seed=6)
    for teacher, out, extra in ((made.teacher_t, "aligned", ("--align-tokenizer", made.s_dir)),
                                (made.teacher_s, "plain_s", ()), (made.teacher_t, "plain_t", ())):
        r = _precompute(teacher, made.corpus, root / out, *extra)
        assert r.exit_code == 0, r.output
    return dict(root=root, **vars(made))


def test_aligned_cache_shares_windows_and_token_space_with_s(caches):
    from storage.reader import TeacherDataset

    root = caches["root"]
    a, s, t = (TeacherDataset.open(str(root / n)) for n in ("aligned", "plain_s", "plain_t"))
    assert a.manifest.tokenizer_fingerprint == s.manifest.tokenizer_fingerprint
    assert a.manifest.alignment["teacher_tokenizer_fingerprint"] == t.manifest.tokenizer_fingerprint
    assert a.manifest.schema_version == s.manifest.schema_version == 2  # every new cache is schema 2
    assert "alignment" not in json.loads((root / "plain_s" / "manifest.json").read_text())  # plain: v1 layout
    assert a.manifest.vocab_size == s.manifest.vocab_size == 400
    np.testing.assert_array_equal(a.seq_ids, s.seq_ids)
    rows = np.arange(len(a))
    np.testing.assert_array_equal(a.read_columns(rows, ["input_ids"])["input_ids"],
                                  s.read_columns(rows, ["input_ids"])["input_ids"])
    # pooled states stay the teacher's own (width of teacher T)
    assert a.manifest.pooled_dims == t.manifest.pooled_dims


def test_inspect_reports_alignment(caches):
    r = CliRunner().invoke(main, ["inspect", str(caches["root"] / "aligned"), "--rows", "1", "--position", "2"])
    assert r.exit_code == 0, r.output
    assert "schema v2" in r.output and "coverage" in r.output and "whole S tokens" in r.output
    assert "target_mask" in r.output and "observed_logprob" in r.output and "observed log-prob" in r.output
    cov = float(r.output.split("coverage")[1].split("%")[0])
    assert 30 < cov < 100


def test_join_rules(caches):
    from student.data import join_teachers

    root = caches["root"]
    joined = join_teachers([str(root / "plain_s"), str(root / "aligned")])
    assert len(joined) == 2 and joined[1].manifest.aligned
    from storage.errors import MismatchError

    with pytest.raises(MismatchError, match="different token spaces"):
        join_teachers([str(root / "aligned"), str(root / "plain_t")])


def test_mismatches_are_one_line_exit_2(caches, tmp_path):
    root, s_dir, teacher_t, corpus = caches["root"], caches["s_dir"], caches["teacher_t"], caches["corpus"]
    train = ["train-student", "--output", str(tmp_path / "run"), "--student", "tiny", "--max-steps", "1",
             "--batch-size", "2", "--eval-sequences", "2", "--num-workers", "0", "--device", "cpu"]
    # mixing token spaces: an aligned cache beside a cache in the teacher's own token space
    _fails_with(CliRunner().invoke(main, [*train, "--teacher-data", str(root / "aligned"),
                                          "--teacher-data", str(root / "plain_t")]),
                "different token spaces", "aligned to tokenizer", "--align-tokenizer")
    # a student tokenizer that is not S
    _fails_with(CliRunner().invoke(main, [*train, "--teacher-data", str(root / "plain_s"), "--teacher-data",
                                          str(root / "aligned"), "--tokenizer", str(caches["t_dir"])]),
                "tokenizer_fingerprint")
    # a student whose vocab is not S's
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 333, "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                               "max_position_embeddings": 64}))
    _fails_with(CliRunner().invoke(main, [*train[:4], str(cfg), *train[5:], "--teacher-data",
                                          str(root / "aligned")]), "vocab_size", "333")
    # the vllm backend does not align
    _fails_with(_precompute(teacher_t, corpus, tmp_path / "v", "--backend", "vllm", "--align-tokenizer", s_dir),
                "vllm backend cannot align tokenizers")
    _fails_with(_precompute(teacher_t, corpus, tmp_path / "g", "--align-gguf-file", "x.gguf"),
                "--align-gguf-file needs --align-tokenizer")
    _fails_with(_precompute(teacher_t, corpus, tmp_path / "m", "--align-tokenizer", tmp_path / "missing"),
                "cannot load tokenizer")
    # resuming an aligned run against another alignment tokenizer, or as a plain run
    _fails_with(_precompute(teacher_t, corpus, root / "aligned", "--align-tokenizer", caches["t_dir"]),
                "this run and the earlier run")
    _fails_with(_precompute(teacher_t, corpus, root / "aligned"), "this run and the earlier run")


def test_unalignable_student_tokenizer(caches, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "[SEP]": 1, "the": 2, "##s": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", eos_token="[SEP]").save_pretrained(tmp_path / "wp")
    _fails_with(_precompute(caches["teacher_t"], caches["corpus"], tmp_path / "o", "--align-tokenizer",
                            tmp_path / "wp"), "cannot align a tokenizer whose decoder is")


@pytest.mark.slow
def test_slices_give_the_same_shards_and_statistics(caches):
    import hashlib

    from storage.reader import TeacherDataset

    root = caches["root"]
    out = root / "sliced"
    for index in (0, 1):
        r = _precompute(caches["teacher_t"], caches["corpus"], out, "--align-tokenizer", caches["s_dir"],
                        "--num-slices", 2, "--slice-index", index)
        assert r.exit_code == 0, r.output

    def hashes(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("shard-*.parquet"))}

    assert hashes(out) == hashes(root / "aligned") and len(hashes(out)) >= 3
    merged, whole = TeacherDataset.open(str(out)).manifest, TeacherDataset.open(str(root / "aligned")).manifest
    assert merged.alignment == whole.alignment
    assert merged.alignment_totals() == whole.alignment_totals()


def test_teacher_windows_beyond_its_positions_are_refused(caches, tmp_path):
    """--seq-len counts S tokens; the aligned teacher runs on its own tokens of the window, which may be more.
    Its positions bound its own token count: a window it would see past them is refused before that batch
    runs, so no target past the positions is written (shards finished earlier stay recorded)."""
    import shutil

    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher_short"
    shutil.copytree(caches["teacher_t"], teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["max_position_embeddings"] = 16  # below the T tokens of a 32-token S window of this corpus
    (teacher / "config.json").write_text(json.dumps(config))
    s_tok, t_tok = (AutoTokenizer.from_pretrained(str(caches[d])) for d in ("s_dir", "t_dir"))
    text = json.loads(Path(caches["corpus"]).read_text().splitlines()[0])["text"]
    assert len(t_tok(s_tok.decode(s_tok(text)["input_ids"][:32]))["input_ids"]) > 16  # the premise
    out = tmp_path / "aligned_short"
    line = _fails_with(_precompute(teacher, caches["corpus"], out, "--align-tokenizer", caches["s_dir"]),
                       "teacher tokens", "max_position_embeddings 16", "--seq-len")
    assert "seq id 0" in line, line
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()
