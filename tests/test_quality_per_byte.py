"""benchmarks/quality_per_byte.py: its pure parts (settings, bytes/token, paired differences, table, verdict)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.helpers import load_script

qpb = load_script("benchmarks/quality_per_byte.py")


def test_parse_setting():
    assert qpb.parse_setting("top64") == qpb.Setting(name="top64", targets="topk", size=64)
    assert qpb.parse_setting("top32b6") == qpb.Setting(name="top32b6", targets="topk", size=32, bits=6)
    s = qpb.parse_setting("sampled16")
    assert (s.targets, s.size, s.bits, s.series) == ("sampled", 16, None, "sampled")
    for bad in ("top", "sampled8b4", "top0", "k64", "top64 "):
        with pytest.raises(SystemExit, match="error: setting"):
            qpb.parse_setting(bad)


def test_cache_bytes_counts_the_shard_files(tmp_path):
    (tmp_path / "shard-000000.parquet").write_bytes(b"x" * 1000)
    (tmp_path / "shard-000001.parquet").write_bytes(b"y" * 24)
    shards = [
        {"file": "shard-000000.parquet", "rows": 3, "bytes": 1000},
        {"file": "shard-000001.parquet", "rows": 1, "bytes": 24},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"seq_len": 8, "shards": shards}))
    assert qpb.cache_bytes(tmp_path) == (1024, 32)
    (tmp_path / "shard-000001.parquet").write_bytes(b"y" * 25)  # the file is not the one the manifest names
    with pytest.raises(RuntimeError, match="25 bytes on disk"):
        qpb.cache_bytes(tmp_path)


def _windows(rng, w=12):
    return rng.normal(3.0, 0.3, w).tolist()


def test_versus_per_seed_and_pooled():
    rng = np.random.default_rng(0)
    ref = {0: _windows(rng), 1: _windows(rng)}
    worse = {s: (np.asarray(v) + 0.2).tolist() for s, v in ref.items()}  # every window 0.2 nats worse
    values = {s: {"ref": ref[s], "worse": worse[s]} for s in ref}
    ppl = qpb.versus(values, "worse", "ref", "perplexity", replicates=500, seed=0)
    assert set(ppl) == {"s0", "s1", "pooled"}
    for s in (0, 1):
        want = math.exp(np.mean(worse[s])) - math.exp(np.mean(ref[s]))
        assert ppl[f"s{s}"]["difference"] == pytest.approx(want, rel=1e-12)
        assert 0.0 < ppl[f"s{s}"]["low"] <= ppl[f"s{s}"]["difference"] <= ppl[f"s{s}"]["high"]
    pooled_want = math.exp(np.mean([worse[0], worse[1]])) - math.exp(np.mean([ref[0], ref[1]]))
    assert ppl["pooled"]["difference"] == pytest.approx(pooled_want, rel=1e-12)
    kl = qpb.versus(values, "worse", "ref", "kl", replicates=500, seed=0)
    # a constant shift: every resample's difference of means is exactly 0.2
    for iv in kl.values():
        assert iv["difference"] == pytest.approx(0.2) and iv["low"] == pytest.approx(0.2)
        assert iv["high"] == pytest.approx(0.2)
    ref_kl = {"s0": 1.0, "s1": 1.0, "pooled": 1.0}
    assert not qpb.as_good(kl, ref_kl, 0.01)  # 0.2 worse, margin 0.01
    assert qpb.as_good(kl, ref_kl, 0.25)  # within a 25% margin
    same = qpb.versus({0: {"ref": ref[0], "x": ref[0]}}, "x", "ref", "kl", replicates=100, seed=0)
    assert set(same) == {"s0"} and same["s0"] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    assert qpb.as_good(same, {"s0": 1.0}, 0.01)


def test_as_good_is_non_inferiority_within_the_margin_for_every_interval():
    ref = {"s0": 50.0, "s1": 60.0, "pooled": 55.0}  # margin 1%: 0.5, 0.6, 0.55
    assert qpb.as_good({"s0": {"low": -0.1, "high": 0.4}, "pooled": {"low": -0.01, "high": 0.5}}, ref, 0.01)
    assert qpb.as_good({"s0": {"low": -0.3, "high": -0.1}}, ref, 0.01)  # better than the reference
    # not shown worse (interval reaches zero), but possibly 2% worse: not as good
    assert not qpb.as_good({"s0": {"low": -0.1, "high": 1.0}}, ref, 0.01)
    # one seed's interval above the margin is enough to fail
    assert not qpb.as_good({"s0": {"low": -0.1, "high": 0.2}, "s1": {"low": 0.01, "high": 0.7}}, ref, 0.01)


def _eval(rng, shifts: dict[str, float], seed: int) -> dict:
    base_nll, base_kl = _windows(rng), rng.uniform(0.5, 1.0, 12)
    models = {}
    for name, shift in shifts.items():
        nll = (np.asarray(base_nll) + shift).tolist()
        kl = (base_kl + shift).tolist()
        models[f"{name}-s{seed}"] = {
            "perplexity": math.exp(np.mean(nll)),
            "kl_fused": float(np.mean(kl)),
            "window_nll": nll,
            "window_kl_fused": kl,
        }
    return {"models": models}


def test_summary_table_and_verdict():
    rng = np.random.default_rng(1)
    settings = [qpb.parse_setting(x) for x in ("top64", "top8", "sampled16")]
    shifts = {"top64": 0.0, "top8": 0.3, "sampled16": 0.0}
    evals = {0: _eval(rng, shifts, 0), 1: _eval(rng, shifts, 1)}
    bpt = {"top64": 190.0, "top8": 30.0, "sampled16": 24.0}
    rows = qpb.summarise(evals, settings, bpt, "top64", replicates=200, seed=0)
    by = {r["setting"]: r for r in rows}
    assert (
        by["top64"]["as_good"] is None
        and by["top8"]["as_good"] is False
        and by["sampled16"]["as_good"] is True
    )
    assert by["top8"]["kl"]["vs_reference"]["pooled"]["difference"] == pytest.approx(0.3)
    assert by["top8"]["perplexity"]["mean"] == pytest.approx(
        np.mean([evals[s]["models"][f"top8-s{s}"]["perplexity"] for s in (0, 1)])
    )
    table = qpb.format_table(rows, "top64")
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert (
        "| top8 | 30.0 |" in table and "+0.3000 [+0.3000, +0.3000]" in table and lines[-1].endswith("| yes |")
    )
    assert qpb.verdict(rows, "top64", 100.0).startswith("goal reached") and "sampled16 (24.0" in qpb.verdict(
        rows, "top64", 100.0
    )
    assert qpb.verdict(rows, "top64", 20.0).startswith("goal NOT reached")


def test_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    settings = [qpb.parse_setting(x) for x in ("top64", "top8", "sampled8")]
    evals = {0: _eval(rng, {"top64": 0.0, "top8": 0.1, "sampled8": 0.05}, 0)}
    rows = qpb.summarise(
        evals, settings, {"top64": 190.0, "top8": 30.0, "sampled8": 20.0}, "top64", replicates=100, seed=0
    )
    path = tmp_path / "fig.png"
    qpb.plot(rows, "top64", str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_tiny_run_is_reused_by_the_next_call_and_another_config_is_refused(tmp_path, capsys):
    """Caches in process, students and evaluation through cli.py (benchmarks/runner.py), on a tiny teacher; the
    second call computes nothing (--reuse-only) and prints the same table; another lr is refused by name."""
    from tests.helpers import make_tiny_setup

    teacher, corpus = make_tiny_setup(tmp_path / "setup", n_docs=60)
    argv = ["--teacher", str(teacher), "--student-init", str(teacher), "--work", str(tmp_path / "work"),
            "--settings", "top8,sampled4", "--reference", "top8", "--train-data", str(corpus), "--max-tokens", "512",
            "--seq-len", "32", "--batch-size", "2", "--seeds", "0", "--max-steps", "1", "--eval-data", str(corpus),
            "--eval-tokens", "64", "--eval-top-k", "512", "--bootstrap", "20", "--plot", str(tmp_path / "q.png")]
    assert qpb.main(argv) == 0
    first = capsys.readouterr().out
    assert qpb.main([*argv, "--reuse-only"]) == 0
    second = capsys.readouterr().out
    table = [line for line in first.splitlines() if line.startswith("| ")]
    assert table and table == [line for line in second.splitlines() if line.startswith("| ")]
    reused = [line for line in second.splitlines() if line.startswith("[qpb]") and line.endswith(", reused")]
    assert len(reused) == 5, second  # two caches, two students, one evaluation
    with pytest.raises(SystemExit, match=r"optim.lr: 0.0003 there, 0.001 here"):
        qpb.main([*argv, "--lr", "1e-3"])
    config = json.loads((tmp_path / "work/runs/top8-s0/config.json").read_text())
    assert config["teacher_data"] == [str(tmp_path / "work/caches/top8")] and config["max_steps"] == 1
