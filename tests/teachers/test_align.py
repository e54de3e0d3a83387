"""Teachers with another tokenizer: aligned caches against a dense float64 reference.

Two tokenizers trained here with different vocabularies and merges: S (the student's, byte-level BPE) and T
(the teacher's, SentencePiece-style with `<bos>` and `<0xNN>` byte fallback), a corpus with multi-byte
characters and whitespace runs, and a tiny random teacher on T. The reference is built independently of
teachers/align.py: text comes from the tokenizers' own `decode`, positions from comparing decoded prefixes,
the vocabulary map from decoding each teacher token, and the teacher's distribution from a float64 softmax
of its full logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import make_two_tokenizer_setup, sample_texts_unicode  # noqa: E402

SEP = "\x00"  # stands for the EOS document separator in decoded reference text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    texts = sample_texts_unicode(80, seed=5)
    made = make_two_tokenizer_setup(root, texts=texts, t_texts=texts[::-1], s_vocab=420, t_vocab=330, t_seed=7)
    return root, made.s_dir, made.teacher_t, made.corpus


def _precompute(root, s_dir, teacher, corpus, name, **teacher_overrides):
    from common.corpus import CorpusConfig
    from teachers.config import tiny
    from teachers.precompute import run_precompute

    cfg = tiny(str(teacher), str(corpus), str(root / name), seq_len=40,
               corpus=CorpusConfig(dataset=str(corpus), max_tokens=40 * 24))
    cfg.storage.logprob_dtype = "float32"
    cfg.teacher.align_tokenizer = str(s_dir)
    for key, value in teacher_overrides.items():
        setattr(cfg.teacher, key, value)
    return run_precompute(cfg)


@pytest.fixture(scope="module")
def aligned(setup):
    root, s_dir, teacher, corpus = setup
    manifest = _precompute(root, s_dir, teacher, corpus, "aligned", head_chunk_size=64)
    return root / "aligned", manifest


# ---- the independent reference -----------------------------------------------------------------------

def _segments(ids: list[int], eos: int) -> list[list[int]]:
    out, cur = [], []
    for i in ids:
        if i == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(i)
    out.append(cur)
    return out


def _decode(tok, ids: list[int], eos: int) -> str:
    """Decoded text with EOS as SEP (other special tokens, e.g. <bos>, decode to nothing)."""
    return SEP.join(tok.decode(seg, skip_special_tokens=True) for seg in _segments(ids, eos))


def reference_window(s_tok, t_tok, s_ids: list[int]):
    """(teacher ids, {student position: teacher position}, bos positions) from decoded prefixes."""
    s_eos, t_eos, t_bos = s_tok.eos_token_id, t_tok.eos_token_id, t_tok.bos_token_id
    t_ids: list[int] = []
    for n, seg in enumerate(_segments(s_ids, s_eos)):
        if n:
            t_ids.append(t_eos)
        t_ids += t_tok(s_tok.decode(seg), add_special_tokens=True)["input_ids"]  # <bos> + text
    full = _decode(s_tok, s_ids, s_eos)
    assert full == _decode(t_tok, t_ids, t_eos), "the teacher must see exactly the window's text"
    # a cut after token i lies between characters iff decoding both sides and joining gives the text back
    # (a cut inside a character leaves a replacement character on each side)
    t_prefix = {}
    for u in range(len(t_ids)):
        q = _decode(t_tok, t_ids[: u + 1], t_eos)
        if q + _decode(t_tok, t_ids[u + 1:], t_eos) == full:
            t_prefix[q] = u  # the last teacher position with this decoded prefix
    aligned = {}
    for t in range(len(s_ids)):
        p = _decode(s_tok, s_ids[: t + 1], s_eos)
        rest = _decode(s_tok, s_ids[t + 1:], s_eos)
        if p + rest == full and p in t_prefix:
            aligned[t] = t_prefix[p]
    bos = {u for u, i in enumerate(t_ids) if i == t_bos}
    return t_ids, aligned, bos


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as published with GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def reference_map(s_tok, t_tok, size: int) -> np.ndarray:
    """Teacher id -> first S token of its decoded text (byte-fallback tokens: S's token for that byte)."""
    byte_char = _bytes_to_unicode()
    out = np.full(size, -1, dtype=np.int64)
    special = set(t_tok.all_special_ids)
    for v in range(size):
        piece = t_tok.convert_ids_to_tokens(v)
        if v == t_tok.eos_token_id:
            out[v] = s_tok.eos_token_id
        elif v in special:
            continue
        elif piece.startswith("<0x") and len(piece) == 6:
            out[v] = s_tok.convert_tokens_to_ids(byte_char[int(piece[3:5], 16)])
        else:
            ids = s_tok(t_tok.decode([v]), add_special_tokens=False)["input_ids"]
            out[v] = ids[0] if ids else -1
    return out


def test_vocab_map_matches_decoding(setup):
    from transformers import AutoTokenizer

    from teachers.align import MAP_KINDS, build_vocab_map

    _, s_dir, teacher, _ = setup
    s_tok, t_tok = AutoTokenizer.from_pretrained(str(s_dir)), AutoTokenizer.from_pretrained(str(teacher))
    vm = build_vocab_map(t_tok, s_tok)
    ref = reference_map(s_tok, t_tok, len(t_tok))
    np.testing.assert_array_equal(vm.target, ref)
    counts = vm.counts()
    assert counts["byte_fallback"] == 256 and counts["special"] == 1
    assert counts["unmappable"] == len(t_tok.all_special_ids) - 1  # <pad>, <bos>
    assert counts["whole"] > 0 and counts["first_subtoken"] > 0 and sum(counts.values()) == len(t_tok)
    whole = vm.kind == MAP_KINDS.index("whole")
    for v in np.flatnonzero(whole)[:50]:
        assert len(s_tok(t_tok.decode([int(v)]), add_special_tokens=False)["input_ids"]) == 1


def test_aligned_cache_matches_float64_reference(setup, aligned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from storage.reader import TeacherDataset

    root, s_dir, teacher, _ = setup
    path, manifest = aligned
    s_tok, t_tok = AutoTokenizer.from_pretrained(str(s_dir)), AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    weight = model.get_output_embeddings().weight.detach().double()
    vmap = torch.from_numpy(reference_map(s_tok, t_tok, weight.shape[0]))
    n_s, k = len(s_tok), manifest.top_k
    onehot = torch.zeros((weight.shape[0], n_s), dtype=torch.float64)
    ok = vmap >= 0
    onehot[torch.nonzero(ok).squeeze(1), vmap[ok]] = 1.0

    ds = TeacherDataset.open(str(path))
    data = ds.read(np.arange(len(ds)))
    assert manifest.vocab_size == n_s and manifest.alignment["teacher_vocab_size"] == weight.shape[0]
    checked_obs = masked = total_aligned = 0
    for row in range(len(ds)):
        s_ids = data.input_ids[row].tolist()
        t_ids, ref_aligned, bos = reference_window(s_tok, t_tok, s_ids)
        mask = data.target_mask[row]
        np.testing.assert_array_equal(np.flatnonzero(mask), sorted(ref_aligned), err_msg=f"row {row}")
        masked += int((mask == 0).sum())
        total_aligned += len(ref_aligned)
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([t_ids])).last_hidden_state[0].double()
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)  # [Lt, V] float64
        q = logp.exp() @ onehot
        q = q / q.sum(-1, keepdim=True)
        logq = q.log()
        ent = -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)
        for t, u in ref_aligned.items():
            ids = data.topk_ids[row, t].astype(np.int64)
            ref_lp = logq[u, ids].numpy()
            np.testing.assert_allclose(data.topk_logprobs[row, t], ref_lp, atol=2e-4, err_msg=f"row {row} t {t}")
            kth = torch.topk(logq[u], k).values[-1].item()
            assert data.topk_logprobs[row, t].min() >= kth - 2e-4  # the stored ids are the top k
            assert len(set(ids.tolist())) == k
            np.testing.assert_allclose(data.entropy[row, t], ent[u].item(), atol=2e-4, rtol=1e-4)
            # observed next S token: the teacher's own tokens covering exactly its bytes
            if t + 1 < len(s_ids) and t + 1 in ref_aligned and ref_aligned[t + 1] > u:
                u1 = ref_aligned[t + 1]
                ref_obs = sum(logp[j, t_ids[j + 1]].item() for j in range(u, u1) if j + 1 not in bos)
                np.testing.assert_allclose(data.observed_logprob[row, t], ref_obs, atol=2e-4)
                checked_obs += 1
            else:
                assert np.isnan(data.observed_logprob[row, t])
        unaligned = np.flatnonzero(mask == 0)
        assert np.isnan(data.observed_logprob[row, unaligned]).all()
        assert np.isnan(data.entropy[row, unaligned]).all()
    assert masked > 0 and checked_obs > 0  # the corpus exercises both cases
    totals = manifest.alignment_totals()
    assert totals["aligned"] == total_aligned and totals["positions"] == len(ds) * manifest.seq_len
    assert totals["observed"] == checked_obs
    assert 0.3 < totals["coverage"] < 1.0
    np.testing.assert_allclose(totals["mass_whole"] + totals["mass_partial"] + totals["mass_unmapped"],
                               total_aligned, rtol=1e-5)


@pytest.mark.slow
def test_head_chunk_size_does_not_change_the_result(setup, aligned):
    from storage.reader import TeacherDataset

    root, s_dir, teacher, corpus = setup
    path, _ = aligned
    _precompute(root, s_dir, teacher, corpus, "chunk1", head_chunk_size=1)
    _precompute(root, s_dir, teacher, corpus, "chunk7", head_chunk_size=7, batch_size=3)
    a = TeacherDataset.open(str(path))
    rows = np.arange(len(a))
    ref = a.read_columns(rows, a.manifest.column_names())
    for name in ("chunk1", "chunk7"):
        b = TeacherDataset.open(str(root / name))
        got = b.read_columns(rows, b.manifest.column_names())
        for col, arr in ref.items():
            if col in ("topk_ids", "input_ids", "seq_id", "target_mask"):
                np.testing.assert_array_equal(got[col], arr, err_msg=f"{name} {col}")
            else:
                np.testing.assert_allclose(got[col], arr, atol=1e-5, rtol=1e-5, err_msg=f"{name} {col}")


def test_aligned_head_matches_dense_reference():
    from teachers.head import aligned_dense_reference, aligned_head

    g = torch.Generator().manual_seed(0)
    n, h, v, s = 13, 8, 50, 30
    hidden, weight = torch.randn(n, h, generator=g), 3 * torch.randn(v, h, generator=g)
    vmap = torch.randint(0, s, (v,), generator=g)
    vmap[:4] = -1
    whole = torch.rand(v, generator=g) < 0.5
    project = torch.ones(n, dtype=torch.bool)
    project[3] = False
    nxt = torch.randint(0, v, (n,), generator=g)
    ids, lp, ent, nlp, mw, mu = aligned_head(hidden, weight, vocab_map=vmap, map_whole=whole, student_vocab=s,
                                             k=5, project=project, next_ids=nxt, chunk_size=4)
    r_ids, r_lp, r_ent, logp = aligned_dense_reference(hidden, weight, vocab_map=vmap, student_vocab=s, k=5)
    sel = project.nonzero().squeeze(1)
    np.testing.assert_array_equal(ids[sel].long().numpy(), r_ids[sel].numpy())
    np.testing.assert_allclose(lp[sel].numpy(), r_lp[sel].numpy(), atol=1e-5)
    np.testing.assert_allclose(ent[sel].numpy(), r_ent[sel].numpy(), atol=1e-5)
    np.testing.assert_allclose(nlp.numpy(), logp.gather(1, nxt[:, None]).squeeze(1).numpy(), atol=1e-5)
    p = logp.exp()
    np.testing.assert_allclose(mw[sel].numpy(), (p * whole.double()).sum(1)[sel].numpy(), atol=1e-6)
    np.testing.assert_allclose(mu[sel].numpy(), p[:, :4].sum(1)[sel].numpy(), atol=1e-6)
    assert (ent[3] == 0) and (lp[3] == 0).all()  # rows not projected are left at zero
