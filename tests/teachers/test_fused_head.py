"""Fused Triton targets head (teachers/fused_head.py) against the float64 dense reference, on CPU through
Triton's interpreter, and its selection (`--head-kernel`): CUDA only, torch elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teachers.head import dense_reference, targets_head

CHILD = Path(__file__).with_name("fused_head_interp.py")
GAP = 1e-4  # ids are compared where the reference's neighbouring log-probs differ by more than this


def _cases() -> dict[str, dict]:
    """fused_targets_head keyword arguments per case (tiny: the interpreter runs every program in Python)."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 20, 32, 200  # 13 vocab tiles of 16, the last one partial
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.4
    blocks = dict(block_m=16, block_n=16, block_k=16)
    tied = weight.clone()
    tied[[40, 77, 150, 199]] = weight[3]  # equal logits in four other tiles, some rows peaky (x5)
    peaky = hidden * torch.linspace(1.0, 5.0, n).unsqueeze(1)
    small = torch.randn(40, h, generator=g) * 0.4  # 3 tiles < k: every tile is a candidate
    return {
        # two chunks (12 + 8 rows), three vocab splits
        "plain": dict(hidden=hidden, weight=weight, k=8, chunk_size=12, splits=3, **blocks),
        "transforms": dict(hidden=hidden, weight=weight, k=8, temperature=1.7, bias=torch.randn(v, generator=g),
                           logit_scale=0.5, softcap=4.0, **blocks),
        "ties": dict(hidden=peaky, weight=tied, k=8, splits=2, **blocks),
        "k_over_tiles": dict(hidden=hidden, weight=small, k=40, temperature=0.8, **blocks),
    }


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    pytest.importorskip("triton")
    root = tmp_path_factory.mktemp("fused-head")
    cases = _cases()
    torch.save(cases, root / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(CHILD), str(root / "cases.pt"), str(root / "results.pt")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cases, torch.load(root / "results.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "transforms", "ties", "k_over_tiles"])
def test_fused_head_matches_float64_reference(interpreted, name: str) -> None:
    cases, results = interpreted
    case = cases[name]
    ids, lp, ent = results[name]
    n, k = case["hidden"].shape[0], case["k"]
    assert ids.dtype == torch.int32 and lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert ids.shape == (n, k) and lp.shape == (n, k) and ent.shape == (n,)
    ref_ids, ref_lp, ref_ent, full = dense_reference(
        case["hidden"], case["weight"], k=k, temperature=case.get("temperature", 1.0), bias=case.get("bias"),
        logit_scale=case.get("logit_scale"), softcap=case.get("softcap"))
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)
    # every returned id carries the returned log-prob, ids are distinct, sorted by descending log-prob
    torch.testing.assert_close(full.gather(1, ids.long()), lp.double(), rtol=0, atol=2e-5)
    assert all(len(set(row.tolist())) == k for row in ids)
    assert bool((lp[:, 1:] <= lp[:, :-1]).all())
    # ids equal wherever the reference's neighbours are separated by more than GAP
    pad = torch.full((n, 1), float("inf"), dtype=torch.float64)
    above = torch.cat([pad, ref_lp], 1)[:, :-1] - ref_lp
    below = ref_lp - torch.cat([ref_lp, -pad], 1)[:, 1:]
    separated = (above > GAP) & (below > GAP)
    assert int(separated.sum()) > n * k // 2  # the comparison covers most positions
    assert torch.equal(ids.long()[separated], ref_ids[separated])
    if name == "ties":  # tied logits in different tiles: the tied ids are all in the top-k where they belong
        assert int((~separated).sum()) > 0


@pytest.mark.slow
def test_fused_head_agrees_with_the_torch_head(interpreted) -> None:
    cases, results = interpreted
    case = cases["transforms"]
    ids, lp, ent = results["transforms"]
    t_ids, t_lp, t_ent = targets_head(case["hidden"], case["weight"], k=case["k"], temperature=case["temperature"],
                                      bias=case["bias"], logit_scale=case["logit_scale"], softcap=case["softcap"])
    assert torch.equal(ids, t_ids)
    torch.testing.assert_close(lp, t_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent, t_ent, rtol=0, atol=2e-5)


def test_fused_head_refuses_cpu_tensors_without_the_interpreter(monkeypatch) -> None:
    from teachers.fused_head import fused_targets_head

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        fused_targets_head(torch.randn(4, 16), torch.randn(32, 16), k=2)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        fused_targets_head(torch.randn(4, 16), torch.randn(32, 16), k=2, block_n=24)
    with pytest.raises(ValueError, match="kernel must be 'torch' or 'triton'"):
        targets_head(torch.randn(4, 16), torch.randn(32, 16), k=2, kernel="cuda")


def test_head_kernel_is_selected_only_on_cuda(tmp_path, monkeypatch) -> None:
    from common.errors import ConfigError
    from teachers.config import TeacherConfig
    from teachers.errors import TeacherLoadError
    from teachers.hf_backend import HFBackend
    from tests.helpers import make_tiny_setup

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="head_kernel"):
        TeacherConfig(path="t", head_kernel="cuda")
    teacher, _ = make_tiny_setup(tmp_path, n_docs=10, vocab=300, seed=0)
    backend = HFBackend(TeacherConfig(path=str(teacher), device="cpu"))  # auto
    assert backend.head_kernel == "torch" and backend.notes["head_kernel"] == "torch"
    with pytest.raises(TeacherLoadError, match="--head-kernel triton needs a CUDA device"):
        HFBackend(TeacherConfig(path=str(teacher), device="cpu", head_kernel="triton"))


def test_cli_maps_head_kernel(monkeypatch) -> None:
    from click.testing import CliRunner

    import teachers.precompute
    from cli import main

    seen = {}

    def fake_run(cfg, **kw):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(teachers.precompute, "run_precompute", fake_run)
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--head-kernel", "torch"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].teacher.head_kernel == "torch"
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o"])
    assert seen["cfg"].teacher.head_kernel == "auto"
