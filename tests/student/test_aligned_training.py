"""Stage two with an aligned cache (a teacher with another tokenizer, written in the student's token space):
masked positions carry no KD from that teacher, the observed-token correction reaches the fused target, and
train-student trains from {S-tokenizer cache, aligned cache}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import make_two_tokenizer_setup, sample_texts_unicode  # noqa: E402


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from common.corpus import CorpusConfig
    from teachers.config import tiny
    from teachers.precompute import run_precompute

    root = tmp_path_factory.mktemp("aligned_training")
    made = make_two_tokenizer_setup(root, texts=sample_texts_unicode(60, seed=21), s_vocab=380, t_vocab=310,
                                    t_seed=8, s_seed=9)
    for name, teacher, align in (("plain_s", made.teacher_s, None), ("aligned", made.teacher_t, str(made.s_dir))):
        cfg = tiny(str(teacher), str(made.corpus), str(root / name),
                   corpus=CorpusConfig(dataset=str(made.corpus), max_tokens=32 * 24))
        cfg.teacher.align_tokenizer = align
        cfg.teacher.name = name
        run_precompute(cfg)
    return root, made.s_dir, made.teacher_s


def _batch(root, *, correction=True, tamper=False):
    from storage.reader import TeacherDataset
    from student.data import DistillDataset, join_teachers

    teachers = join_teachers([str(root / "plain_s"), str(root / "aligned")])
    if tamper:  # garbage wherever the aligned cache has no target: it must not reach the fused target
        aligned: TeacherDataset = teachers[1]
        read = aligned.read_columns

        def tampered(positions, columns):
            out = {k: v.copy() for k, v in read(positions, columns).items()}
            off = out["target_mask"] == 0
            g = np.random.default_rng(0)
            out["topk_ids"][off] = g.integers(0, 380, size=out["topk_ids"][off].shape)
            out["topk_logprobs"][off] = -g.random(out["topk_logprobs"][off].shape)
            if "entropy" in out:
                out["entropy"][off] = 1e-6  # would dominate an entropy weighting
            out["observed_logprob"][off] = -0.01
            return out

        aligned.read_columns = tampered
    ds = DistillDataset(teachers, np.arange(len(teachers[0])), weighting="entropy", observed_correction=correction)
    return ds.__getitems__(list(range(len(ds)))), teachers


def test_masked_positions_carry_no_kd(caches):
    from student.loss.terms import sparse_kl

    root, *_ = caches
    batch, teachers = _batch(root)
    fused = batch.fused
    mask = teachers[1].read_columns(np.arange(len(teachers[1])), ["target_mask"])["target_mask"].reshape(-1)
    off = torch.from_numpy(mask == 0)
    assert off.any() and (~off).any()
    alpha = fused.weights
    assert torch.all(alpha[off, 1] == 0) and torch.allclose(alpha[off, 0], torch.ones(int(off.sum())))
    assert torch.all(alpha[~off, 1] > 0)
    assert torch.all(fused.probs[off][:, fused.columns(1)] == 0)
    # the KD does not depend on what the aligned cache holds at its masked positions
    tampered, _ = _batch(root, tamper=True)
    logits = torch.randn(fused.ids.shape[0], 380, generator=torch.Generator().manual_seed(0))
    kd = sparse_kl(logits, fused, reduction="none")
    kd_t = sparse_kl(logits, tampered.fused, reduction="none")
    torch.testing.assert_close(kd, kd_t, rtol=0, atol=0)
    for key in ("ids", "probs", "tail", "weights"):
        torch.testing.assert_close(getattr(batch.fused, key), getattr(tampered.fused, key), rtol=0, atol=0)


def test_observed_correction_reaches_the_fused_target(caches):
    root, *_ = caches
    on, teachers = _batch(root, correction=True)
    off, _ = _batch(root, correction=False)
    cols = teachers[1].read_columns(np.arange(len(teachers[1])), ["input_ids", "observed_logprob"])
    obs = cols["observed_logprob"].reshape(-1)
    labels = np.roll(cols["input_ids"], -1, axis=1).reshape(-1)
    has = ~np.isnan(obs)
    assert has.any()
    f_on, f_off = on.fused, off.fused
    ids, probs = f_on.ids[:, f_on.columns(1)], f_on.probs[:, f_on.columns(1)]
    rows = np.flatnonzero(has)
    got = (probs[rows] * (ids[rows] == torch.from_numpy(labels[rows])[:, None])).sum(1)
    np.testing.assert_allclose(got.numpy(), np.exp(obs[rows]), rtol=1e-5)  # p(o) is the exact value
    tail_sum = probs[rows].sum(1) + f_on.tail[rows, 1]
    np.testing.assert_allclose(tail_sum.numpy(), 1.0, atol=1e-5)  # still a distribution
    # without the correction the first-token values stay; the plain teacher is untouched either way
    assert not torch.allclose(f_on.probs[:, f_on.columns(1)], f_off.probs[:, f_off.columns(1)])
    torch.testing.assert_close(f_on.probs[:, f_on.columns(0)], f_off.probs[:, f_off.columns(0)])
    assert not torch.allclose(f_on.weights, f_off.weights)  # the corrected entropy moves alpha


@pytest.mark.parametrize("correction", ["--observed-correction", "--no-observed-correction"])
def test_train_student_from_s_cache_and_aligned_cache(caches, tmp_path, correction):
    root, s_dir, _ = caches
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-student", "--teacher-data", str(root / "plain_s"), "--teacher-data",
                                  str(root / "aligned"), "--output", str(out), "--student", "tiny", "--tokenizer",
                                  str(s_dir), "--teacher-weighting", "entropy", "--max-steps", "3",
                                  "--batch-size", "4", "--eval-sequences", "4", "--eval-every", "3",
                                  "--num-workers", "0", "--device", "cpu", "--gamma-feat", "0.1", correction])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split", "train") == "train" and "kd" in x]
    assert train and all(np.isfinite(x["kd"]) and np.isfinite(x["loss"]) for x in train)
    assert (out / "final").exists()


def test_evaluate_reports_masked_positions_apart(caches, tmp_path):
    root, s_dir, _ = caches
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train-student", "--teacher-data", str(root / "plain_s"), "--teacher-data",
                                  str(root / "aligned"), "--output", str(out), "--student", "tiny", "--tokenizer",
                                  str(s_dir), "--max-steps", "1", "--batch-size", "4", "--eval-sequences", "4",
                                  "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["evaluate", "--student", str(out / "final"), "--teacher-data", str(root / "plain_s"),
                                  "--teacher-data", str(root / "aligned"), "--tokenizer", str(s_dir),
                                  "--bleu-prompts", "0", "--output", str(res)])
    assert r.exit_code == 0, r.output
    m = json.loads(res.read_text())["models"]["final"]
    from storage.reader import TeacherDataset

    aligned = TeacherDataset.open(str(root / "aligned"))
    n_mask = int(aligned.read_columns(np.arange(len(aligned)), ["target_mask"])["target_mask"].sum())
    total = len(aligned) * aligned.manifest.seq_len
    assert m["target_positions"]["plain_s"] == total and m["target_positions"]["aligned"] == n_mask < total
    assert m["positions_with_target"] == total  # the plain teacher has a target everywhere
    assert all(np.isfinite(v) for v in m["kl"].values()) and "positions with a target only" in r.output


def _evaluate(args: list[str], res: Path) -> dict:
    r = CliRunner().invoke(main, ["evaluate", *args, "--bleu-prompts", "0", "--output", str(res)])
    assert r.exit_code == 0, r.output
    return json.loads(res.read_text()) | {"output": r.output}


def test_evaluate_joins_live_teachers_to_caches_and_scores_the_aligned_teacher(caches, tmp_path):
    """A live teacher with the student's tokenizer scored on an aligned cache's windows gives what its own cache
    of those windows gives; the aligned cache takes the observed-token correction as training does, and reports
    its teacher's perplexity over the positions where the next token's log-prob is exact."""
    root, s_dir, teacher_s = caches
    common = ["--student", f"s={teacher_s}", "--tokenizer", str(s_dir), "--top-k", "8"]
    both_cached = _evaluate([*common, "--teacher-data", str(root / "aligned"), "--teacher-data",
                             str(root / "plain_s")], tmp_path / "a.json")
    mixed = _evaluate([*common, "--teacher-data", str(root / "aligned"), "--teacher", f"plain_s={teacher_s}"],
                      tmp_path / "b.json")
    assert mixed["teacher_source"] == "caches+models" and mixed["teachers"] == ["aligned", "plain_s"]
    a, b = both_cached["models"]["s"], mixed["models"]["s"]
    for t in ("aligned", "plain_s"):
        assert b["kl"][t] == pytest.approx(a["kl"][t], rel=1e-2, abs=1e-4)
    assert b["kl_fused"] == pytest.approx(a["kl_fused"], rel=1e-2, abs=1e-4)
    assert b["target_positions"] == a["target_positions"]
    assert mixed["models"]["plain_s"]["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)  # s is plain_s

    off = _evaluate([*common, "--teacher-data", str(root / "aligned"), "--no-observed-correction"],
                    tmp_path / "c.json")
    on = _evaluate([*common, "--teacher-data", str(root / "aligned")], tmp_path / "d.json")
    assert on["models"]["s"]["kl"]["aligned"] != pytest.approx(off["models"]["s"]["kl"]["aligned"], rel=1e-4)

    from storage.reader import TeacherDataset

    ds = TeacherDataset.open(str(root / "aligned"))
    obs = ds.read_columns(np.arange(len(ds)), ["observed_logprob"])["observed_logprob"].astype(np.float64)
    obs = obs[:, :-1][~np.isnan(obs[:, :-1])]  # the last position's next token is outside the window
    got = on["cache_teachers"]["aligned"]
    assert got["observed_positions"] == obs.size > 0
    assert got["positions"] == len(ds) * (ds.manifest.seq_len - 1)
    assert got["perplexity_observed"] == pytest.approx(float(np.exp(-obs.mean())), rel=1e-6)
    assert "aligned (teacher, aligned cache): perplexity" in on["output"]


def test_evaluate_refuses_a_live_teacher_named_like_a_cache(caches, tmp_path):
    root, s_dir, teacher_s = caches
    r = CliRunner().invoke(main, ["evaluate", "--student", str(teacher_s), "--tokenizer", str(s_dir),
                                  "--teacher-data", str(root / "aligned"), "--teacher", f"aligned={teacher_s}",
                                  "--bleu-prompts", "0"])
    assert r.exit_code != 0 and "two teachers share a name" in r.output and "Traceback" not in r.output
