"""paired_bootstrap: exact cases, the pairing, interval width and coverage on data with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import ConfigError
from student.stats import paired_bootstrap, perplexity_of_means


def test_constant_shift_has_a_zero_width_interval_and_same_inputs_give_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 1.0, size=40)
    r = paired_bootstrap(a, a + 0.25, n=500, seed=1)
    # every replicate draws the same windows for both models, so a constant shift is exactly -0.25
    assert r.estimate == pytest.approx(-0.25) and r.low == pytest.approx(-0.25) and r.high == pytest.approx(-0.25)
    assert r.excludes_zero()
    same = paired_bootstrap(a, a, n=200, seed=1)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()


def test_deterministic_per_seed_and_perplexity_statistic():
    rng = np.random.default_rng(1)
    a, b = rng.normal(4.0, 0.3, 30), rng.normal(4.2, 0.3, 30)
    r1 = paired_bootstrap(a, b, n=300, seed=7, stat=perplexity_of_means)
    assert r1 == paired_bootstrap(a, b, n=300, seed=7, stat=perplexity_of_means)
    assert r1 != paired_bootstrap(a, b, n=300, seed=8, stat=perplexity_of_means)
    assert r1.estimate == pytest.approx(math.exp(a.mean()) - math.exp(b.mean()))
    assert r1.low < r1.estimate < r1.high and (r1.replicates, r1.windows) == (300, 30)


def test_width_matches_the_paired_standard_error_and_pairing_removes_shared_noise():
    rng = np.random.default_rng(2)
    w = 400
    shared = rng.normal(0.0, 5.0, w)  # window difficulty, common to both models
    diff = rng.normal(0.1, 0.2, w)
    a, b = shared + diff, shared
    r = paired_bootstrap(a, b, n=4000, seed=0)
    expected = 2 * 1.96 * diff.std(ddof=1) / math.sqrt(w)
    assert r.high - r.low == pytest.approx(expected, rel=0.15)
    assert r.estimate == pytest.approx(diff.mean())
    # an unpaired interval would be ~25x wider (sd 5 vs 0.2): the pairing is what makes it narrow
    assert r.high - r.low < 0.1 * 2 * 1.96 * a.std(ddof=1) * math.sqrt(2 / w)


def test_coverage_of_the_true_difference():
    rng = np.random.default_rng(3)
    hits = 0
    trials = 200
    for t in range(trials):
        shared = rng.normal(0.0, 1.0, 60)
        a = shared + rng.normal(0.5, 1.0, 60)
        b = shared + rng.normal(0.0, 1.0, 60)
        r = paired_bootstrap(a, b, n=400, seed=t)
        hits += r.low <= 0.5 <= r.high
    assert 0.88 <= hits / trials <= 0.99, hits


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError):
        paired_bootstrap([1.0, 2.0], [1.0], n=10)
    with pytest.raises(ConfigError):
        paired_bootstrap([1.0], [1.0], n=10)
    with pytest.raises(ConfigError):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], n=0)


def test_strata_keep_their_sizes_in_every_resample():
    """With strata, each resample draws every stratum's windows from that stratum: a value that is constant
    within strata has the same mean in every resample (a point interval); without strata it does not."""
    a = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 3.0, 3.0])
    b = np.zeros_like(a)
    strata = np.array(["x", "x", "x", "y", "y", "y", "z", "z"])
    r = paired_bootstrap(a, b, n=500, seed=1, strata=strata)
    assert r.low == pytest.approx(a.mean()) and r.high == pytest.approx(a.mean())
    free = paired_bootstrap(a, b, n=500, seed=1)
    assert free.high - free.low > 0.5
    # one stratum draws exactly what no strata draws (same seed, same stat)
    one = paired_bootstrap(a, b, n=300, seed=4, strata=np.zeros(len(a)))
    assert (one.low, one.high) == (paired_bootstrap(a, b, n=300, seed=4).low, paired_bootstrap(a, b, n=300, seed=4).high)
    with pytest.raises(ConfigError):
        paired_bootstrap(a, b, n=10, strata=strata[:3])
