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
    return root, made.s_dir


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
    from student.losses import sparse_kl

    root, _ = caches
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
    root, _ = caches
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
    root, s_dir = caches
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
    root, s_dir = caches
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
