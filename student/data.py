"""Join K teacher caches, split off a held-out slice, and load fused training batches.

Join rules (refused with MismatchError naming the field and both values): tokenizer fingerprint, seq_len,
corpus fingerprint and vocab size (JOIN_FIELDS), the sequence ids, and the precompute temperature.
input_ids are compared on a seeded spot-check of sequences at join time (fast failure without reading a
whole cache), and again for every batch the loader reads (the column costs 4 bytes per token against
~200 for the targets), so every sequence trained on is verified. top-k may differ between teachers: each
teacher's target is its own top-k plus its own tail (student/fusion.py), so different k are exact. Top-k and
sampled caches (`precompute --targets sampled`) may be mixed: a sampled teacher's sparse target is its drawn
ids with probabilities count / N (`student.targets.sparse_target`), an unbiased estimate of its distribution
with no tail.
Caches of conversations (`precompute --corpus-format chat`) carry a `loss_mask` column: the teachers' masks
must agree (manifest entry and spot check at join, every batch again), and the loader gives no teacher a
target outside the mask and hands the mask to CE (`DistillBatch.loss_mask`).

Batches are `DistillBatch`es (student/batch.py); the fusion (per-teacher views, weights and tails, through the
targets path evaluate shares, student/targets.py) runs in the DataLoader workers, so the training process only
receives the fused sparse target.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from common.errors import ConfigError, UserError
from storage.consistency import JOIN_FIELDS
from storage.errors import MismatchError
from storage.manifest import Manifest
from storage.reader import TeacherDataset
from storage.stamps import VerifyReport
from student.batch import DistillBatch, FailedBatch
from student.targets import cache_columns, cache_views, fuse, observed_counts, with_loss_mask
from student.weighting import DEFAULT_SETTINGS, WeightSettings, scheme

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


def check_weighting(teachers: Sequence[TeacherDataset], mode: str,
                    settings: WeightSettings = DEFAULT_SETTINGS) -> None:
    """Refuse (or warn about) caches the weighting scheme `mode` cannot use (`Weighting.check_caches`)."""
    scheme(mode, settings).check_caches(teachers)


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
                 settings: WeightSettings = DEFAULT_SETTINGS,
                 pooled_layers: Sequence[int | None] | None = None, observed_correction: bool = True) -> None:
        self.teachers = list(teachers)
        self.observed_correction = observed_correction
        self.positions = np.asarray(positions, dtype=np.int64)
        self.weighting = scheme(weighting, settings)
        self.pooled_layers = list(pooled_layers) if pooled_layers is not None else [None] * len(self.teachers)
        self.columns = []  # only what the loss needs, per teacher
        self.mask_column = loss_mask_column(self.teachers[0].manifest)  # join_teachers: the same for all
        for t, layer in zip(self.teachers, self.pooled_layers, strict=True):
            cols = cache_columns(t.manifest, self.weighting, observed_correction=observed_correction)
            if self.mask_column is not None:
                cols.append(self.mask_column)
            if layer is not None:
                cols.append(f"pooled_{layer}")
            self.columns.append(cols)

    def __len__(self) -> int:
        return int(self.positions.size)

    def __getitem__(self, index: int) -> DistillBatch | FailedBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> DistillBatch | FailedBatch:
        """The fused micro-batch of `indices`. In a DataLoader worker, an error of the user's data (a damaged
        shard) is returned as a `FailedBatch`, which the training process raises as one line; in the
        training process itself (no workers) it is raised here."""
        try:
            return self._batch(indices)
        except UserError as e:
            if get_worker_info() is None:
                raise
            return FailedBatch.of(e)

    def _batch(self, indices: Sequence[int]) -> DistillBatch:
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
        views = cache_views(cols, [t.manifest for t in self.teachers], self.weighting,
                            observed_correction=self.observed_correction)
        loss_mask = None
        if self.mask_column is not None:  # conversations: no teacher has a target outside the assistant replies
            loss_mask = torch.from_numpy(cols[0][self.mask_column] != 0)  # [B, L] bool
            views = with_loss_mask(views, loss_mask.reshape(-1))
        fused = fuse(views, self.weighting, input_ids.shape[1])
        pooled = [None if layer is None else torch.from_numpy(c[f"pooled_{layer}"]).float()
                  for c, layer in zip(cols, self.pooled_layers, strict=True)]
        return DistillBatch(
            seq_ids=torch.from_numpy(self.teachers[0].seq_ids[pos].copy()),  # [B] int64
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),  # [B, L] int64
            fused=fused, pooled=pooled, mismatch=mismatch, mismatch_field=mismatch_field, loss_mask=loss_mask,
            observed_counts=observed_counts(views))


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
