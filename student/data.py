"""Join K teacher caches, split off a held-out slice, and load fused training batches.

Join rules (refused with MismatchError naming the field and both values): tokenizer fingerprint, seq_len,
corpus fingerprint and vocab size (JOIN_FIELDS), the sequence ids, and the precompute temperature.
input_ids are compared on a seeded spot-check of sequences at join time (fast failure without reading a
whole cache), and again for every batch the loader reads (the column costs 4 bytes per token against
~200 for the targets), so every sequence trained on is verified. top-k may differ between teachers: each
teacher's target is its own top-k plus its own tail (student/fusion.py), so different k are exact. Top-k and
sampled caches (`precompute --targets sampled`) may be mixed: a sampled teacher's sparse target is its drawn
ids with probabilities count / N (`sparse_target`), an unbiased estimate of its distribution with no tail.
Caches of conversations (`precompute --corpus-format chat`) carry a `loss_mask` column: the teachers' masks
must agree (manifest entry and spot check at join, every batch again), and the loader gives no teacher a
target outside the mask and hands the mask to CE (`DistillBatch.loss_mask`).

Batches are `DistillBatch`es (student/batch.py); the fusion (per-teacher probabilities, tails and weights) runs in the
DataLoader workers, so the training process only receives the fused sparse target.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common.errors import ConfigError
from storage.errors import MismatchError
from storage.manifest import JOIN_FIELDS, Manifest
from storage.reader import TeacherDataset
from storage.stamps import VerifyReport
from student.batch import DistillBatch
from student.fusion import fuse_topk, teacher_weights
from student.observed import apply_observed_correction, next_tokens, observed_logprobs

log = logging.getLogger("student")
LOSS_MASK_POSITIONS = "assistant replies only (loss_mask)"
"""What metrics lines and evaluation reports say they average over, for caches of conversations."""


def join_teachers(paths: Sequence[str], *, spot_check: int = 16, seed: int = 0,
                  verify: bool | str = "stamp") -> list[TeacherDataset]:
    """Open and cross-check K teacher directories; the first is the reference the others must match.

    verify: how each cache's shards are checked on open (`TeacherDataset.open`); False leaves it to the
    caller (training verifies on rank 0 only, `verify_teachers`)."""
    teachers = [TeacherDataset.open(p, verify=verify) for p in paths]
    ref, ref_path = teachers[0], paths[0]
    for other, path in zip(teachers[1:], paths[1:], strict=True):
        what = f"teachers {ref_path!r} and {path!r}"
        check_token_space(ref.manifest, other.manifest, what)
        ref.manifest.compare(other.manifest, JOIN_FIELDS, what=what)
        ref.manifest.compare(other.manifest, ("temperature",), what=what)
        if not np.array_equal(ref.seq_ids, other.seq_ids):
            a, b = ref.seq_ids, other.seq_ids
            diff = _describe_ids(a, b)
            raise MismatchError(f"{what} differ in 'seq_ids': {diff}", "seq_ids", (len(a), len(b)))
    if len(ref) == 0:
        raise ConfigError(f"teacher {ref_path!r} holds no sequences")
    if len(teachers) > 1 and spot_check > 0:
        rng = np.random.default_rng(seed)
        pos = np.unique(np.concatenate([[0, len(ref) - 1], rng.integers(0, len(ref), spot_check)]))
        ids0 = ref.read_columns(pos, ["input_ids"])["input_ids"]
        for other, path in zip(teachers[1:], paths[1:], strict=True):
            bad = first_mismatch(ids0, other.read_columns(pos, ["input_ids"])["input_ids"])
            if bad is not None:
                sid = int(ref.seq_ids[pos[bad]])
                raise MismatchError(f"teachers {ref_path!r} and {path!r} differ in 'input_ids' at seq id {sid}",
                                    "input_ids", (ref_path, path))
        if ref.manifest.loss_mask is not None:  # conversations: the teachers' masks must agree too
            check_loss_masks(teachers, paths, pos)
    ks = [t.manifest.top_k for t in teachers]
    if len(set(ks)) > 1:
        log.info("teachers store different top-k %s; each is compared on its own top-k plus tail", ks)
    return teachers


def loss_mask_column(m: Manifest) -> str | None:
    """The cache's loss-mask column (conversations), or None (text: every position counts)."""
    return None if m.loss_mask is None else str(m.loss_mask["column"])


def check_loss_masks(teachers: Sequence[TeacherDataset], paths: Sequence[str], pos: np.ndarray) -> None:
    """MismatchError naming the sequence when two conversation caches mark other positions at `pos`."""
    name = loss_mask_column(teachers[0].manifest)
    assert name is not None, "check_loss_masks needs conversation caches"
    ref = teachers[0].read_columns(pos, [name])[name]
    for other, path in zip(teachers[1:], paths[1:], strict=True):
        bad = first_mismatch(ref, other.read_columns(pos, [name])[name])
        if bad is not None:
            sid = int(teachers[0].seq_ids[pos[bad]])
            raise MismatchError(f"teachers {paths[0]!r} and {path!r} differ in {name!r} at seq id {sid}", name,
                                (paths[0], path))


def verify_teachers(teachers: Sequence[TeacherDataset], mode: str) -> list[VerifyReport]:
    """Check every teacher's shards under `mode` (`full` / `stamp` / `off`, storage/stamps.py)."""
    return [t.verify(mode, by="train-student") for t in teachers]


def _token_space(m: Manifest) -> str:
    fp = m.tokenizer_fingerprint[:12]
    if m.alignment is not None:
        return f"aligned to tokenizer {m.alignment['tokenizer']} ({fp}...)"
    return f"in its own tokenizer's space ({fp}...)"


def check_token_space(a: Manifest, b: Manifest, what: str) -> None:
    """MismatchError (one line) when two caches' ids index different tokenizers.

    An aligned cache (precompute --align-tokenizer S) is in S's token space, so it joins caches made with
    tokenizer S and caches aligned to S; anything else mixes token spaces."""
    if a.tokenizer_fingerprint == b.tokenizer_fingerprint:
        return
    hint = ("; precompute the teacher whose tokenizer differs with --align-tokenizer <the student's tokenizer>"
            if a.alignment is None or b.alignment is None else "; align both to the student's tokenizer")
    raise MismatchError(f"{what} are in different token spaces (differ in 'tokenizer_fingerprint'): the first is "
                        f"{_token_space(a)}, the second {_token_space(b)}{hint}", "tokenizer_fingerprint",
                        (a.tokenizer_fingerprint, b.tokenizer_fingerprint))


def _describe_ids(a: np.ndarray, b: np.ndarray) -> str:
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} sequences (ids {a[:1]}..{a[-1:]} vs {b[:1]}..{b[-1:]})"
    i = int(np.flatnonzero(a != b)[0])
    return f"position {i} holds seq id {int(a[i])} vs {int(b[i])}"


def first_mismatch(a: np.ndarray, b: np.ndarray) -> int | None:
    """Index of the first row where two [n, L] arrays differ, or None."""
    rows = np.flatnonzero((a != b).any(axis=1))
    return int(rows[0]) if rows.size else None


def feature_layers(teachers: Sequence[TeacherDataset], requested: int | None, enabled: bool) -> list[int | None]:
    """Pooled layer used for each teacher's feature loss, or None where it is disabled (with a warning)."""
    if not enabled:
        return [None] * len(teachers)
    layers: list[int | None] = []
    for t in teachers:
        stored, name = t.manifest.pooled_layers, t.manifest.teacher.name
        if not stored:
            log.warning("teacher %r stored no pooled states: feature loss disabled for it", name)
            layers.append(None)
        elif requested is not None and requested not in stored:
            log.warning("teacher %r has no pooled layer %d (stored: %s): feature loss disabled for it",
                        name, requested, stored)
            layers.append(None)
        else:
            layers.append(requested if requested is not None else max(stored))
    if all(x is None for x in layers):
        log.warning("no teacher provides the requested pooled states: the feature loss is off")
    return layers


def check_weighting(teachers: Sequence[TeacherDataset], mode: str) -> None:
    """Entropy weighting needs every teacher's entropy column."""
    if mode != "entropy":
        return
    for t in teachers:
        if t.manifest.entropy_kind == "absent":
            raise ConfigError(
                f"teacher {t.manifest.teacher.name!r} ({t.path}) stored no entropy (entropy_kind 'absent'), so "
                "it cannot be entropy-weighted; use --teacher-weighting uniform or fixed")
        if t.manifest.entropy_kind == "estimate":
            log.warning("teacher %r stores an estimated entropy (top-k plus tail), not the exact one",
                        t.manifest.teacher.name)


def check_loss(teachers: Sequence[TeacherDataset], loss: str) -> None:
    """DKD needs top-k caches: refuse sampled ones with one line."""
    if loss != "dkd":
        return
    for t in teachers:
        if t.manifest.target_kind == "sampled":
            raise ConfigError(
                f"--loss dkd cannot use the sampled cache of teacher {t.manifest.teacher.name!r} ({t.path}): DKD "
                "renormalises the teacher's non-target probabilities and takes their log, which is not linear in "
                "the target, so count / N would give a biased loss; use --loss kd (unbiased) or a top-k cache")


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


def split_positions(n: int, *, eval_fraction: float, eval_sequences: int | None, split_seed: int,
                    cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, held-out positions), disjoint, both sorted; the held-out ones are a seeded sample:
    `eval_sequences` of them, else round(eval_fraction * n) but at most `cap`."""
    n_eval = eval_sequences if eval_sequences is not None else int(round(eval_fraction * n))
    if eval_sequences is None and cap is not None:
        n_eval = min(n_eval, cap)
    if n_eval >= n:
        raise ConfigError(f"the held-out slice ({n_eval} sequences) leaves nothing to train on ({n} in the cache)")
    perm = np.random.default_rng(split_seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class DistillDataset(Dataset):
    """Random access by sequence to K joined teachers; items are fused, collated batches.

    Use with `EpochBatchSampler` as the DataLoader's `batch_sampler` and `collate_fn=collate`: the
    DataLoader calls `__getitems__` with a whole micro-batch, which reads each column once per batch.
    """

    def __init__(self, teachers: Sequence[TeacherDataset], positions: np.ndarray, *, weighting: str,
                 fixed_weights: Sequence[float] | None = None, entropy_eps: float = 1e-3,
                 pooled_layers: Sequence[int | None] | None = None, observed_correction: bool = True) -> None:
        self.teachers = list(teachers)
        self.observed_correction = observed_correction
        self.aligned = [t.manifest.alignment is not None for t in self.teachers]
        self.positions = np.asarray(positions, dtype=np.int64)
        self.weighting, self.fixed_weights, self.entropy_eps = weighting, fixed_weights, entropy_eps
        self.pooled_layers = list(pooled_layers) if pooled_layers is not None else [None] * len(self.teachers)
        self.columns = []  # only what the loss needs, per teacher
        self.mask_column = loss_mask_column(self.teachers[0].manifest)  # join_teachers: the same for all
        for t, layer, aligned in zip(self.teachers, self.pooled_layers, self.aligned, strict=True):
            cols = ["input_ids", *target_columns(t.manifest)]
            if self.mask_column is not None:
                cols.append(self.mask_column)
            if weighting == "entropy":
                cols.append("entropy")
            if layer is not None:
                cols.append(f"pooled_{layer}")
            if aligned:  # a teacher with another tokenizer: targets only where its token boundaries are ours
                cols.append("target_mask")
                if observed_correction:
                    cols.append("observed_logprob")
            self.columns.append(cols)

    def __len__(self) -> int:
        return int(self.positions.size)

    def __getitem__(self, index: int) -> DistillBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> DistillBatch:
        pos = self.positions[np.asarray(indices, dtype=np.int64)]
        cols = [t.read_columns(pos, c) for t, c in zip(self.teachers, self.columns, strict=True)]
        input_ids = cols[0]["input_ids"]  # [B, L] int32
        mismatch: int | None = None
        mismatch_field = "input_ids"
        for c in cols[1:]:
            bad, name = first_mismatch(input_ids, c["input_ids"]), "input_ids"
            if bad is None and self.mask_column is not None:
                bad, name = first_mismatch(cols[0][self.mask_column], c[self.mask_column]), self.mask_column
            if bad is not None:
                mismatch, mismatch_field = int(self.teachers[0].seq_ids[pos[bad]]), name
                break
        b, seq_len = input_ids.shape
        n = b * seq_len
        targets = [sparse_target(c, t.manifest, n) for c, t in zip(cols, self.teachers, strict=True)]
        ids, lps = [i for i, _ in targets], [lp for _, lp in targets]
        ents = [torch.from_numpy(c["entropy"]).reshape(n) if "entropy" in c else None for c in cols]
        labels = next_tokens(input_ids)  # the last position's is unknown: no correction there
        valid = torch.ones((n, len(cols)), dtype=torch.bool)
        for k, c in enumerate(cols):
            if not self.aligned[k]:
                continue
            valid[:, k] = torch.from_numpy(c["target_mask"]).reshape(n) != 0
            if self.observed_correction:
                obs = observed_logprobs(c["observed_logprob"])
                ids[k], lps[k], ents[k] = apply_observed_correction(ids[k], lps[k], ents[k], obs, labels)
        if self.weighting == "entropy":
            ent = torch.stack([e.float() for e in ents], dim=1)  # [N, K] (NaN where a teacher has no target)
        else:
            ent = torch.empty((n, len(cols)), dtype=torch.float32)  # shape only
        loss_mask = None
        if self.mask_column is not None:  # conversations: no teacher has a target outside the assistant replies
            loss_mask = torch.from_numpy(cols[0][self.mask_column] != 0)  # [B, L] bool
            valid &= loss_mask.reshape(n, 1)
        mask = valid if any(self.aligned) or loss_mask is not None else None
        alpha = teacher_weights(ent, self.weighting, self.fixed_weights, eps=self.entropy_eps, valid=mask)
        sampled = [t.manifest.target_kind == "sampled" for t in self.teachers]
        fused = fuse_topk(ids, lps, alpha, mask, tailless=sampled)
        pooled = [None if layer is None else torch.from_numpy(c[f"pooled_{layer}"]).float()
                  for c, layer in zip(cols, self.pooled_layers, strict=True)]
        return DistillBatch(
            seq_ids=torch.from_numpy(self.teachers[0].seq_ids[pos].copy()),  # [B] int64
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),  # [B, L] int64
            fused=fused, pooled=pooled, mismatch=mismatch, mismatch_field=mismatch_field, loss_mask=loss_mask)


def collate(batch: DistillBatch) -> DistillBatch:
    """The dataset already returns a collated micro-batch."""
    return batch


class EpochBatchSampler(Sampler[list[int]]):
    """Seeded shuffle per epoch, split across ranks like DistributedSampler, in micro-batches.

    Epoch e uses permutation p = randperm(n, seed + e); global micro-batch j is p[j*W*B:(j+1)*W*B] and rank r
    takes its elements r, r+W, ... (so W ranks with batch B see exactly the sequences one process with
    batch W*B sees). The incomplete last global micro-batch is dropped. `set_epoch(e, start)` resumes at
    micro-batch `start` of epoch e.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{n} training sequences are fewer than one global micro-batch "
                              f"({world_size} ranks x {batch_size}); lower --batch-size")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        step = self.batch_size * self.world_size
        for j in range(self.start, self.batches_per_epoch):
            chunk = perm[j * step : (j + 1) * step]
            yield chunk[self.rank :: self.world_size]
