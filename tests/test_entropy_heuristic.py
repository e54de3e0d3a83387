"""benchmarks/entropy_heuristic.py: its statistics against independent hand computations (float64)."""

from __future__ import annotations

import numpy as np

from tests.helpers import load_script


def _module():
    return load_script("benchmarks/entropy_heuristic.py")


def test_spearman_equals_the_rank_difference_formula():
    m = _module()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.6 * x + y  # correlated, no ties
    rx = np.empty(200)
    rx[np.argsort(x)] = np.arange(200)
    ry = np.empty(200)
    ry[np.argsort(y)] = np.arange(200)
    n = 200
    expected = 1.0 - 6.0 * ((rx - ry) ** 2).sum() / (n * (n * n - 1))
    assert abs(m.spearman(x, y) - expected) < 1e-12
    assert abs(m.spearman(x, np.exp(x)) - 1.0) < 1e-12  # any increasing transform
    assert abs(m.spearman(x, -x) + 1.0) < 1e-12


def test_figures_by_hand():
    m = _module()
    # two teachers, four positions: teacher 0 is the surer one at positions 0, 1 and 3
    h = np.array([[0.5, 1.0, 3.0, 0.2], [2.0, 2.0, 1.0, 0.2 + 1e-9]])
    p = np.array([[0.6, 0.1, 0.2, 0.5], [0.3, 0.4, 0.5, 0.5]])
    f = m.figures(p, h)
    # entropies differ by > 1e-6 at positions 0, 1, 2; the lower-entropy teacher has more p(o) at 0 and 2
    assert f["lower_entropy_wins"] == 2 / 3
    w = 1.0 / (h + 1e-3)
    alpha = w / w.sum(axis=0)
    assert np.allclose(f["alpha"], alpha.mean(axis=1), rtol=0, atol=1e-15)
    fused = (alpha * p).sum(axis=0)
    assert abs(f["nll_entropy_fused"] - float(np.mean(-np.log(fused)))) < 1e-14
    assert abs(f["nll_uniform_fused"] - float(np.mean(-np.log((p[0] + p[1]) / 2)))) < 1e-14
    assert np.allclose(f["ppl"], np.exp(-np.log(p).mean(axis=1)), rtol=1e-14, atol=0)


def test_bootstrap_resamples_whole_windows_and_brackets_the_estimate():
    m = _module()
    rng = np.random.default_rng(1)
    n_windows, per = 12, 30
    window = np.repeat(np.arange(n_windows), per)
    h = rng.uniform(0.5, 4.0, size=(2, n_windows * per))
    p = np.clip(np.exp(-h + rng.normal(scale=0.3, size=h.shape)), 1e-6, 1.0)  # low entropy, high p(o)
    r = m.bootstrap(p, h, window, n=200, seed=0)
    assert r["windows"] == n_windows and r["positions"] == n_windows * per
    for key in ("lower_entropy_wins", "nll_entropy_minus_uniform"):
        lo, hi = r["ci"][key]
        assert lo <= r["point"][key] <= hi
    assert r["point"]["lower_entropy_wins"] > 0.5  # built so that the surer teacher is right more often
    assert np.all(r["point"]["rho"] > 0.5)
    # one window only: every resample is that window, so the interval collapses onto the estimate
    one = m.bootstrap(p[:, :per], h[:, :per], window[:per], n=20, seed=0)
    assert one["ci"]["lower_entropy_wins"][0] == one["ci"]["lower_entropy_wins"][1] == one["point"]["lower_entropy_wins"]


def test_three_teachers_lowest_entropy_best_and_weight_loss_correlation_by_hand():
    m = _module()
    # three teachers, three positions; lowest entropy: teacher 0, 2, and a tie (< 1e-6) at position 2
    h = np.array([[0.5, 2.0, 1.0], [1.0, 3.0, 1.0 + 1e-9], [2.0, 1.0, 3.0]])
    p = np.array([[0.5, 0.2, 0.3], [0.4, 0.1, 0.6], [0.1, 0.3, 0.1]])
    f = m.figures(p, h)
    # position 0: teacher 0 lowest H and highest p (hit); position 1: teacher 2 lowest H and highest p (hit)
    assert f["lowest_entropy_best"] == 1.0
    p2 = p.copy()
    p2[:, 1] = [0.5, 0.1, 0.3]  # position 1: teacher 0 now has the most probability (miss)
    assert m.figures(p2, h)["lowest_entropy_best"] == 0.5
    w = 1.0 / (h + 1e-3)
    alpha = (w / w.sum(axis=0)).reshape(-1)
    nll = -np.log(p).reshape(-1)
    # Spearman by hand: Pearson correlation of the ranks (no ties among these nine values)
    ra, rn = np.argsort(np.argsort(alpha)).astype(float), np.argsort(np.argsort(nll)).astype(float)
    expected = np.corrcoef(ra, rn)[0, 1]
    assert abs(f["rho_alpha_nll"] - expected) < 1e-12
    assert f["rho_alpha_nll"] < 0  # here the weight goes to the teachers with the lower loss


def test_every_scheme_on_tiny_caches(tmp_path, monkeypatch):
    """The registry's schemes on three tiny caches (one without observed_logprob, one aligned): each scheme's
    fused NLL and top-weighted-is-best share equal a float64 computation from the caches' own p(o), and the
    table lists every scheme."""
    from pathlib import Path

    from student.weighting import NAMES, REGISTRY
    from tests.student.synthetic import make_cache

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # as when run as a script
    m = _module()
    paths = [str(make_cache(tmp_path / "a", name="a", seed=1, k=8, observed=True)),
             str(make_cache(tmp_path / "b", name="b", seed=2, k=64)),  # k = vocab: o is always listed
             str(make_cache(tmp_path / "c", name="c", seed=3, k=6, aligned=True))]
    names, p, h, window, counts = m.from_caches(paths)
    assert names == ["a", "b", "c"] and counts["left_out"] > 0  # c's masked / inexact positions
    alphas = m.scheme_weights(p, h, window, betas=(0.5, 4.0), floor=0.1, fixed=(1.0, 2.0, 1.0))
    labels = [n for n in NAMES if "weight_beta" not in REGISTRY[n].settings]
    labels += [f"{n} beta={b:g}" for n in NAMES if "weight_beta" in REGISTRY[n].settings for b in (0.5, 4.0)]
    assert sorted(alphas) == sorted(labels)
    for a in alphas.values():
        assert a.shape == p.shape and np.allclose(a.sum(axis=0), 1.0)
    # by hand, float64: min-ce per token puts all weight on argmax p; confidence is CA-MKD's formula
    np.testing.assert_allclose(alphas["min-ce"], (p == p.max(axis=0)) / (p == p.max(axis=0)).sum(axis=0))
    ce = -np.log(p)
    soft = np.exp(ce - ce.max(axis=0)) / np.exp(ce - ce.max(axis=0)).sum(axis=0)
    np.testing.assert_allclose(alphas["confidence"], (1 - soft) / 2, rtol=1e-12)
    w = p ** 4.0 / (p ** 4.0).sum(axis=0)
    np.testing.assert_allclose(alphas["tempered beta=4"], 0.1 / 3 + 0.9 * w, rtol=1e-10)
    # min-ce per sequence: the teacher with the best mean log p(o) over the window's scored positions
    for win in np.unique(window):
        cols = window == win
        best = np.argmax(np.log(p[:, cols]).mean(axis=1))
        assert (alphas["min-ce-seq"][:, cols].argmax(axis=0) == best).all()
    r = m.bootstrap(p, h, window, n=30, alphas=alphas)
    for label, a in alphas.items():
        assert r["point"][f"nll[{label}]"] == -np.log((a * p).sum(axis=0)).mean()
    assert r["point"]["top_best[min-ce]"] == 1.0
    uni = r["point"]["nll[uniform]"]
    for label in alphas:  # paired difference to uniform, with its interval around it
        if label != "uniform":
            assert r["point"][f"dnll[{label}]"] == r["point"][f"nll[{label}]"] - uni
            lo, hi = r["ci"][f"dnll[{label}]"]
            assert lo <= r["point"][f"dnll[{label}]"] <= hi
    assert "dnll[uniform]" not in r["point"] and r["point"]["dnll[min-ce]"] <= 0  # min-ce maximises p(o)
    assert np.isnan(r["point"]["top_best[uniform]"])
    top = alphas["entropy"].argmax(axis=0) == p.argmax(axis=0)
    assert r["point"]["top_best[entropy]"] == top.mean()  # entropy ties have measure zero here
    assert r["point"]["nll[entropy]"] == r["point"]["nll_entropy_fused"]
    text = m.table(names, r, counts)
    for label in alphas:
        assert f"| {label} |" in text
