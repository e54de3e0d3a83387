"""Held-out scores of evaluated models and their paired-bootstrap comparisons, for every benchmark that trains
students: window NLLs (and KL) from `evaluate` reports (`Scores`), rows of seeds (`run_label`), `compare` (the
perplexity difference of two rows with `student.stats.paired_bootstrap`, windows resampled within domains, and
each seed's own difference) and the verdicts a claim gets from it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, strata: np.ndarray, *, n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Perplexity difference exp(mean a) - exp(mean b) of two models' window NLLs [W] on the same windows, by
    `student.stats.paired_bootstrap` with the windows resampled within each stratum (domain).

    Returns difference, relative (a / b - 1) and the 95% percentile interval of both. The relative interval
    is exp(interval of mean a - mean b) - 1: the same resamples (same seed), through a monotone map."""
    from student.stats import mean, perplexity_of_means
    from student.stats import paired_bootstrap as bootstrap

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.shape != np.shape(strata):
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, {np.shape(strata)}")
    ppl = bootstrap(a, b, n, seed, stat=perplexity_of_means, strata=strata)
    nll = bootstrap(a, b, n, seed, stat=mean, strata=strata)
    return {
        "difference": ppl.estimate,
        "low": ppl.low,
        "high": ppl.high,
        "relative": math.expm1(nll.estimate),
        "rel_low": math.expm1(nll.low),
        "rel_high": math.expm1(nll.high),
    }


def verdict_better(low: float, high: float, seed_diffs: Sequence[float]) -> str:
    """Claim "a has lower perplexity than b", from the interval of a - b and each seed's own a - b.

    holds: the interval lies below zero and every seed agrees; does not hold: it lies above zero;
    otherwise cannot tell."""
    if high < 0 and all(d < 0 for d in seed_diffs):
        return "holds"
    if low > 0:
        return "does not hold"
    return "cannot tell"


def verdict_no_worse(low: float, high: float, margin: float) -> str:
    """Claim "a is no worse than b" (non-inferiority): a - b interval above zero -> does not hold; below
    `margin` (an allowed loss, same unit) -> holds; otherwise cannot tell."""
    if low > 0:
        return "does not hold"
    if high < margin:
        return "holds"
    return "cannot tell"


def verdict_all(verdicts: Sequence[str]) -> str:
    """A claim made of several steps (every step must hold)."""
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "cannot tell"


def ppl(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll))))


@dataclass
class Scores:
    """Window NLL (and KL to the fused target) of every evaluated model, per domain, in window order."""

    domains: list[str]
    nll: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> domain -> [windows]
    kl: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    observed: dict[str, dict[str, tuple[float, int, int]]] = field(default_factory=dict)
    """Aligned caches' teachers: name -> domain -> (NLL sum, positions with an exact log-prob, positions)."""

    @classmethod
    def from_results(cls, per_domain: dict[str, dict]) -> Scores:
        """From the JSON of one `evaluate` call per domain."""
        s = cls(domains=list(per_domain))
        for d, res in per_domain.items():
            for label, m in res["models"].items():
                s.nll.setdefault(label, {})[d] = list(m["window_nll"])
                if "window_kl_fused" in m:
                    s.kl.setdefault(label, {})[d] = list(m["window_kl_fused"])
            for name, c in res.get("cache_teachers", {}).items():
                n, ppl_obs = c["observed_positions"], c["perplexity_observed"]  # None when n is 0
                s.observed.setdefault(name, {})[d] = (math.log(ppl_obs) * n if n else 0.0, n, c["positions"])
        return s

    def observed_ppl(self, name: str, domain: str | None = None) -> tuple[float, float]:
        """An aligned teacher's perplexity over its exact positions, and the share of positions they are."""
        parts = [self.observed[name][d] for d in (self.domains if domain is None else [domain])]
        nll, n, total = (sum(x[i] for x in parts) for i in range(3))
        return (math.exp(nll / n) if n else math.nan), n / total

    def strata(self) -> np.ndarray:
        any_label = next(iter(self.nll))
        return np.concatenate([[i] * len(self.nll[any_label][d]) for i, d in enumerate(self.domains)])

    def windows(self, label: str, domain: str | None = None, kind: str = "nll") -> np.ndarray:
        src = self.nll if kind == "nll" else self.kl
        doms = self.domains if domain is None else [domain]
        return np.concatenate([np.asarray(src[label][d], np.float64) for d in doms])

    def row(self, labels: Sequence[str], domain: str | None = None, kind: str = "nll") -> np.ndarray:
        """Window values averaged over a row's seeds (labels)."""
        return np.mean([self.windows(lab, domain, kind) for lab in labels], axis=0)


def run_label(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


@dataclass
class Comparison:
    name: str
    a: str
    b: str
    kind: str  # "better" (a beats b) or "no-worse" (a no worse than b)
    result: dict[str, float]
    seed_diffs: list[float]
    verdict: str


def compare(
    scores: Scores,
    rows: dict[str, list[str]],
    name: str,
    a: str,
    b: str,
    kind: str = "better",
    *,
    margin_rel: float = 0.01,
    replicates: int = 2000,
) -> Comparison:
    """Perplexity of row a against row b: paired bootstrap on seed-averaged windows; seeds they share."""
    seeds_a = {lab.rsplit("-s", 1)[1]: lab for lab in rows[a]}
    seeds_b = {lab.rsplit("-s", 1)[1]: lab for lab in rows[b]}
    shared = sorted(set(seeds_a) & set(seeds_b))  # rows with other seed counts: compared on shared seeds only
    if not shared:
        raise ValueError(f"rows {a} and {b} share no seed")
    la, lb = [seeds_a[x] for x in shared], [seeds_b[x] for x in shared]
    res = paired_bootstrap(scores.row(la), scores.row(lb), scores.strata(), n=replicates)
    diffs = [ppl(scores.windows(x)) - ppl(scores.windows(y)) for x, y in zip(la, lb, strict=True)]
    if kind == "better":
        v = verdict_better(res["low"], res["high"], diffs)
    else:
        v = verdict_no_worse(res["low"], res["high"], margin_rel * ppl(scores.row(lb)))
    return Comparison(name, a, b, kind, res, diffs, v)


def interval_cells(r: dict[str, float]) -> str:
    """Two markdown cells of a `paired_bootstrap` result: the perplexity difference and the relative one, each
    with its 95% interval."""
    return (f"{r['difference']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] | "
            f"{100 * r['relative']:+.1f}% [{100 * r['rel_low']:+.1f}, {100 * r['rel_high']:+.1f}]")


def fmt_diff(c: Comparison) -> str:
    r = c.result
    seeds = ", ".join(f"{d:+.2f}" for d in c.seed_diffs)
    return (
        f"{r['difference']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] ({100 * r['relative']:+.1f}% "
        f"[{100 * r['rel_low']:+.1f}, {100 * r['rel_high']:+.1f}]); per seed {seeds}"
    )


def row_table(
    scores: Scores, rows: dict[str, list[str]], desc: dict[str, str], ce: str, ref_name: str = "CE"
) -> list[str]:
    """The rows' perplexity (per seed, per domain), KL to the fused target and relative change to row `ce`
    (called `ref_name` in the header)."""
    doms = scores.domains
    lines = [
        "| row | loss / teachers | seeds | perplexity (per seed) | "
        + " | ".join(doms)
        + f" | KL to fused | vs {ref_name} |",
        "|---|---|---|---|" + "---|" * len(doms) + "---|---|",
    ]
    ce_ppl = ppl(scores.row(rows[ce]))
    for r, labels in rows.items():
        p = ppl(scores.row(labels))
        per_seed = ", ".join(f"{ppl(scores.windows(lab)):.2f}" for lab in labels)
        kl = (
            f"{float(np.mean(scores.row(labels, kind='kl'))):.3f}"
            if all(lab in scores.kl for lab in labels)
            else "-"
        )
        cells = " | ".join(f"{ppl(scores.row(labels, d)):.2f}" for d in doms)
        lines.append(
            f"| {r} | {desc.get(r, '')} | {len(labels)} | **{p:.2f}** ({per_seed}) | {cells} | {kl} | "
            f"{100 * (p / ce_ppl - 1):+.1f}% |"
        )
    return lines
