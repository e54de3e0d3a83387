"""DistillLoss against a naive float64 reference (dense softmax, full KL), and the run-directory components
(CheckpointManager, MetricsWriter) on their own."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from common.errors import ConfigError
from storage.errors import MismatchError, StorageError
from student.config import LossConfig
from student.fusion import fuse_topk
from student.loss.objective import DistillLoss

B, L, V, H = 2, 5, 11, 6
DIMS = (4, 3)


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    hidden = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    n = B * L
    dense = [torch.log_softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 2, dim=-1) for _ in DIMS]
    alpha = torch.rand(n, len(DIMS), generator=g, dtype=torch.float64)
    alpha = alpha / alpha.sum(1, keepdim=True)
    ids = [torch.arange(V).expand(n, V).clone() for _ in DIMS]  # top-k = vocab: the coarse view is exact
    fused = fuse_topk(ids, dense, alpha)
    pooled_s = torch.randn(B, H, generator=g, dtype=torch.float64)
    pooled_t = [torch.randn(B, d, generator=g, dtype=torch.float64) for d in DIMS]
    projs = [torch.nn.Linear(H, d) for d in DIMS]  # float32, as trained (the feature term runs in float32)
    return input_ids, hidden, weight, dense, alpha, fused, pooled_s, pooled_t, projs


def _reference(input_ids, logits, dense, alpha, pooled_s, pooled_t, projs, *, lam, gamma, betas, tau):
    """lambda * tau^2 * mean_n sum_k alpha_k KL(p_k || q) + (1 - lambda) * CE + gamma * feature, in float64."""
    flat = logits.reshape(-1, V).double()
    log_q = torch.log_softmax(flat / tau, dim=-1)
    kl = sum(alpha[:, k] * (dense[k].exp() * (dense[k] - log_q)).sum(1) for k in range(len(dense)))
    kd = tau**2 * kl.mean()
    ce = -torch.log_softmax(logits[:, :-1].double(), -1).gather(2, input_ids[:, 1:, None]).mean()
    feat = sum(b * ((torch.nn.functional.linear(pooled_s, p.weight.double(), p.bias.double()) - t) ** 2).sum(1).div(t.shape[1]).mean()
               for p, t, b in zip(projs, pooled_t, betas, strict=True))
    return lam * kd + (1 - lam) * ce + gamma * feat, kd, ce, feat


def test_composition_matches_the_float64_reference():
    input_ids, hidden, weight, dense, alpha, fused, pooled_s, pooled_t, projs = _setup()
    lc = LossConfig(lambda_kd=0.7, gamma_feat=0.3, feat_weights=(1.0, 0.5))
    loss = DistillLoss.from_config(lc, temperature=1.0, num_teachers=2)
    logits = (hidden @ weight.T).requires_grad_(True)  # [B, L, V] float64
    ce, kd = loss.logit_terms(logits, input_ids, fused, train=True)
    terms = loss.combine(ce, kd, loss.feature(pooled_s, pooled_t, projs), fused)
    ref, ref_kd, ref_ce, ref_feat = _reference(input_ids, logits, dense, alpha, pooled_s, pooled_t, projs,
                                               lam=0.7, gamma=0.3, betas=(1.0, 0.5), tau=1.0)
    torch.testing.assert_close(terms.kd.double(), ref_kd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.ce.double(), ref_ce, rtol=1e-6, atol=1e-7)  # CE runs in float32
    torch.testing.assert_close(terms.feat.double(), ref_feat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.alpha, alpha.mean(0))
    (g,) = torch.autograd.grad(terms.loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)


def test_temperature_and_lambda_zero_keep_kd_out_of_the_gradient():
    input_ids, hidden, weight, dense, alpha, fused, pooled_s, pooled_t, projs = _setup(1)
    loss = DistillLoss(lambda_kd=0.0, temperature=2.0, betas=(1.0, 1.0))
    logits = (hidden @ weight.T).requires_grad_(True)
    ce, kd = loss.logit_terms(logits, input_ids, fused, train=True)
    _, ref_kd, _, _ = _reference(input_ids, logits, dense, alpha, pooled_s, pooled_t, projs, lam=0.0, gamma=0.0,
                                 betas=(1.0, 1.0), tau=2.0)
    torch.testing.assert_close(kd.double(), ref_kd, rtol=1e-9, atol=1e-12)  # reported, tau^2 included
    assert not kd.requires_grad and ce.requires_grad


def test_chunked_terms_equal_the_logit_terms():
    input_ids, hidden, weight, _, _, fused, *_ = _setup(2)
    plain = DistillLoss(lambda_kd=0.5)
    chunked = DistillLoss(lambda_kd=0.5, chunk_size=3)
    assert chunked.chunked and not plain.chunked
    ce, kd = plain.logit_terms(hidden @ weight.T, input_ids, fused, train=True)
    ce_c, kd_c = chunked.chunked_terms(hidden, weight, input_ids, fused)
    torch.testing.assert_close(ce_c.double(), ce.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kd_c.double(), kd.double(), rtol=1e-6, atol=1e-7)


def test_dkd_is_a_training_term_and_evaluation_reports_the_kl():
    from student.loss.terms import dkd_loss, next_token_labels, sparse_kl

    input_ids, hidden, weight, _, _, fused, *_ = _setup(3)
    loss = DistillLoss.from_config(LossConfig(loss="dkd", dkd_alpha=0.5, dkd_beta=4.0), temperature=1.0,
                                   num_teachers=2)
    logits = hidden @ weight.T
    _, kd_train = loss.logit_terms(logits, input_ids, fused, train=True)
    _, kd_eval = loss.logit_terms(logits, input_ids, fused, train=False)
    flat = logits.reshape(-1, V)
    torch.testing.assert_close(kd_train, dkd_loss(flat, fused, next_token_labels(input_ids).reshape(-1),
                                                  alpha=0.5, beta=4.0))
    torch.testing.assert_close(kd_eval, sparse_kl(flat, fused))
    assert not torch.allclose(kd_train, kd_eval)


def test_batch_check_names_the_mismatched_sequence():
    from student.batch import DistillBatch

    _, _, _, _, _, fused, *_ = _setup()
    ok = DistillBatch(seq_ids=torch.arange(B), input_ids=torch.zeros(B, L, dtype=torch.long), fused=fused,
                      pooled=[None, None])
    ok.check()
    with pytest.raises(MismatchError, match="seq id 17") as e:
        DistillBatch(seq_ids=ok.seq_ids, input_ids=ok.input_ids, fused=fused, pooled=[None, None],
                     mismatch=17).check()
    assert e.value.field == "input_ids"
    assert ok.shape == (B, L)


# ---- checkpoints and metrics, without a trainer -------------------------------------------------------
def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}}, "scheduler": {"last": step},
            "epoch": 0, "micro_in_epoch": step, "config": {"seed": 1, "batch_size": 4}}


def test_checkpoint_manager_saves_keeps_two_and_falls_back(tmp_path, caplog):
    from student.checkpoint import CheckpointError, CheckpointManager

    m = CheckpointManager(str(tmp_path))
    assert m.resume({"seed": 1}, requested=False, output=str(tmp_path)) is None
    for step in (1, 2, 3):
        m.save(step, _state(step))
    assert m.names() == ["step-0000002", "step-0000003"]
    meta = json.loads((tmp_path / "checkpoints" / "step-0000003" / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["bytes"] == (tmp_path / "checkpoints" / "step-0000003" / "state.pt").stat().st_size
    with pytest.raises(ConfigError, match="pass --resume"):
        m.resume({"seed": 1, "batch_size": 4}, requested=False, output=str(tmp_path))
    got = m.resume({"seed": 1, "batch_size": 4}, requested=True, output=str(tmp_path))
    assert got.state["step"] == 3 and torch.equal(got.state["model"]["w"], torch.full((3,), 3.0))
    state = tmp_path / "checkpoints" / "step-0000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:-7])  # damaged: falls back to step 2 with a warning
    got = m.resume({"seed": 1, "batch_size": 4}, requested=True, output=str(tmp_path))
    assert got.state["step"] == 2 and "step-0000003 is damaged" in caplog.text
    with pytest.raises(MismatchError, match="'batch_size'"):
        m.resume({"seed": 1, "batch_size": 8}, requested=True, output=str(tmp_path))
    with pytest.raises(ConfigError, match="written by 1 ranks, this run has 2"):
        CheckpointManager(str(tmp_path), world_size=2).resume({"seed": 1, "batch_size": 4}, requested=True,
                                                              output=str(tmp_path))
    (tmp_path / "checkpoints" / "step-0000002" / "state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        m.resume({"seed": 1, "batch_size": 4}, requested=True, output=str(tmp_path))


def test_metrics_writer_repairs_a_torn_last_line(tmp_path, caplog):
    from student.metrics_log import MetricsWriter, read_metrics

    caplog.set_level(logging.WARNING, logger="student")
    w = MetricsWriter(str(tmp_path))
    w.start(resumed_at=None)
    for step in (1, 2, 3):
        w.write({"step": step, "split": "train", "loss": 1.0 / step})
    with pytest.raises(ValueError):
        w.write({"step": 4, "loss": float("nan")})  # strict JSON
    with open(w.path, "a") as f:
        f.write('{"step": 4, "spl')
    assert [r["step"] for r in read_metrics(w.path)] == [1, 2, 3] and "torn last line" in caplog.text
    assert w.last()["step"] == 3
    w.start(resumed_at=2)  # a resumed run drops what it will log again
    assert [r["step"] for r in read_metrics(w.path)] == [1, 2]
    with open(w.path, "a") as f:
        f.write('{"bad\n{"step": 9}\n')
    with pytest.raises(StorageError, match="not valid JSON"):
        read_metrics(w.path)
    assert MetricsWriter(str(tmp_path), rank=1).last() == {}


def test_dataloader_pinning_keeps_the_batch_typed(monkeypatch):
    """A DataLoader with pin_memory=True (CUDA runs) calls DistillBatch.pin_memory; on this CPU-only check the
    tensor pinning itself is replaced by a copy."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from student.batch import DistillBatch

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **kw: self.clone())
    _, _, _, _, _, fused, *_ = _setup()
    pooled = torch.randn(B, 4)
    batch = DistillBatch(seq_ids=torch.arange(B), input_ids=torch.ones(B, L, dtype=torch.long), fused=fused,
                         pooled=[pooled, None], mismatch=3)
    pinned = pin_memory(batch)
    assert isinstance(pinned, DistillBatch) and pinned.mismatch == 3 and pinned.fused.sizes == fused.sizes
    assert torch.equal(pinned.fused.probs, fused.probs) and pinned.fused.probs is not fused.probs
    assert torch.equal(pinned.pooled[0], pooled) and pinned.pooled[1] is None
