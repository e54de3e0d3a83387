"""`observed_logprob` in top-k and sampled caches: the teacher's exact log-prob of the observed next token at
the cache temperature, against a float64 dense reference, from the heads and from precompute (Parquet and Zarr);
the manifest flag and old manifests without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.manifest import Manifest
from storage.reader import TeacherDataset
from teachers.config import tiny
from teachers.head import observed_from_top1, targets_head
from teachers.precompute import run_precompute
from teachers.sampling import sampled_head
from tests.helpers import make_tiny_setup

SEQ_LEN, WINDOWS, TEMPERATURE = 32, 10, 0.7


def _dense(n: int = 37, h: int = 24, v: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    bias = torch.randn(v, generator=g) * 0.1
    nxt = torch.randint(0, v, (n,), generator=g)
    z = torch.tanh((hidden.double() @ weight.double().T + bias.double()) * 1.3 / 20.0) * 20.0
    logp = torch.log_softmax(z / TEMPERATURE, dim=-1)  # [n, V] float64
    return hidden, weight, bias, nxt, logp.gather(1, nxt[:, None]).squeeze(1)


def test_heads_give_log_p_of_the_next_token():
    hidden, weight, bias, nxt, want = _dense()
    kw = dict(temperature=TEMPERATURE, chunk_size=8, bias=bias, logit_scale=1.3, softcap=20.0)
    ids, lp, _, obs = targets_head(hidden, weight, k=5, next_ids=nxt, **kw)
    assert obs.dtype == torch.float32 and obs.shape == (37,)
    torch.testing.assert_close(obs.double(), want, rtol=1e-5, atol=2e-5)
    assert len(targets_head(hidden, weight, k=5, **kw)) == 3  # unchanged without next_ids
    # the fused kernel's path: log p(top-1) + z_o - z_top1
    got = observed_from_top1(hidden, weight, next_ids=nxt, top_ids=ids, top_logprobs=lp, **{
        k: v for k, v in kw.items() if k != "chunk_size"})
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
    uniforms = torch.rand(37, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    *_, s_obs = sampled_head(hidden, weight, uniforms=uniforms, next_ids=nxt, **kw)
    torch.testing.assert_close(s_obs.double(), want, rtol=1e-5, atol=2e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("observed")
    teacher, corpus = make_tiny_setup(root, n_docs=40, vocab=512, seed=5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float64).eval()
    return root, teacher, corpus, model


@pytest.mark.parametrize("fmt, targets", [("parquet", "topk"), ("zarr", "topk"), ("parquet", "sampled"),
                                          ("zarr", "sampled")])
def test_precompute_stores_the_exact_observed_logprob(setup, fmt, targets):
    root, teacher, corpus, model = setup
    out = root / f"{fmt}-{targets}"
    cfg = tiny(str(teacher), str(corpus), str(out))
    cfg.corpus.max_tokens = SEQ_LEN * WINDOWS
    cfg.teacher.temperature, cfg.teacher.targets = TEMPERATURE, targets
    if targets == "sampled":
        cfg.teacher.samples = 8
    cfg.storage.format = fmt
    manifest = run_precompute(cfg)
    assert manifest.observed_logprob and manifest.has_observed_logprob
    assert "observed_logprob" in manifest.column_names()
    ds = TeacherDataset.open(str(out))
    data = ds.read_columns(np.arange(len(ds)), ["input_ids", "observed_logprob"])
    obs = data["observed_logprob"]
    assert obs.dtype == np.float32 and obs.shape == (len(ds), SEQ_LEN) and len(ds) >= 2
    assert np.isnan(obs[:, -1]).all() and not np.isnan(obs[:, :-1]).any()
    ids = torch.from_numpy(data["input_ids"]).long()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits / TEMPERATURE, dim=-1)  # [B, L, V] float64
    want = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(torch.from_numpy(obs[:, :-1]).double(), want, rtol=1e-5, atol=2e-5)


def test_manifests_without_the_field_read_as_caches_without_the_column(setup):
    root, teacher, corpus, _ = setup
    m = Manifest.from_json((root / "parquet-topk" / "manifest.json").read_text())
    d = m.to_dict()
    assert d["observed_logprob"] is True
    del d["observed_logprob"]
    old = Manifest.from_dict(d)
    assert not old.observed_logprob and not old.has_observed_logprob
    assert "observed_logprob" not in old.column_names() and "observed_logprob" not in old.to_dict()
