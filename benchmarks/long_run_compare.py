"""Compare models scored on the long run's held-out windows, including models scored after it into another
directory (e.g. a student trained on from the run's final one).

    python benchmarks/long_run_compare.py --eval WORK/eval --eval WORK/more \
        --pair distilled-e2:smollm2 --pair distilled-e2:distilled

Each --eval directory holds `eval-DOMAIN.json` per domain, written by `evaluate` on the run's held-out caches
(benchmarks/long_run.py's WORK/eval/, or `cli.py evaluate --config WORK/eval/eval-DOMAIN-N.config.json
--student LABEL=DIR --output DIR/eval-DOMAIN.json`, N the run's last). Their models are merged per domain; the
reports must be of the same cached windows. Prints each model's held-out perplexity (all windows and per domain) and, for each
--pair A:B, the paired-bootstrap perplexity difference A - B with windows resampled within domains (as the
long run's own intervals), and with --by-domain over each domain's windows alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import paper_table as pt  # noqa: E402

from benchmarks import runner, scores  # noqa: E402


def fail(message: str) -> None:
    """A user mistake: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merged(dirs: list[Path]) -> scores.Scores:
    """The models of every directory's per-domain reports, one report per domain (a label in two directories,
    or reports of other windows, are refused)."""
    per_domain: dict[str, dict] = {}
    for d in pt.DOMAINS:
        base: dict | None = None
        for directory in dirs:
            path = directory / f"eval-{d}.json"
            if not path.exists():
                fail(f"{path} does not exist")
            rep = runner.read_json(path)
            if base is None:
                base = {**rep, "models": dict(rep["models"])}
                continue
            if (rep["source"], rep["windows"], rep["seq_len"]) != (base["source"], base["windows"], base["seq_len"]):
                fail(f"{path} scores other windows ({rep['source']}, {rep['windows']} windows "
                     f"of {rep['seq_len']}) than {dirs[0] / f'eval-{d}.json'}")
            if clash := set(rep["models"]) & set(base["models"]):
                fail(f"{path} scores {sorted(clash)} again")
            base["models"].update(rep["models"])
        per_domain[d] = base
    return scores.Scores.from_results(per_domain)


def pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not (sep and a and b):
        raise argparse.ArgumentTypeError(f"expected A:B (two model labels), got {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=Path, action="append", required=True, help="directory of eval-DOMAIN.json; repeat")
    ap.add_argument("--pair", type=pair, action="append", default=[], help="A:B, the difference A - B; repeat")
    ap.add_argument("--model", action="append", default=[], help="a label to list (default: every model); repeat")
    ap.add_argument("--by-domain", action="store_true", help="each --pair also within each domain")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap replicates")
    args = ap.parse_args(argv)
    s = merged(args.eval)
    for label in [*args.model, *(x for p in args.pair for x in p)]:
        if label not in s.nll:
            ap.error(f"no model {label!r} in the reports (they hold {', '.join(sorted(s.nll))})")
    print("| model | perplexity | " + " | ".join(pt.DOMAINS) + " |")
    print("|---|---|" + "---|" * len(pt.DOMAINS))
    for label in args.model or list(s.nll):
        cells = [f"{scores.ppl(s.windows(label, d)):.2f}" for d in pt.DOMAINS]
        print(f"| {label} | {scores.ppl(s.windows(label)):.2f} | " + " | ".join(cells) + " |")
    if args.pair:
        print("\n| difference | windows | perplexity [95%] | relative [95%] | first is better |")
        print("|---|---|---|---|---|")
    for a, b in args.pair:
        for domain in [None, *(pt.DOMAINS if args.by_domain else [])]:
            strata = s.strata() if domain is None else np.zeros(len(s.windows(a, domain)))
            iv = scores.paired_bootstrap(s.windows(a, domain), s.windows(b, domain), strata, n=args.bootstrap)
            verdict = scores.verdict_better(iv["low"], iv["high"], [iv["difference"]])
            print(f"| {a} - {b} | {domain or 'all'} | {scores.interval_cells(iv)} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
