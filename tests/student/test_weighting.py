"""Every teacher-weighting scheme against a naive float64 reference (a loop over positions): validity masks,
ties, a teacher with p(o) = 0, K = 1, unknown o; the registry's settings checks and CLI; no scheme name
compared outside student/weighting.py."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from student.weighting import (
    NAMES,
    REGISTRY,
    WeightInputs,
    WeightSettings,
    check_settings,
    scheme,
)

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = WeightSettings(teacher_weights=(0.5, 0.2, 0.3), entropy_eps=0.05, weight_beta=1.7, weight_floor=0.1)


def _uniform(valid: list[int], k: int) -> np.ndarray:
    w = np.zeros(k)
    if valid:
        w[valid] = 1.0 / len(valid)
    return w


def _ties(score: np.ndarray, valid: list[int], k: int) -> np.ndarray:
    """1/m on the m valid teachers with the best score (-inf counts; all -inf: all tie)."""
    best = max(score[j] for j in valid)
    top = [j for j in valid if score[j] == best]
    return _uniform(top, k)


def reference(name: str, s: WeightSettings, *, observed: np.ndarray | None, entropy: np.ndarray | None,
              valid: np.ndarray, seq_len: int) -> np.ndarray:
    """float64 alpha [N, K] of scheme `name`, one position at a time."""
    n, k = valid.shape
    out = np.zeros((n, k))
    if name == "min-ce-seq":
        for b in range(n // seq_len):
            rows = range(b * seq_len, (b + 1) * seq_len)
            score = np.full(k, -np.inf)
            for j in range(k):
                vals = [observed[r, j] for r in rows if valid[r, j] and not math.isnan(observed[r, j])]
                if vals:
                    score[j] = sum(vals) / len(vals)
            for r in rows:
                v = [j for j in range(k) if valid[r, j]]
                if v:
                    out[r] = _ties(score, v, k)
        return out
    for r in range(n):
        v = [j for j in range(k) if valid[r, j]]
        if not v:
            continue
        if name == "uniform":
            out[r] = _uniform(v, k)
        elif name == "fixed":
            w = np.zeros(k)
            w[v] = np.asarray(s.teacher_weights)[v]
            out[r] = w / w.sum() if w.sum() > 0 else 0.0
        elif name == "entropy":
            w = np.zeros(k)
            w[v] = 1.0 / (np.maximum(entropy[r, v], 0.0) + s.entropy_eps)
            out[r] = w / w.sum()
        elif any(math.isnan(observed[r, j]) for j in v):  # o unknown: uniform
            out[r] = _uniform(v, k)
        elif name == "confidence":
            if len(v) == 1:
                out[r, v[0]] = 1.0
                continue
            ce = np.array([-observed[r, j] for j in v])
            if np.isinf(ce).any():
                soft = np.isinf(ce) / np.isinf(ce).sum()
            else:
                e = np.exp(ce - ce.max())
                soft = e / e.sum()
            out[r, v] = (1.0 - soft) / (len(v) - 1)
        elif name == "tempered":
            lp = np.array([observed[r, j] for j in v])
            if s.weight_beta == 0.0:
                a = np.full(len(v), 1.0 / len(v))
            elif np.isneginf(lp).all():
                a = np.full(len(v), 1.0 / len(v))
            else:
                e = np.exp(s.weight_beta * (lp - lp.max()))
                a = e / e.sum()
            out[r, v] = s.weight_floor / len(v) + (1.0 - s.weight_floor) * a
        elif name == "min-ce":
            out[r] = _ties(observed[r], v, k)
        else:
            raise AssertionError(name)
    return out


def _alpha(name: str, s: WeightSettings, *, observed, entropy, valid, seq_len, dtype=torch.float32) -> torch.Tensor:
    k = valid.shape[1]

    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.tensor(a, dtype=dtype)

    return scheme(name, s).alpha(WeightInputs(num_teachers=k, seq_len=seq_len, valid=torch.tensor(valid),
                                              entropy=t(entropy), observed=t(observed), rows=valid.shape[0]))


def _inputs(seed: int, b: int = 3, seq_len: int = 6, k: int = 3):
    """Random log p(o) [N, K] (NaN at each window's last position, some p = 0), entropies (NaN where not
    valid), a validity mask with rows of 0, 1, 2 and 3 valid teachers."""
    rng = np.random.default_rng(seed)
    n = b * seq_len
    lp = np.log(rng.random((n, k)) ** 3)
    lp[rng.random((n, k)) < 0.1] = -np.inf
    lp.reshape(b, seq_len, k)[:, -1] = np.nan
    valid = rng.random((n, k)) < 0.7
    valid[0] = False
    valid[1] = [True, False, False]
    ent = rng.random((n, k)) * 5
    ent[~valid] = np.nan
    lp_garbage = np.where(valid, lp, rng.normal(size=(n, k)))  # what invalid entries hold must not matter
    return lp, lp_garbage, ent, valid, seq_len


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_scheme_matches_the_float64_reference_with_masks(name, seed):
    lp, lp_garbage, ent, valid, seq_len = _inputs(seed)
    for s in (SETTINGS, WeightSettings(teacher_weights=(1.0, 0.0, 2.0), weight_beta=0.0),
              WeightSettings(teacher_weights=(1.0, 1.0, 1.0), weight_beta=40.0, weight_floor=0.0)):
        want = reference(name, s, observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
        got = _alpha(name, s, observed=lp_garbage, entropy=ent, valid=valid, seq_len=seq_len)
        assert got.dtype == torch.float32 and got.shape == valid.shape
        torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-6)
        got64 = _alpha(name, s, observed=lp, entropy=ent, valid=valid, seq_len=seq_len, dtype=torch.float64)
        assert got64.dtype == torch.float64
        torch.testing.assert_close(got64, torch.from_numpy(want), rtol=1e-12, atol=1e-12)
        assert (got[~torch.tensor(valid)] == 0).all()  # no target: weight 0
        sums = got.sum(1)
        has = torch.tensor(valid.any(1))
        if name != "fixed":  # fixed weights may be 0 for every valid teacher
            torch.testing.assert_close(sums[has], torch.ones(int(has.sum())))
        assert (sums[~has] == 0).all()


def test_min_ce_seq_ignores_invalid_positions_of_its_teachers():
    """The per-sequence mean runs over each teacher's own valid positions with a known o: garbage elsewhere
    (here a huge log-prob) must not win the sequence."""
    lp, _, ent, valid, seq_len = _inputs(5)
    want = reference("min-ce-seq", SETTINGS, observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
    garbage = np.where(valid, lp, 0.0)  # log p = 0 (p = 1) where the teacher has no target
    got = _alpha("min-ce-seq", SETTINGS, observed=garbage, entropy=ent, valid=valid, seq_len=seq_len)
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["confidence", "tempered", "min-ce", "min-ce-seq"])
def test_a_teacher_with_p_zero(name):
    """p_1(o) = 0 everywhere: confidence gives it 0 and the other two 1/2, tempered (floor f) f/3, min-ce never
    picks it; when every teacher has p(o) = 0 they tie (uniform)."""
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.5, 0.0, 0.2], [0.0, 0.0, 0.0], [0.3, 0.0, 0.3], [np.nan, np.nan, np.nan]]))
    valid = np.ones_like(lp, dtype=bool)
    s = WeightSettings(weight_beta=2.0, weight_floor=0.3)
    got = _alpha(name, s, observed=lp, entropy=None, valid=valid, seq_len=4 if name == "min-ce-seq" else 1)
    want = reference(name, s, observed=lp, entropy=None, valid=valid, seq_len=4 if name == "min-ce-seq" else 1)
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-6, atol=1e-7)
    assert torch.isfinite(got).all()
    if name == "confidence":
        assert got[0].tolist() == pytest.approx([0.5, 0.0, 0.5]) and got[1].tolist() == pytest.approx([1 / 3] * 3)
    if name == "tempered":
        assert got[0, 1] == pytest.approx(0.1)
    if name in ("min-ce", "min-ce-seq"):
        assert got[:, 1].max() < 1 / 3 + 1e-6  # teacher 1 never leads
    if name == "min-ce":
        assert got[2].tolist() == pytest.approx([0.5, 0.0, 0.5])  # a tie shares


@pytest.mark.parametrize("name", NAMES)
def test_k_equals_one_gives_weight_one(name):
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.2], [1e-30], [0.0], [np.nan]]))
    s = WeightSettings(teacher_weights=(2.0,) if name == "fixed" else None)
    valid = np.array([[True], [True], [True], [False]])
    got = _alpha(name, s, observed=lp, entropy=np.array([[1.0], [0.0], [3.0], [np.nan]]), valid=valid, seq_len=4)
    assert got[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", NAMES)
def test_ties_share_equally_and_teacher_order_does_not_matter(name):
    """Teachers 0 and 2 are identical: they get equal weight, and permuting the teachers permutes alpha."""
    lp, _, ent, valid, seq_len = _inputs(7)
    lp[:, 2], ent[:, 2], valid[:, 2] = lp[:, 0], ent[:, 0], valid[:, 0]
    s = WeightSettings(teacher_weights=(0.4, 0.2, 0.4) if name == "fixed" else None, weight_beta=3.0)
    got = _alpha(name, s, observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
    torch.testing.assert_close(got[:, 0], got[:, 2])
    perm = [2, 0, 1]
    s_perm = WeightSettings(teacher_weights=tuple(s.teacher_weights[p] for p in perm) if s.teacher_weights else None,
                            weight_beta=3.0)
    got_perm = _alpha(name, s_perm, observed=lp[:, perm], entropy=ent[:, perm], valid=valid[:, perm], seq_len=seq_len)
    torch.testing.assert_close(got_perm, got[:, perm])


def test_tempered_spans_uniform_to_min_ce():
    lp, _, ent, valid, seq_len = _inputs(3)
    uniform = _alpha("uniform", SETTINGS, observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
    min_ce = _alpha("min-ce", SETTINGS, observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
    at0 = _alpha("tempered", WeightSettings(weight_beta=0.0), observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
    big = _alpha("tempered", WeightSettings(weight_beta=1e6), observed=lp, entropy=ent, valid=valid, seq_len=seq_len)
    torch.testing.assert_close(at0, uniform)
    torch.testing.assert_close(big, min_ce)
    half = _alpha("tempered", WeightSettings(weight_beta=1e6, weight_floor=0.5), observed=lp, entropy=ent,
                  valid=valid, seq_len=seq_len)
    torch.testing.assert_close(half, 0.5 * uniform + 0.5 * min_ce)


def test_confidence_is_the_ca_mkd_formula_without_masks():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625]], dtype=torch.float64)
    ce = -p.log()
    want = (1.0 - torch.softmax(ce, dim=1)) / 3
    got = _alpha("confidence", SETTINGS, observed=p.log().numpy(), entropy=None, valid=np.ones((1, 4), dtype=bool),
                 seq_len=1, dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("settings, message", [
    (WeightSettings(weight_beta=-1.0), "--weight-beta must be in"),
    (WeightSettings(weight_beta=1e7), "--weight-beta must be in"),
    (WeightSettings(weight_floor=1.5), "--weight-floor must be in"),
    (WeightSettings(entropy_eps=0.0), "--entropy-eps must be in"),
    (WeightSettings(teacher_weights=(1.0, 2.0)), "--teacher-weights is required with --teacher-weighting fixed"),
])
def test_settings_are_checked_whatever_the_scheme(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_settings("tempered", settings)


def test_check_settings_names_the_choices_and_counts_fixed_weights():
    with pytest.raises(ConfigError, match="must be one of entropy, uniform, fixed, confidence"):
        check_settings("best", WeightSettings())
    with pytest.raises(ConfigError, match="--teacher-weights is required"):
        check_settings("fixed", WeightSettings())
    with pytest.raises(ConfigError, match="has 2 values for 3 teachers"):
        check_settings("fixed", WeightSettings(teacher_weights=(1.0, 1.0)), 3)
    with pytest.raises(ConfigError, match="--teacher-weights must be >= 0"):
        check_settings("fixed", WeightSettings(teacher_weights=(-1.0, 1.0)), 2)
    assert check_settings("min-ce-seq", WeightSettings(), 2).name == "min-ce-seq"


def test_the_cli_takes_choices_settings_and_help_from_the_registry():
    import cli
    from student.config import LossConfig
    from student.evaluation import EvalConfig

    for command in ("train-student", "evaluate"):
        params = {p.opts[0]: p for p in cli.main.commands[command].params}
        assert tuple(params["--teacher-weighting"].type.choices) == NAMES
        for name, cls in REGISTRY.items():
            assert f"{name}: {cls.help}" in params["--teacher-weighting"].help
        for flag in ("--entropy-eps", "--weight-beta", "--weight-floor", "--teacher-weights"):
            assert flag in params, (command, flag)
    for field in ("entropy_eps", "weight_beta", "weight_floor"):  # one default, in WeightSettings
        assert getattr(LossConfig(), field) == getattr(WeightSettings(), field)
        assert getattr(EvalConfig(students=["s"], data="x"), field) == getattr(WeightSettings(), field)
    with pytest.raises(ConfigError, match="--weight-floor"):
        EvalConfig(students=["s"], data="x", teacher_weighting="tempered", weight_floor=2.0)
    with pytest.raises(ConfigError, match="--weight-beta"):
        LossConfig(teacher_weighting="tempered", weight_beta=-0.5)


def test_no_code_outside_the_registry_compares_a_scheme_name():
    """A scheme's name appears in a comparison (`x == "entropy"`, `x in ("uniform", ...)`) only in
    student/weighting.py (a column named `entropy` may still be looked up: `"entropy" in cols`)."""
    offenders = []
    for package in ("common", "storage", "teachers", "student", "multidistill", "benchmarks", "cli.py"):
        paths = [ROOT / package] if package.endswith(".py") else sorted((ROOT / package).rglob("*.py"))
        for path in paths:
            if path.name == "weighting.py" and path.parent.name == "student":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Compare):
                    continue
                consts = []
                if any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):  # name == "entropy"
                    consts += [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):  # name in ("entropy", ...)
                    consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                               for e in c.elts if isinstance(e, ast.Constant)]
                if any(c.value in NAMES for c in consts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
