"""benchmarks/weighting_table.py at tiny scale: its rows, the choice of beta, the verdicts and the report, against
hand computations (no training)."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def wt():
    return load_script("benchmarks/weighting_table.py")


def test_rows_cover_every_scheme_but_fixed(wt):
    from student.weighting import REGISTRY

    rows = wt.scheme_rows((1.0, 4.0), 0.5)
    labels = [r.label for r in rows]
    assert labels[:5] == [
        "ce",
        "only-smollm2",
        "only-gemma3",
        "only-smollm2-scripture",
        "only-smollm2-python",
    ]
    schemes = [n for n, cls in REGISTRY.items() if "teacher_weights" not in cls.settings]
    for name in schemes:
        if "weight_beta" in REGISTRY[name].settings:
            assert {f"{name}-b1", f"{name}-b4"} <= set(labels)
        else:
            assert name in labels
    assert "fixed" not in labels and len(labels) == 5 + len(schemes) + 1  # tempered twice
    by = {r.label: r for r in rows}
    assert by["ce"].loss == {"lambda_kd": 0.0} and by["ce"].teachers == (0,)
    assert by["only-gemma3"].teachers == (1,) and by["only-gemma3"].loss == {"lambda_kd": 0.5}
    assert by["tempered-b4"].loss == {"lambda_kd": 0.5, "teacher_weighting": "tempered", "weight_beta": 4.0}
    assert by["min-ce-seq"].teachers == (0, 1, 2, 3)
    assert [r.label for r in wt.select(rows, ["uniform", "ce"])] == ["ce", "uniform"]  # table order
    with pytest.raises(SystemExit, match="unknown row"):
        wt.select(rows, ["uniform", "nope"])


def test_tempered_nll_by_hand_and_the_choice_of_beta(wt):
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.9, size=(3, 40))
    h = rng.uniform(0.5, 3.0, size=(3, 40))
    window = np.repeat(np.arange(4), 10)
    grid = (0.5, 1.0, 2.0, 4.0)
    nll = wt.tempered_nll(p, h, window, grid)
    for b in grid:
        w = p**b / (p**b).sum(axis=0)
        assert nll[f"tempered beta={b:g}"] == pytest.approx(-np.log((w * p).sum(axis=0)).mean(), rel=1e-10)
    assert nll["uniform"] == pytest.approx(-np.log(p.mean(axis=0)).mean(), rel=1e-12)
    assert nll["min-ce"] == pytest.approx(-np.log(p.max(axis=0)).mean(), rel=1e-12)
    # sum p^(b+1) / sum p^b grows with b: the observed-token NLL falls from uniform to min-ce
    values = [nll["uniform"], *(nll[f"tempered beta={b:g}"] for b in grid), nll["min-ce"]]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert wt.choose_betas(nll, grid) == (2.0, 4.0)
    fake = {f"tempered beta={b:g}": v for b, v in zip(grid, [0.3, 0.1, 0.2, 0.4], strict=True)}
    assert wt.choose_betas(fake, grid) == (1.0, 2.0)


def test_subset_counts_whole_windows(wt):
    p, h = np.ones((2, 7)), np.ones((2, 7))
    window = np.array([0, 0, 0, 1, 1, 2, 2])  # 3 windows of 4 scorable positions, 5 left out
    counts = {"windows": 3, "positions": 12, "left_out": 5}
    sp, sh, sw, sc = wt.subset(p, h, window, counts, window >= 1)
    assert sp.shape == (2, 4) and sw.tolist() == [1, 1, 2, 2]
    assert sc == {"windows": 2, "positions": 8, "left_out": 4}


def _scores(wt, values):
    res = {
        d: {
            "models": {
                lab: {"window_nll": v[d], "window_kl_fused": [x / 10 for x in v[d]]}
                for lab, v in values.items()
            }
        }
        for d in ("x", "y")
    }
    return wt.pt.Scores.from_results(res)


def test_best_single_is_chosen_on_every_seed(wt):
    """A single-teacher row that is lowest at seed 0 but not over its seeds is not the best single."""
    base = {"x": [3.0, 3.2, 3.1], "y": [4.0, 4.2, 4.1]}

    def shift(c):
        return {d: [v + c for v in w] for d, w in base.items()}

    vals = {"only-a-s0": shift(0.04), "only-a-s1": shift(0.5), "only-b-s0": shift(0.05), "only-b-s1": shift(0.06),
            "uniform-s0": shift(0.08), "uniform-s1": shift(0.08)}
    runs = {r: [f"{r}-s0", f"{r}-s1"] for r in ("only-a", "only-b", "uniform")}
    best, _ = wt.verdicts(_scores(wt, vals), runs, ["uniform"], ["only-a", "only-b"], 200)
    assert best == "only-b"


def test_verdicts_report_and_figure(wt, tmp_path):
    base = {"x": [3.0, 3.2, 3.1], "y": [4.0, 4.2, 4.1]}

    def shift(c, s=0.0):
        return {d: [v + c + s * i for i, v in enumerate(w)] for d, w in base.items()}

    vals = {}
    for s in (0, 1):
        vals[f"ce-s{s}"] = shift(0.3, 0.01 * s)
        vals[f"only-smollm2-s{s}"] = shift(0.1, 0.01 * s)
        vals[f"only-gemma3-s{s}"] = shift(0.05, 0.01 * s)  # the best single
        vals[f"uniform-s{s}"] = shift(0.08, 0.01 * s)
        vals[f"min-ce-s{s}"] = shift(0.0, 0.01 * s)  # lower than both in every window and seed
        vals[f"entropy-s{s}"] = shift(0.1, 0.01 * s)  # higher than both
    scores = _scores(wt, vals)
    runs = {
        r: [f"{r}-s0", f"{r}-s1"]
        for r in ("ce", "only-smollm2", "only-gemma3", "uniform", "min-ce", "entropy")
    }
    singles = ["only-smollm2", "only-gemma3", "only-smollm2-scripture"]  # a single that did not run
    best, comps = wt.verdicts(scores, runs, ["uniform", "min-ce", "entropy", "confidence"], singles, 200)
    assert best == "only-gemma3"
    assert set(comps) == {"uniform", "min-ce", "entropy"} and set(comps["uniform"]) == {"best"}
    assert comps["min-ce"]["best"].verdict == "holds" and comps["min-ce"]["uniform"].verdict == "holds"
    assert comps["entropy"]["best"].verdict == "does not hold"
    d = comps["min-ce"]["best"].result["difference"]
    ppl = [math.exp(np.mean(scores.row(runs[r]))) for r in ("min-ce", "only-gemma3")]
    assert d == pytest.approx(ppl[0] - ppl[1], rel=1e-9)
    lines = wt.verdict_lines(best, comps)
    assert "only-gemma3" in lines[0]
    assert lines[2].startswith("| uniform |") and lines[2].count("|") == lines[0].count("|")
    assert "**holds**" in lines[3] and lines[3].count("|") == lines[0].count("|")
    png = tmp_path / "w.png"
    wt.plot(scores, runs, comps, str(png), 100)
    assert png.stat().st_size > 0
    args = argparse.Namespace(
        train_tokens=18432,
        steps=40,
        batch_size=4,
        seq_len=256,
        lr=3e-4,
        lambda_kd=0.5,
        top_k=32,
        seeds=2,
        eval_tokens=2816,
        bootstrap=200,
        plot=str(png),
    )
    text = wt.markdown(
        args=args,
        argv=["--work", "w"],
        wall=60.0,
        betas=(2.0, 4.0),
        tune_nll={"tempered beta=2": 1.5, "tempered beta=4": 1.4},
        scores=scores,
        runs=runs,
        desc={"ce": "CE only"},
        best=best,
        comps=comps,
    )
    assert "`python benchmarks/weighting_table.py --work w`" in text and "betas 2, 4" in text
    assert "| min-ce |" in text and "| vs CE |" in text
    no_ce = {r: v for r, v in runs.items() if r != "ce"}
    text = wt.markdown(
        args=args,
        argv=[],
        wall=1.0,
        betas=(2.0, 4.0),
        tune_nll={},
        scores=scores,
        runs=no_ce,
        desc={},
        best=best,
        comps=comps,
    )
    assert "| vs only-smollm2 |" in text  # without CE, the first row is the reference, and says so
    args.heuristic_replicates = 100
    heur = wt.heuristic_markdown(
        args=args,
        argv=["--heuristic-only"],
        wall=6.0,
        betas=(2.0, 4.0),
        tune_nll={"uniform": 1.6},
        heur=[("t", "table")],
    )
    assert "uniform 1.6000 -> betas 2, 4" in heur and "*t*: table" in heur and "--heuristic-only" in heur
