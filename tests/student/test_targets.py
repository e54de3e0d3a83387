"""The one targets path (student/targets.py): evaluate's fused target equals training's for every weighting
scheme; log p(o) is the stored exact value where a cache has it and the top-k value or the bound log(tail)
elsewhere, counted; old caches without the column still train, with the fallback logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from storage.reader import TeacherDataset
from student.config import LossConfig, tiny
from student.data import DistillDataset, join_teachers
from student.evaluation import EvalConfig
from student.evaluation.sources import open_caches
from student.targets import (
    OBSERVED_SOURCES,
    cache_columns,
    cache_views,
    fuse,
    listed_observed,
    observed_counts,
    with_loss_mask,
)
from student.weighting import NAMES, WeightSettings, scheme
from tests.student.synthetic import make_cache

B = 5


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A new top-k cache (with observed_logprob), an old one (without), an aligned one (exact log p(o) at part of
    its target positions)."""
    root = tmp_path_factory.mktemp("targets")
    return [str(make_cache(root / "new", name="new", seed=1, k=8, observed=True)),
            str(make_cache(root / "old", name="old", seed=2, k=5)),
            str(make_cache(root / "aligned", name="aligned", seed=3, k=6, aligned=True))]


def _settings(**kw) -> dict:
    return dict(teacher_weights=(0.5, 0.3, 0.2), entropy_eps=0.37, weight_beta=2.5, weight_floor=0.1) | kw


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_fuses_exactly_as_training(caches, name):
    """The held-out batch evaluate builds (`HeldOut.batch` + `fuse`, settings from `EvalConfig`) equals the
    batch training's loader builds (`DistillDataset`, settings from `LossConfig`), bit for bit."""
    kw = _settings()
    loss = LossConfig(teacher_weighting=name, teacher_weights=kw["teacher_weights"] if name == "fixed" else None,
                      entropy_eps=kw["entropy_eps"], weight_beta=kw["weight_beta"], weight_floor=kw["weight_floor"])
    teachers = join_teachers(caches)
    train = DistillDataset(teachers, np.arange(B), weighting=name, settings=loss.weight_settings())[list(range(B))]
    cfg = EvalConfig(students=["s"], teacher_data=caches, teacher_weighting=name,
                     teacher_weights=list(kw["teacher_weights"]) if name == "fixed" else None,
                     entropy_eps=kw["entropy_eps"], weight_beta=kw["weight_beta"], weight_floor=kw["weight_floor"],
                     batch_size=B)
    weighting = cfg.weighting()
    held = open_caches(caches, weighting, "off", None, B)
    ids, views = held.batch(0, weighting, cfg.observed_correction)
    fused = fuse(views, weighting, held.seq_len)
    assert torch.equal(ids, train.input_ids)
    for field in ("ids", "probs", "tail", "weights"):
        assert torch.equal(getattr(fused, field), getattr(train.fused, field)), field
    assert fused.sizes == train.fused.sizes
    if name == "entropy":  # --entropy-eps reaches both: another eps gives other weights
        other = DistillDataset(teachers, np.arange(B), weighting=name)[list(range(B))]
        assert not torch.allclose(other.fused.weights, train.fused.weights)


def _dense(seed: int, n: int = 24, seq_len: int = 16, vocab: int = 64, data_seed: int = 123):
    """The float64 dense log-probs [n, L, V] and input_ids [n, L] `make_cache` draws its targets from."""
    ids = np.random.default_rng(data_seed).integers(0, vocab, size=(n, seq_len))
    logits = np.random.default_rng(seed).normal(size=(n, seq_len, vocab)) * (1.5 + seed % 3)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True)), ids


def test_observed_logprob_sources_and_counts(caches):
    """new: exact everywhere (the dense value); old: o's top-k value where listed, else the bound
    log(min(tail, smallest listed p)) >= the dense value; aligned: exact where stored, else projected. NaN at every
    window's last position; the counts say which is which over the positions with a target."""
    teachers = [TeacherDataset.open(p) for p in caches]
    weighting = scheme("min-ce")
    cols = [t.read_columns(np.arange(B), cache_columns(t.manifest, weighting, observed_correction=True))
            for t in teachers]
    assert ["observed_logprob" in c for c in cols] == [True, False, True]
    views = cache_views(cols, [t.manifest for t in teachers], weighting, observed_correction=True)
    seq_len = teachers[0].manifest.seq_len
    for view, seed in zip(views, (1, 2, 3), strict=True):
        logp, ids = _dense(seed)
        dense = np.take_along_axis(logp[:B, :-1], ids[:B, 1:, None], -1)[..., 0]  # [B, L-1] float64
        obs = view.observed.reshape(B, seq_len).double().numpy()
        assert np.isnan(obs[:, -1]).all() and not np.isnan(obs[:, :-1]).any()
        got = dict(zip(OBSERVED_SOURCES, view.observed_counts.tolist(), strict=True))
        if seed == 1:
            np.testing.assert_allclose(obs[:, :-1], dense, rtol=1e-6, atol=1e-6)
            assert got == {"exact": B * (seq_len - 1), "listed": 0, "bounded": 0}
        if seed == 2:
            top = np.argsort(-logp[:B], axis=-1)[..., :5]
            listed = (top[:, :-1] == ids[:B, 1:, None]).any(-1)
            np.testing.assert_allclose(obs[:, :-1][listed], dense[listed], rtol=1e-6, atol=1e-6)
            assert (obs[:, :-1][~listed] >= dense[~listed] - 1e-6).all()  # an upper bound
            p_top = np.exp(np.sort(logp[:B], axis=-1)[..., -5:][:, :-1])  # [B, L-1, 5]
            bound = np.log(np.minimum(1.0 - p_top.sum(-1), p_top.min(-1)))
            np.testing.assert_allclose(obs[:, :-1][~listed], bound[~listed], rtol=1e-4, atol=1e-4)
            assert got == {"exact": 0, "listed": int(listed.sum()), "bounded": int((~listed).sum())}
        if seed == 3:
            mask = cols[2]["target_mask"].astype(bool)[:, :-1]
            stored = cols[2]["observed_logprob"][:, :-1]
            exact = mask & ~np.isnan(stored)
            np.testing.assert_allclose(obs[:, :-1][exact], dense[exact], rtol=1e-6, atol=1e-6)
            assert got["exact"] == int(exact.sum()) and sum(got.values()) == int(mask.sum())
            assert got["listed"] + got["bounded"] == int((mask & np.isnan(stored)).sum()) > 0


def test_observed_counts_follow_the_loss_mask(caches):
    """A conversation's loss mask removes its prompt positions from the logged log p(o) sources too: the counts
    after `with_loss_mask` are those of the masked positions where the teacher has a target, per source."""
    teachers = [TeacherDataset.open(p) for p in caches]
    weighting = scheme("min-ce")
    cols = [t.read_columns(np.arange(B), cache_columns(t.manifest, weighting, observed_correction=True))
            for t in teachers]
    views = cache_views(cols, [t.manifest for t in teachers], weighting, observed_correction=True)
    seq_len = teachers[0].manifest.seq_len
    mask = torch.from_numpy(np.random.default_rng(7).random(B * seq_len) < 0.4)
    masked = with_loss_mask(views, mask)
    for view, after in zip(views, masked, strict=True):
        source = view.observed_source.long()
        valid = mask & (torch.ones_like(mask) if view.valid is None else view.valid)
        want = [int((valid & (source == i)).sum()) for i in range(len(OBSERVED_SOURCES))]
        assert after.observed_counts.tolist() == want
        assert sum(want) < int(view.observed_counts.sum())  # the prompt positions are gone
    assert observed_counts(masked).tolist() == [v.observed_counts.tolist() for v in masked]


def test_listed_observed_against_float64():
    """The fallback read off a list, against a float64 loop: o's own log-prob, or log min(tail, min p)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(40, 30, generator=g, dtype=torch.float64) * 2, dim=-1)
    top = logp.topk(6, dim=-1)
    labels = torch.randint(0, 30, (40,), generator=g)
    got, bounded = listed_observed(top.indices, top.values.float(), labels, tailless=False)
    for r in range(40):
        ids = top.indices[r].tolist()
        if int(labels[r]) in ids:
            want = float(logp[r, labels[r]])
            assert not bounded[r]
        else:
            p = top.values[r].exp()
            want = float(torch.minimum(1.0 - p.sum(), p.min()).log())
            assert bounded[r] and want >= float(logp[r, labels[r]])
        assert float(got[r]) == pytest.approx(want, rel=1e-5, abs=1e-5)
    _, tailless_bounded = listed_observed(top.indices, top.values.float(), labels, tailless=True)
    got_tailless, _ = listed_observed(top.indices, top.values.float(), labels, tailless=True)
    assert torch.isneginf(got_tailless[tailless_bounded]).all()  # a sampled list has no bound: p(o) = 0


def test_old_caches_train_with_the_fallback_logged(caches, tmp_path, caplog):
    """An old cache (no observed_logprob) trains under an observed-token weighting: a warning at setup, and the
    bounded positions per teacher in the log at the end."""
    from student.trainer import run_train

    cfg = tiny(caches[:2], str(tmp_path / "run"), max_steps=2, eval_every=0, log_every=1, eval_sequences=2,
               loss=LossConfig(teacher_weighting="confidence"))
    with caplog.at_level(logging.INFO, logger="student"):
        run_train(cfg)
    text = caplog.text
    assert "teacher 'old'" in text and "has no observed_logprob column" in text
    lines = [r.getMessage() for r in caplog.records if "training positions:" in r.message]
    assert len(lines) == 2 and "bounded" in lines[1] and "exact 0 " in lines[1]
    assert "listed 0 " in lines[0] and "bounded 0 " in lines[0]


def test_weight_settings_reach_the_loader(caches):
    """tempered at beta 0 is uniform whatever the floor; at a large beta it is min-ce."""
    teachers = join_teachers(caches[:2])

    def get(name: str, **kw: float) -> torch.Tensor:
        return DistillDataset(teachers, np.arange(B), weighting=name,
                              settings=WeightSettings(**kw))[list(range(B))].fused.weights

    torch.testing.assert_close(get("tempered", weight_beta=0.0, weight_floor=0.3), get("uniform"))
    torch.testing.assert_close(get("tempered", weight_beta=1e6), get("min-ce"))
