"""benchmarks/long_run_compare.py: models of several report directories merged per domain, and refused when
they are not of the same windows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import long_run_compare as lrc  # noqa: E402
import paper_table as pt  # noqa: E402


def write_reports(directory: Path, models: dict[str, dict[str, list[float]]], windows: int = 3) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for d in pt.DOMAINS:
        report = {"source": [f"/caches/val-{d}/gemma3"], "windows": windows, "seq_len": 256,
                  "models": {label: {"window_nll": nll[d]} for label, nll in models.items()}}
        (directory / f"eval-{d}.json").write_text(json.dumps(report))


def nll(seed: int, windows: int = 3) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {d: list(3.0 + rng.random(windows)) for d in pt.DOMAINS}


def test_merges_two_directories_and_reports_the_difference(tmp_path, capsys):
    a, b = nll(0), nll(1)
    write_reports(tmp_path / "run", {"teacher": b})
    write_reports(tmp_path / "more", {"student": a})
    assert lrc.main(["--eval", str(tmp_path / "run"), "--eval", str(tmp_path / "more"),
                     "--pair", "student:teacher", "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    flat = {k: np.concatenate([v[d] for d in pt.DOMAINS]) for k, v in (("student", a), ("teacher", b))}
    ppl = {k: math.exp(float(np.mean(v))) for k, v in flat.items()}
    assert f"| student | {ppl['student']:.2f} |" in out
    assert f"| teacher | {ppl['teacher']:.2f} |" in out
    row = next(line for line in out.splitlines() if line.startswith("| student |"))
    assert row.endswith(f"| {math.exp(float(np.mean(a['python']))):.2f} |")  # python is the last domain
    assert f"| student - teacher | all | {ppl['student'] - ppl['teacher']:+.2f} [" in out


@pytest.mark.parametrize("case", ["other windows", "same label", "missing", "unknown label"])
def test_refuses_with_one_line_and_exit_2(tmp_path, capsys, case):
    write_reports(tmp_path / "run", {"teacher": nll(1)})
    if case == "other windows":
        write_reports(tmp_path / "more", {"student": nll(0, 4)}, windows=4)
    elif case == "same label":
        write_reports(tmp_path / "more", {"teacher": nll(0)})
    elif case == "unknown label":
        write_reports(tmp_path / "more", {"student": nll(0)})
    argv = ["--eval", str(tmp_path / "run"), "--eval", str(tmp_path / "more"), "--pair", "nobody:teacher"]
    with pytest.raises(SystemExit) as e:
        lrc.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"other windows": "scores other windows", "same label": "scores ['teacher'] again",
                "missing": "does not exist", "unknown label": "no model 'nobody'"}[case]
    assert expected in err[-1]
