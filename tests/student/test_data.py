"""Join checks, held-out split, sampler semantics and the fused batches of DistillDataset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.errors import ConfigError
from storage.errors import MismatchError
from student.data import (
    DistillDataset,
    EpochBatchSampler,
    check_weighting,
    collate,
    feature_layers,
    join_teachers,
    split_positions,
)
from student.fusion import fuse_topk, teacher_weights
from tests.student.synthetic import make_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    a = make_cache(root / "a", name="a", seed=1, k=8, pooled={2: 12})
    b = make_cache(root / "b", name="b", seed=2, k=5)
    return str(a), str(b)


def test_join_accepts_matching_teachers_with_different_k(caches):
    teachers = join_teachers(caches)
    assert [t.manifest.top_k for t in teachers] == [8, 5]


@pytest.mark.parametrize("change, field", [
    (dict(seq_len=12), "seq_len"),
    (dict(tokenizer_fingerprint="other"), "tokenizer_fingerprint"),
    (dict(corpus_fingerprint="other"), "corpus_fingerprint"),
    (dict(vocab=80), "vocab_size"),
    (dict(temperature=2.0), "temperature"),
    (dict(n=16), "seq_ids"),
    (dict(first_seq=8), "seq_ids"),
    (dict(tamper_input_seq=0), "input_ids"),
])
def test_join_refuses_mismatch_naming_the_field(caches, tmp_path, change, field):
    other = make_cache(tmp_path / "x", name="x", seed=3, **change)
    with pytest.raises(MismatchError) as e:
        join_teachers([caches[0], str(other)])
    assert e.value.field == field and field in str(e.value)


def test_input_ids_mismatch_outside_spot_check_is_caught_by_the_loader(caches, tmp_path):
    other = make_cache(tmp_path / "y", name="y", seed=3, tamper_input_seq=5)
    teachers = join_teachers([caches[0], str(other)], spot_check=0)
    ds = DistillDataset(teachers, np.arange(24), weighting="uniform")
    assert ds.__getitems__([1, 2]).mismatch is None
    assert ds.__getitems__([1, 5]).mismatch == 5


def test_entropy_weighting_refused_without_entropy(tmp_path):
    t = join_teachers([str(make_cache(tmp_path / "n", entropy=False))])
    with pytest.raises(ConfigError, match="entropy_kind 'absent'"):
        check_weighting(t, "entropy")
    check_weighting(t, "uniform")  # accepted


def test_feature_layers_warn_for_teachers_without_pooled_states(caches, caplog):
    teachers = join_teachers(caches)
    with caplog.at_level(logging.WARNING, logger="student"):
        assert feature_layers(teachers, None, True) == [2, None]
    assert "'b' stored no pooled states" in caplog.text
    with caplog.at_level(logging.WARNING, logger="student"):
        assert feature_layers(teachers, 7, True) == [None, None]
    assert "no pooled layer 7" in caplog.text
    assert feature_layers(teachers, None, False) == [None, None]


def test_split_is_disjoint_and_seeded():
    tr, ev = split_positions(100, eval_fraction=0.1, eval_sequences=None, split_seed=0)
    assert len(ev) == 10 and len(tr) == 90 and not set(tr) & set(ev) and set(tr) | set(ev) == set(range(100))
    tr2, ev2 = split_positions(100, eval_fraction=0.5, eval_sequences=7, split_seed=0)
    assert len(ev2) == 7 and np.array_equal(ev2, split_positions(100, eval_fraction=0, eval_sequences=7,
                                                                  split_seed=0)[1])
    with pytest.raises(ConfigError):
        split_positions(5, eval_fraction=0.0, eval_sequences=5, split_seed=0)


def test_default_held_out_set_is_capped():
    """5% of a 10B-token cache at seq_len 2048 (4.9M sequences) would be 244k held-out sequences; the
    default holds out at most 512, and an explicit --eval-sequences lifts the cap."""
    from student.config import EVAL_SEQUENCES_CAP, TrainConfig

    n = 10_000_000_000 // 2048
    cfg = TrainConfig(teacher_data=["x"], output="o")
    _, ev = split_positions(n, eval_fraction=cfg.eval_fraction, eval_sequences=cfg.eval_sequences, split_seed=0,
                            cap=EVAL_SEQUENCES_CAP)
    assert EVAL_SEQUENCES_CAP == 512 and len(ev) == 512
    _, small = split_positions(1000, eval_fraction=0.05, eval_sequences=None, split_seed=0, cap=512)
    assert len(small) == 50
    _, explicit = split_positions(n, eval_fraction=0.05, eval_sequences=2000, split_seed=0, cap=512)
    assert len(explicit) == 2000


def test_sampler_splits_ranks_like_one_big_batch():
    one = EpochBatchSampler(50, 6, seed=3)
    ranks = [EpochBatchSampler(50, 3, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(1)
    for big, *parts in zip(one, *ranks, strict=True):
        assert sorted(big) == sorted(parts[0] + parts[1]) and not set(parts[0]) & set(parts[1])
    assert len(one) == 8
    # epochs differ, resume at micro-batch 3 gives the tail of the same epoch
    one.set_epoch(2)
    full = list(one)
    one.set_epoch(1)
    assert list(one) != full
    one.set_epoch(2, start=3)
    assert list(one) == full[3:]


def test_dataset_batches_match_direct_fusion(caches):
    teachers = join_teachers(caches)
    ds = DistillDataset(teachers, np.arange(4, 20), weighting="entropy", pooled_layers=[2, None])
    assert ds.columns[1] == ["input_ids", "topk_ids", "topk_logprobs", "entropy"]
    loader = DataLoader(ds, batch_sampler=[[0, 3], [5, 1]], collate_fn=collate, num_workers=2)
    batches = list(loader)
    pos = np.array([4 + 5, 4 + 1])
    cols = [t.read_columns(pos, ["topk_ids", "topk_logprobs", "entropy", "input_ids"]) for t in teachers]
    n = 2 * 16
    ent = torch.from_numpy(np.stack([c["entropy"].reshape(n) for c in cols], 1))
    ref = fuse_topk([torch.from_numpy(c["topk_ids"]).reshape(n, -1) for c in cols],
                    [torch.from_numpy(c["topk_logprobs"]).reshape(n, -1) for c in cols],
                    teacher_weights(ent, "entropy"))
    got = batches[1]
    assert torch.equal(got.seq_ids, torch.tensor([9, 5]))
    assert torch.equal(got.input_ids, torch.from_numpy(cols[0]["input_ids"]).long())
    assert torch.equal(got.fused.ids, ref.ids) and torch.equal(got.fused.probs, ref.probs)
    assert torch.equal(got.fused.tail, ref.tail) and torch.equal(got.fused.weights, ref.weights)
    assert tuple(got.fused.sizes) == ref.sizes == (8, 5)
    assert got.pooled[0].shape == (2, 12) and got.pooled[1] is None
