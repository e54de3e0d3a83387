"""The one targets path of stage two: cache columns -> per-teacher views -> fused target.

Training's loader (`student.data.DistillDataset`) and `evaluate` (`student.evaluation.sources`) both read a
batch of B windows of L tokens through `cache_columns` and `cache_views`, and fuse with `fuse`, so a student is
scored against exactly the target it was trained towards. A view (`TeacherView`) is one teacher's sparse target
over the n = B * L positions: its ids and log-probs (an aligned cache's observed-token corrected, see
student/observed.py), its entropy (when the weighting reads it), its validity and log p(o), the teacher's
log-prob of the observed next token o = input_ids[t + 1] (when the weighting reads it).

log p(o) comes from the cache's `observed_logprob` column, exact, wherever it holds a value. Elsewhere (a cache
written before top-k and sampled caches stored the column; an aligned cache where o does not end on a teacher
token boundary) it is read off the teacher's list: o's entry when o is in it ("listed"), else the upper bound
log(min(tail, smallest listed probability)) ("bounded"; a sampled cache has no tail, so log 0 = -inf there).
A window's last position has no o inside the window: NaN. Each position's source goes with the view, and its
counts over the positions where the teacher has a target (`TeacherView.observed_counts`, taken after
`with_loss_mask`, so a conversation's prompt positions are not counted) are what training and evaluate log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from storage.manifest import Manifest
from student.fusion import FusedTargets, fuse_topk
from student.observed import apply_observed_correction, next_tokens, observed_logprobs
from student.weighting import ENTROPY, OBSERVED, Weighting, WeightInputs

OBSERVED_SOURCES = ("exact", "listed", "bounded")
"""Where a view's log p(o) came from, the order of `TeacherView.observed_counts`."""


@dataclass
class TeacherView:
    """One teacher's sparse target for the n = B * L positions of a batch."""

    ids: torch.Tensor
    """[n, k] integer ids (top-k, or a sampled cache's drawn ids)."""
    logprobs: torch.Tensor
    """[n, k] float32 log-probs at `ids` (a sampled cache: log(count / N))."""
    entropy: torch.Tensor | None
    """[n] float32 entropy (exact, or the cache's estimate); None when not read (the weighting does not need it)."""
    valid: torch.Tensor | None = None
    """[n] bool: positions where the teacher has a target (an aligned cache's target_mask); None: all."""
    tailless: bool = False
    """A sampled cache: the list is the whole target (no tail)."""
    observed: torch.Tensor | None = None
    """[n] float32 log p(o) (NaN at each window's last position); None when not needed."""
    observed_source: torch.Tensor | None = None
    """[n] int8: where each position's log p(o) came from, an index into `OBSERVED_SOURCES` (-1 at each window's
    last position, which has no o); None with `observed`."""

    @property
    def observed_counts(self) -> torch.Tensor | None:
        """[3] int64: positions with a target and a next token whose log p(o) is exact, listed, bounded
        (`OBSERVED_SOURCES`), over the current `valid`; None with `observed`."""
        if self.observed_source is None:
            return None
        src = self.observed_source.long().cpu()
        if self.valid is not None:
            src = torch.where(self.valid.cpu(), src, torch.full_like(src, -1))
        return torch.stack([(src == i).sum() for i in range(len(OBSERVED_SOURCES))]).long()

    def to(self, device: str | torch.device) -> TeacherView:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TeacherView(move(self.ids), move(self.logprobs), move(self.entropy), move(self.valid), self.tailless,
                           move(self.observed), move(self.observed_source))


def target_columns(m: Manifest) -> list[str]:
    """The columns of a teacher's sparse target: topk_ids + topk_logprobs, or sample_ids + sample_counts."""
    return ["sample_ids", "sample_counts"] if m.target_kind == "sampled" else ["topk_ids", "topk_logprobs"]


def sparse_target(cols: dict[str, np.ndarray], m: Manifest, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, w] int, log-probs [n, w]) of one teacher's sparse target from its read columns (n = B * L).

    Top-k: the stored ids and log-probs. Sampled: the drawn ids and log(count / N), the unbiased estimate
    of the teacher's probabilities (float32; -inf at padding slots, whose id repeats slot 0's, so they add
    nothing). Its probabilities sum to 1: no tail.
    """
    if m.target_kind != "sampled":
        return (torch.from_numpy(cols["topk_ids"]).reshape(n, -1),
                torch.from_numpy(cols["topk_logprobs"]).reshape(n, -1))
    counts = torch.from_numpy(cols["sample_counts"].astype(np.float32)).reshape(n, -1)
    return torch.from_numpy(cols["sample_ids"]).reshape(n, -1), torch.log(counts / float(m.samples))


def cache_columns(m: Manifest, weighting: Weighting, *, observed_correction: bool) -> list[str]:
    """The columns of one cache that its view needs under `weighting` (input_ids first)."""
    cols = ["input_ids", *target_columns(m)]
    if ENTROPY in weighting.needs:
        cols.append("entropy")
    if m.aligned:  # a teacher with another tokenizer: targets only where its token boundaries are ours
        cols.append("target_mask")
    if m.has_observed_logprob and (OBSERVED in weighting.needs or (m.aligned and observed_correction)):
        cols.append("observed_logprob")
    return cols


def listed_observed(ids: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor, *, tailless: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(o) [n] float32, bounded [n] bool) read off a teacher's list: ids [n, k], logprobs [n, k], labels
    [n] int64 (o). o's own entry where it is listed, else the bound log(min(tail, smallest listed p)), with
    tail = 1 - sum p (clamped to [0, 1]; 0 for a tailless list)."""
    lp = logprobs.float()
    hit = ids.long() == labels.long().unsqueeze(1)  # [n, k]
    inside = hit.any(dim=1)
    own = torch.where(hit, lp, torch.full_like(lp, -torch.inf)).amax(dim=1)  # [n]
    p = lp.exp()
    tail = torch.zeros_like(lp[:, 0]) if tailless else (1.0 - p.sum(dim=1)).clamp(0.0, 1.0)  # [n]
    bound = torch.minimum(tail, p.amin(dim=1)).log()
    return torch.where(inside, own, bound), ~inside


def cache_view(cols: dict[str, np.ndarray], m: Manifest, weighting: Weighting, *, observed_correction: bool
               ) -> TeacherView:
    """One teacher's view of a batch from its columns (`cache_columns`), input_ids [B, L] among them."""
    input_ids = cols["input_ids"]
    b, seq_len = input_ids.shape
    n = b * seq_len
    ids, lps = sparse_target(cols, m, n)
    ent = torch.from_numpy(cols["entropy"]).reshape(n).float() if "entropy" in cols else None
    valid = torch.from_numpy(cols["target_mask"] != 0).reshape(n) if "target_mask" in cols else None
    labels = next_tokens(input_ids)  # [n]; the last position's is a placeholder
    exact = observed_logprobs(cols["observed_logprob"]) if "observed_logprob" in cols else None  # [n], NaN at L-1
    if exact is not None and m.aligned and observed_correction:
        ids, lps, ent = apply_observed_correction(ids, lps, ent, exact, labels)
    sampled = m.target_kind == "sampled"
    obs = source = None
    if OBSERVED in weighting.needs:
        listed, bounded = listed_observed(ids, lps, labels, tailless=sampled)
        have = ~torch.isnan(exact) if exact is not None else torch.zeros(n, dtype=torch.bool)
        obs = torch.where(have, exact if exact is not None else listed, listed)
        last = torch.zeros((b, seq_len), dtype=torch.bool)
        last[:, -1] = True
        last = last.reshape(n)
        obs = torch.where(last, torch.full_like(obs, float("nan")), obs)
        source = torch.where(have, 0, torch.where(bounded, 2, 1)).to(torch.int8)
        source = torch.where(last, torch.full_like(source, -1), source)
    return TeacherView(ids, lps.float(), ent, valid, sampled, obs, source)


def cache_views(cols: Sequence[dict[str, np.ndarray]], manifests: Sequence[Manifest], weighting: Weighting, *,
                observed_correction: bool) -> list[TeacherView]:
    """The K caches' views of one batch (each `cols[k]` read with `cache_columns(manifests[k], ...)`)."""
    return [cache_view(c, m, weighting, observed_correction=observed_correction)
            for c, m in zip(cols, manifests, strict=True)]


def valid_mask(views: Sequence[TeacherView]) -> torch.Tensor:
    """[n, K] bool: where each teacher has a target."""
    n = views[0].ids.shape[0]
    return torch.stack([torch.ones(n, dtype=torch.bool, device=v.ids.device) if v.valid is None else v.valid
                        for v in views], dim=1)


def with_loss_mask(views: Sequence[TeacherView], loss_mask: torch.Tensor) -> list[TeacherView]:
    """The views with no target outside `loss_mask` [n] bool (conversations: the assistant positions), so the
    weights, the fused target and every KD figure see only the positions the losses use."""
    return [replace(v, valid=loss_mask if v.valid is None else v.valid & loss_mask) for v in views]


def fuse(views: Sequence[TeacherView], weighting: Weighting, seq_len: int) -> FusedTargets:
    """The fused target of K views of B windows of `seq_len` (alpha from `weighting`, then `fuse_topk`)."""
    n = views[0].ids.shape[0]
    valid = valid_mask(views) if any(v.valid is not None for v in views) else None
    ent = obs = None
    if ENTROPY in weighting.needs:
        ent = torch.stack([v.entropy.float() for v in views], dim=1)  # [n, K] (NaN where not valid)
    if OBSERVED in weighting.needs:
        obs = torch.stack([v.observed.float() for v in views], dim=1)  # [n, K] (NaN at each last position)
    alpha = weighting.alpha(WeightInputs(num_teachers=len(views), seq_len=seq_len, valid=valid, entropy=ent,
                                         observed=obs, rows=n, device=views[0].ids.device))
    return fuse_topk([v.ids for v in views], [v.logprobs for v in views], alpha, valid,
                     tailless=[v.tailless for v in views])


def observed_counts(views: Sequence[TeacherView]) -> torch.Tensor | None:
    """[K, 3] int64 (`OBSERVED_SOURCES` per teacher) of a batch's views, or None when log p(o) was not read."""
    counts = [v.observed_counts for v in views]
    if any(c is None for c in counts):
        return None
    return torch.stack(counts)
