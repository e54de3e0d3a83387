"""`evaluate`'s metrics: next-token NLL, KL to each teacher and to the fused target, top-1 agreement, BLEU of
greedy continuations, and the paired bootstrap between students.

Position t of a window predicts token t + 1: KL and agreement use every position (the teacher target exists
for all of them), perplexity uses positions 0..L-2 of each window. "KL fused" is the training KD quantity
sum_k alpha_k KL_k (`student.loss.terms.sparse_kl`): each teacher's top-k plus its own tail against the student's
view on the same partition, at the caches' temperature; at top-k = vocab it is the full-vocab
sum_k alpha_k KL(P_Tk || P_S), 0 when the student equals every teacher. An aligned cache has targets only where
its `target_mask` is set: its KL averages over those positions, the fused KL and agreement over positions where
some teacher has a target, and the counts are kept apart (`kl_positions`, `positions`). Caches of
conversations (`loss_mask`): every figure, perplexity included, averages over the masked positions only (the
next token belongs to an assistant reply); no teacher has a target elsewhere.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from student.fusion import FusedTargets
from student.fusion import fused_top1 as known_top1
from student.loss.terms import sparse_kl, teacher_kl


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor,
                   loss_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Sum and count of -log q(x_{t+1} | x_<=t) over positions 0..L-2: logits [B, L, V], input_ids [B, L];
    loss_mask [B, L] bool (conversations): only the positions it marks."""
    v = logits.shape[-1]
    if loss_mask is not None:
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(),
                              reduction="none")
        use = loss_mask[:, :-1].reshape(-1)
        return float(nll[use].sum()), int(use.sum())
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(), reduction="sum"
    )
    return float(nll), int(input_ids[:, 1:].numel())


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> list[float]:
    """Mean -log q(x_{t+1} | x_<=t) over positions 0..L-2 of each window: logits [B, L, V] -> B floats. With
    loss_mask [B, L] bool (conversations), the mean over the positions it marks, for the windows that have any."""
    b, _, v = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(),
                          reduction="none")
    if loss_mask is not None:
        use = loss_mask[:, :-1].to(nll.dtype)
        count = use.sum(dim=1)
        means = (nll.reshape(b, -1) * use).sum(dim=1) / count.clamp_min(1)
        return [float(m) for m, c in zip(means.tolist(), count.tolist(), strict=True) if c > 0]
    return nll.reshape(b, -1).mean(dim=1).tolist()


@dataclass
class Scores:
    """Running sums for one model."""

    nll: float = 0.0
    count: int = 0
    kl: dict[str, float] = field(default_factory=dict)
    kl_fused: float = 0.0
    agree: int = 0
    positions: int = 0
    """Positions where some teacher has a target (all of them, unless a cache is aligned)."""
    kl_positions: dict[str, int] = field(default_factory=dict)
    """Per teacher: positions where it has a target (an aligned cache's `target_mask`)."""
    window_nll: list[float] = field(default_factory=list)
    """Mean next-token NLL of each held-out window, in window order (for the paired bootstrap)."""
    window_kl: list[float] = field(default_factory=list)
    """Mean KL to the fused target of each window (over its positions with a target)."""

    def add_nll(self, logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> None:
        """logits [B, L, V] float32, ids [B, L]; loss_mask [B, L] bool (conversations) or None."""
        nll, cnt = next_token_nll(logits, ids, loss_mask)
        self.nll += nll
        self.count += cnt
        self.window_nll += window_nll(logits, ids, loss_mask)

    def add_targets(self, logits: torch.Tensor, ids: torch.Tensor, fused: FusedTargets, valid: torch.Tensor,
                    names: list[str], temperature: float, masked: bool = False) -> None:
        """KL to each teacher and to the fused target, and top-1 agreement, for logits [B, L, V] float32;
        `valid` [N, K] bool says where each teacher has a target. masked (conversations, `valid` holds the loss
        mask): a window without any target adds no per-window KL (as `window_nll`)."""
        flat = logits.reshape(ids.numel(), -1)  # [N, V]
        has = fused.has_target  # [N]
        self.positions += int(has.sum())
        self.agree += int(((flat.argmax(dim=-1) == known_top1(fused)) & has).sum())
        per_teacher = teacher_kl(flat, fused, temperature=temperature) * temperature**2  # [N, K]
        for k, name in enumerate(names):
            self.kl[name] = self.kl.get(name, 0.0) + float((per_teacher[:, k] * valid[:, k]).sum())
            self.kl_positions[name] = self.kl_positions.get(name, 0) + int(valid[:, k].sum())
        kl = (sparse_kl(flat, fused, temperature=temperature, reduction="none") * has).reshape(ids.shape)
        self.kl_fused += float(kl.sum())
        per_window = has.reshape(ids.shape).sum(dim=1)
        window_kl = (kl.sum(dim=1) / per_window.clamp_min(1)).tolist()
        if masked:  # keep the windows that have a target, as window_nll keeps those with a masked position
            window_kl = [x for x, c in zip(window_kl, per_window.tolist(), strict=True) if c > 0]
        self.window_kl += window_kl


def greedy_continuations(model: Any, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation [n, new_tokens] int64 of equal-length prompts [n, P] (KV cache, no padding)."""
    # transformers 5 renamed the KV-cache argument and output field `past_key_values` to `cache`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=prompts, use_cache=True)
        nxt = out.logits[:, -1].argmax(dim=-1)
        tokens = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt[:, None], use_cache=True, **{cache_arg: getattr(out, cache_arg)})
            nxt = out.logits[:, -1].argmax(dim=-1)
            tokens.append(nxt)
    return torch.stack(tokens, dim=1)


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults) of hypotheses against one or more reference streams."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, references).score)


def decode_until_eos(tokenizer: Any, ids: list[int], eos: int | None) -> str:
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def bleu_scores(texts: dict[str, list[str]], truth: list[str], students: list[str],
                teachers: list[str]) -> dict[str, dict[str, float]]:
    """Per model: BLEU against the held-out text; a student's also against each teacher's continuations."""
    out = {}
    for label in [*students, *teachers]:
        res = {"reference": bleu(texts[label], [truth])}
        if label in students and teachers:
            for t in teachers:
                res[t] = bleu(texts[label], [texts[t]])
            res["teachers"] = bleu(texts[label], [texts[t] for t in teachers])
        out[label] = res
    return out


def compare_students(scores: dict[str, Scores], students: list[str], replicates: int,
                     seed: int) -> list[dict[str, Any]]:
    """The first student against each other one: differences with paired-bootstrap intervals over windows."""
    from student.stats import mean, paired_bootstrap, perplexity_of_means

    out: list[dict[str, Any]] = []
    if replicates < 1 or not students:
        return out
    first = students[0]
    for other in students[1:]:
        a, b = scores[first], scores[other]
        if len(a.window_nll) < 2:
            break
        rec: dict[str, Any] = {"a": first, "b": other, "replicates": replicates, "windows": len(a.window_nll)}
        metrics = [("perplexity", a.window_nll, b.window_nll, perplexity_of_means),
                   ("nll", a.window_nll, b.window_nll, mean)]
        if a.window_kl and b.window_kl:
            metrics.append(("kl_fused", a.window_kl, b.window_kl, mean))
        for name, x, y, stat in metrics:
            r = paired_bootstrap(x, y, n=replicates, seed=seed, stat=stat)
            rec[name] = {"difference": r.estimate, "low": r.low, "high": r.high, "excludes_zero": r.excludes_zero()}
        out.append(rec)
    return out
