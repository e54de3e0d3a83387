"""Shard schema v1: column names, dtypes and per-row shapes, derived from a manifest.

| column          | dtype                        | shape of one row |
| seq_id          | int64                        | ()               |
| input_ids       | int32                        | (L,)             |
| topk_ids        | int32                        | (L, k)           |
| topk_logprobs   | manifest.logprob_dtype       | (L, k)           |  (rounded to manifest.logprob_mantissa_bits)
| entropy         | float32 (absent if entropy_kind == "absent") | (L,) |
| pooled_<layer>  | float32 (float16 if manifest.notes["pooled_dtype"] == "float16") | (d,) |
| target_mask     | uint8, aligned caches only (1: the position has a target) | (L,) |
| observed_logprob| float32, aligned caches and plain caches with manifest.observed_logprob (NaN: unavailable,
                  always at the last position) | (L,) |
| loss_mask       | uint8, conversation caches only (manifest.loss_mask; 1: next token is an assistant token) | (L,) |
| doc_start       | uint8, conversation caches only (1: a conversation begins here) | (L,) |

A sampled cache (manifest.target_kind == "sampled", N = manifest.samples = manifest.top_k) stores, in place of
topk_ids and topk_logprobs:

| sample_ids      | int32                        | (L, N)           |  distinct drawn ids, by descending count
| sample_counts   | uint16                       | (L, N)           |  draws per slot (0 at padding); rows sum to N

Parquet stores each non-scalar column as fixed_size_list<dtype>[prod(shape)] (row-major); Zarr stores arrays of
shape [N, *shape]. Both formats embed `shard_header(manifest)` (the run description without the shard list)
so a single shard file describes itself; readers compare it with the manifest that lists the shard when they
open it (`check_header`), so an edited manifest cannot relabel a shard's data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.errors import ManifestError, MismatchError, ShardCorruptError, StorageError
from storage.manifest import BOUNDARY_COLUMN, LOSS_MASK_COLUMN, Manifest, ShardInfo
from storage.records import TeacherTargets

HEADER_KEY = "distill.manifest"
"""Parquet key-value metadata key / Zarr group attribute holding the shard header (JSON)."""
INDEX_KEY = "distill.shard_index"
"""Parquet key-value metadata key / Zarr group attribute holding the global shard index."""


@dataclass(frozen=True)
class Column:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    """Shape of one row (one sequence)."""

    @property
    def width(self) -> int:
        """Values per row (the fixed_size_list length in Parquet)."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def pooled_dtype(m: Manifest) -> np.dtype:
    return np.dtype(np.float16 if m.notes.get("pooled_dtype") == "float16" else np.float32)


def columns(m: Manifest) -> dict[str, Column]:
    """Name -> Column of every column in this manifest's shards, in schema order."""
    L, k = m.seq_len, m.top_k
    cols = [Column("seq_id", np.dtype(np.int64), ()), Column("input_ids", np.dtype(np.int32), (L,))]
    if m.target_kind == "sampled":
        cols += [Column("sample_ids", np.dtype(np.int32), (L, k)), Column("sample_counts", np.dtype(np.uint16), (L, k))]
    else:
        cols += [Column("topk_ids", np.dtype(np.int32), (L, k)),
                 Column("topk_logprobs", np.dtype(m.logprob_dtype), (L, k))]
    if m.entropy_kind != "absent":
        cols.append(Column("entropy", np.dtype(np.float32), (L,)))
    for layer in m.pooled_layers:
        cols.append(Column(f"pooled_{layer}", pooled_dtype(m), (m.pooled_dims[layer],)))
    if m.alignment is not None:
        cols.append(Column("target_mask", np.dtype(np.uint8), (L,)))
        cols.append(Column("observed_logprob", np.dtype(np.float32), (L,)))
    elif m.observed_logprob:
        cols.append(Column("observed_logprob", np.dtype(np.float32), (L,)))
    if m.loss_mask is not None:
        cols += [Column(LOSS_MASK_COLUMN, np.dtype(np.uint8), (L,)), Column(BOUNDARY_COLUMN, np.dtype(np.uint8), (L,))]
    return {c.name: c for c in cols}


NOT_IN_HEADER = ("shards", "slice_index", "num_slices", "notes")
"""Manifest fields a shard's header leaves out: the shard list and slice differ between the parts of one cache,
and `notes` (backend settings, versions, statistics) are facts about a run, not about the data. Every other
manifest field is stored in every shard and compared on open."""


def shard_header(m: Manifest) -> dict:
    """The run description stored inside every shard (no shard list, slice or notes, so it is stable)."""
    d = m.to_dict()
    for name in NOT_IN_HEADER:
        d.pop(name, None)
    return d


def check_header(path: str, stored: Any, m: Manifest) -> None:
    """Raise unless the header stored inside shard `path` describes the same run as manifest `m`.

    A manifest.json edited by hand (temperature, vocab_size, ...) still lists every shard with a valid size
    and sha256, so only the shard's own header can tell: MismatchError naming the shard, the first differing
    field and both values. A missing or unreadable header is a ShardCorruptError. Fields the manifest omits
    in older caches take their defaults on both sides (the header is read through `Manifest.from_dict`)."""
    if not isinstance(stored, dict):
        raise ShardCorruptError(f"{path}: has no run description (header) of a teacher-targets shard")
    try:
        own = Manifest.from_dict({k: v for k, v in stored.items() if k not in NOT_IN_HEADER},
                                 source=f"{path} (its header)")
    except ManifestError as e:
        raise ShardCorruptError(str(e)) from None
    for f in dataclasses.fields(Manifest):
        if f.name in NOT_IN_HEADER:
            continue
        want, got = getattr(m, f.name), getattr(own, f.name)
        if want == got:
            continue
        name = f.name
        if dataclasses.is_dataclass(want) and dataclasses.is_dataclass(got):  # teacher: name the inner field
            inner = next(g.name for g in dataclasses.fields(want) if getattr(want, g.name) != getattr(got, g.name))
            name, want, got = f"{f.name}.{inner}", getattr(want, inner), getattr(got, inner)
        raise MismatchError(f"{path}: field {name!r} is {want!r} in the manifest, {got!r} in the shard's own "
                            "header (the manifest was edited, or the shard belongs to another cache)",
                            name, (want, got))


def round_mantissa(values: np.ndarray, bits: int) -> np.ndarray:
    """float16 / float32 / float64 `values` rounded to `bits` explicit mantissa bits (to nearest, ties to even).

    The result has the same dtype; its dropped low mantissa bits are zero. Relative error <= 2**-(bits + 1)
    for normal numbers; a value may round up into the next binade (and the largest finite ones to inf, as
    in IEEE rounding). NaN and inf pass unchanged. Returns a new array.
    """
    values = np.asarray(values)
    utypes = {np.dtype(np.float16): np.uint16, np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
    if values.dtype not in utypes:
        raise TypeError(f"round_mantissa takes float16, float32 or float64, got {values.dtype}")
    full = np.finfo(values.dtype).nmant
    if not 1 <= bits <= full:
        raise ValueError(f"bits must be in 1..{full} for {values.dtype}, got {bits}")
    if bits == full:
        return values.copy()
    drop = full - bits
    utype = utypes[values.dtype]
    u = values.view(utype)
    # sign and magnitude: adding to the magnitude bits rounds |x|; a carry moves into the exponent
    lsb = (u >> utype(drop)) & utype(1)
    rounded = ((u + utype((1 << (drop - 1)) - 1) + lsb) >> utype(drop)) << utype(drop)
    return np.where(np.isfinite(values), rounded, u).astype(utype).view(values.dtype)


def to_columns(targets: TeacherTargets, m: Manifest) -> dict[str, np.ndarray]:
    """Validate `targets` against the manifest and return C-contiguous arrays [N, *shape] per column.

    Casts log-probs to manifest.logprob_dtype and rounds them to manifest.logprob_mantissa_bits (and casts
    pooled states to the pooled dtype); raises StorageError
    naming the first field whose shape does not fit the manifest.
    """
    n = len(targets)
    cols = columns(m)
    given: dict[str, np.ndarray | None] = {
        "seq_id": targets.seq_ids,
        "input_ids": targets.input_ids,
        "topk_ids": targets.topk_ids,
        "topk_logprobs": targets.topk_logprobs,
        "sample_ids": targets.sample_ids,
        "sample_counts": targets.sample_counts,
        "entropy": targets.entropy,
        "target_mask": targets.target_mask,
        "observed_logprob": targets.observed_logprob,
        LOSS_MASK_COLUMN: targets.loss_mask,
        BOUNDARY_COLUMN: targets.doc_start,
    }
    if targets.sampled != (m.target_kind == "sampled"):
        raise StorageError(f"{'sampled' if targets.sampled else 'top-k'} targets do not fit a manifest with "
                           f"target_kind={m.target_kind!r}")
    if m.alignment is None and targets.target_mask is not None:
        raise StorageError("targets carry a target_mask but the manifest is not an aligned cache")
    if not m.has_observed_logprob and targets.observed_logprob is not None:
        raise StorageError("targets carry observed_logprob but the manifest has no such column")
    if m.loss_mask is None and targets.loss_mask is not None:
        raise StorageError("targets carry a loss_mask but the manifest names none (not a conversation cache)")
    extra = sorted(set(targets.pooled) - set(m.pooled_layers))
    if extra:
        raise StorageError(f"targets have pooled layer(s) {extra} not in the manifest's pooled_layers "
                           f"{m.pooled_layers}")
    for layer in m.pooled_layers:
        if layer not in targets.pooled:
            raise StorageError(f"targets lack pooled layer {layer} listed in the manifest")
        given[f"pooled_{layer}"] = targets.pooled[layer]
    if m.entropy_kind == "absent" and targets.entropy is not None:
        raise StorageError("targets carry entropy but the manifest says entropy_kind='absent'")
    out: dict[str, np.ndarray] = {}
    for name, col in cols.items():
        arr = given[name]
        if arr is None:
            raise StorageError(f"targets lack {name!r} (manifest entropy_kind={m.entropy_kind!r}, "
                               f"target_kind={m.target_kind!r}, aligned={m.alignment is not None}, "
                               f"observed_logprob={m.has_observed_logprob}, loss_mask={m.loss_mask is not None})")
        arr = np.asarray(arr)
        if arr.shape != (n, *col.shape):
            raise StorageError(f"{name} has shape {tuple(arr.shape)}, expected {(n, *col.shape)} "
                               f"(seq_len={m.seq_len}, top_k={m.top_k})")
        if name in ("seq_id", "input_ids", "topk_ids", "sample_ids", "sample_counts") and not np.issubdtype(arr.dtype, np.integer):
            raise StorageError(f"{name} has dtype {arr.dtype}, expected an integer dtype")
        if not np.issubdtype(arr.dtype, np.number):
            raise StorageError(f"{name} has dtype {arr.dtype}, expected a numeric dtype")
        # always copy: the caller may reuse its buffers while a background thread writes this shard
        if name == "topk_logprobs":
            out[name] = _stored_logprobs(arr, col.dtype, m.logprob_mantissa_bits)
        else:
            out[name] = np.array(arr, dtype=col.dtype, order="C", copy=True)
    return out


def _stored_logprobs(arr: np.ndarray, dtype: np.dtype, bits: int | None) -> np.ndarray:
    """A new C-contiguous array: `arr` cast to `dtype` and rounded to `bits` mantissa bits (None: exact cast)."""
    if bits is None or bits >= np.finfo(dtype).nmant:
        return np.array(arr, dtype=dtype, order="C", copy=True)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > dtype.itemsize:
        # round once, in the given precision (casting first would round twice); the cast below is then exact,
        # except below float16's normal range, where the second rounding puts values on the coarser grid
        arr = round_mantissa(arr, bits)
    return round_mantissa(np.ascontiguousarray(arr, dtype=dtype), bits)


def from_columns(data: dict[str, np.ndarray], m: Manifest) -> TeacherTargets:
    """Build a TeacherTargets from read columns (all columns of the manifest present)."""
    return TeacherTargets(
        seq_ids=data["seq_id"],
        input_ids=data["input_ids"],
        topk_ids=data.get("topk_ids"),
        topk_logprobs=data.get("topk_logprobs"),
        entropy=data.get("entropy"),
        pooled={layer: data[f"pooled_{layer}"] for layer in m.pooled_layers},
        sample_ids=data.get("sample_ids"),
        sample_counts=data.get("sample_counts"),
        target_mask=data.get("target_mask"),
        observed_logprob=data.get("observed_logprob"),
        loss_mask=data.get(LOSS_MASK_COLUMN),
        doc_start=data.get(BOUNDARY_COLUMN),
    )


def check_seq_ids(path: str, seq: np.ndarray, info: ShardInfo) -> None:
    """Raise ShardCorruptError unless a shard's seq_id column is first_seq_id..last_seq_id in order."""
    expected = np.arange(info.first_seq_id, info.last_seq_id + 1, dtype=np.int64)
    if seq.shape != expected.shape or not np.array_equal(seq, expected):
        got = f"{seq[0]}..{seq[-1]}" if seq.size else "none"
        raise ShardCorruptError(f"{path}: holds seq ids {got} ({seq.size} rows), the manifest says "
                                f"{info.first_seq_id}..{info.last_seq_id}")
