"""benchmarks/gpu_suite.py: the --smoke run exercises every path of the GPU run and writes every figure; a
failing section is reported without losing the others; --sections and --budget-s are honoured."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _suite():
    return load_script("benchmarks/gpu_suite.py")


def _get(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path) -> None:
    pytest.importorskip("triton")  # the fused head's path runs under Triton's CPU interpreter
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {name: st["status"] for name, st in res["sections"].items()} == dict.fromkeys(
        ("matmul", "precompute", "train", "writer"), "ok")
    required = _suite().required_fields(smoke=True)
    assert res["required"] == required
    bad = [f for f in required if not (isinstance(_get(res["values"], f), (int, float))
                                       and math.isfinite(_get(res["values"], f)))]
    assert not bad, bad
    v = res["values"]
    for shape in ("qwen2-0_5b", "qwen2-1_5b"):
        for head in ("triton", "torch"):  # float32 on CPU: both heads agree with the float64 reference
            err = v["precompute"][shape]["error"][head]
            assert err["max_abs_logprob"] < 1e-4 and err["max_abs_entropy"] < 1e-4 and err["id_agreement"] == 1.0
        assert v["precompute"][shape]["triton"]["head_chunk"] == 4096
        for path in ("naive", "torch_eager", "torch_compiled", "triton"):
            assert v["precompute"][shape][path]["tok_s"] > 0
    assert v["writer"]["parquet"]["bytes_per_token"] > 0 and v["writer"]["zarr"]["bytes_per_token"] > 0
    assert "| precompute | qwen2-0_5b.best.tok_s |" in r.stdout  # the one table


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch) -> None:
    suite = _suite()
    from teachers import fused_head

    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):  # main() sets them for the interpreter; restored after
        monkeypatch.setattr(fused_head, name, getattr(fused_head, name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(s):
        raise RuntimeError("out of memory\nlong trace")

    def fine(s):
        s.set("writer.parquet.tok_s", 1.0)

    monkeypatch.setitem(suite.RUN, "train", broken)
    monkeypatch.setitem(suite.RUN, "writer", fine)
    out = tmp_path / "r.json"
    rc = suite.main(["--smoke", "--sections", "matmul,train,writer", "--out", str(out)])
    assert rc == 1
    res = json.loads(out.read_text())
    assert res["sections"]["matmul"]["status"] == "ok"
    assert res["sections"]["train"] == {"status": "failed", "error": "RuntimeError: out of memory long trace",
                                        "seconds": res["sections"]["train"]["seconds"]}
    assert res["sections"]["writer"]["status"] == "ok"
    assert "precompute" not in res["sections"]  # not asked for
    assert res["values"]["matmul"]["peak_tflops"] > 0 and res["values"]["writer"]["parquet"]["tok_s"] == 1.0


def test_budget_and_unknown_sections(tmp_path, monkeypatch, capsys) -> None:
    suite = _suite()
    from teachers import fused_head

    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        monkeypatch.setattr(fused_head, name, getattr(fused_head, name))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "b.json"
    assert suite.main(["--smoke", "--sections", "matmul,writer", "--budget-s", "0", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert [st["status"] for st in res["sections"].values()] == ["skipped", "skipped"]
    assert res["sections"]["matmul"]["error"].startswith("budget")
    with pytest.raises(SystemExit) as e:
        suite.main(["--smoke", "--sections", "matmul,gpu"])
    assert e.value.code == 2 and "unknown sections ['gpu']" in capsys.readouterr().err
