"""The manifest: one JSON file describing a teacher's cached targets and every shard in it.

The cache's file names and how sequence ids map to shards and corpus partitions: storage/layout.py. Which
fields must agree between the parts of a cache and between teachers: storage/consistency.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from common.sidefile import parse_json
from storage.errors import ManifestError, MismatchError
from storage.formats import FORMATS
from storage.layout import is_plain_name, partition_of, shard_file_name

SCHEMA_VERSION = 2
ALIGNED_SCHEMA_VERSION = 2
"""Aligned caches (`Manifest.alignment`, extra columns `target_mask` and `observed_logprob`, per-shard
`stats`) need schema 2 or newer; see docs/architecture.md."""
ALIGNMENT_STATS = ("positions", "aligned", "observed", "mass_whole", "mass_partial", "mass_unmapped")
"""Per-shard sums an aligned cache records: positions, positions with a target, positions with the exact
observed-token log-prob, and the teacher probability mass (summed over aligned positions) that mapped onto
a whole S token, onto a first sub-token (or a byte / special token), or nowhere."""
LOGPROB_DTYPES = ("float16", "float32")
MANTISSA_BITS = {"float16": 10, "float32": 23}
"""Explicit mantissa bits of each log-prob storage dtype (the most `logprob_mantissa_bits` can keep)."""
ENTROPY_KINDS = ("exact", "estimate", "absent")
TARGET_KINDS = ("topk", "sampled")
"""`topk`: the k largest log-probs per position; `sampled`: N draws from the teacher's softmax, stored as
distinct ids with their counts (the target is count / N)."""
MAX_SAMPLES = 65535
"""Most draws per position a sampled cache can hold (counts are uint16)."""
SAMPLE_SEED_RULE = ("splitmix64-v1: key = first 8 bytes (little-endian) of sha256(corpus_fingerprint NUL "
                    "teacher.name NUL teacher.path); r = sm(sm(sm(key) ^ seq_id) ^ position); draw j uses "
                    "u = (sm(r + (j + 1) * 0x9E3779B97F4A7C15) >> 11) * 2**-53 (sm: the SplitMix64 finaliser)")
"""The seed rule recorded in a sampled cache's manifest (teachers/sampling.py implements it)."""
LOSS_MASK_COLUMN = "loss_mask"
"""Per-position uint8 column of a conversation cache: 1 where the next token belongs to an assistant reply."""
BOUNDARY_COLUMN = "doc_start"
"""Per-position uint8 column of a conversation cache: 1 where a conversation begins."""


def check_shard_file(info: ShardInfo, fmt: str, source: str = "<manifest>") -> None:
    """Raise ManifestError unless `info.file` is the plain name `shard-GGGGGG.<fmt>` of its index.

    A manifest may only point inside its own directory: `../x`, `/etc/passwd`, `a/b`, `C:\\x`, `s3://...`
    or any other name are refused, so no reader ever opens (or reports on) a file outside the cache."""
    expected = shard_file_name(info.index, fmt) if isinstance(info.index, int) else None
    if info.file == expected:
        return
    why = "is not a plain file name inside the cache" if not is_plain_name(info.file) else f"should be {expected!r}"
    raise ManifestError(f"{source}: shards[{info.index}] file {info.file!r} {why}; refusing to read it")


@dataclass(kw_only=True)
class TeacherInfo:
    """Which teacher produced the targets."""

    name: str
    """Label chosen by the user (`--teacher-name`), used in logs and metrics."""
    path: str
    """Local directory or hub id the weights came from."""
    revision: str | None = None
    """Hub revision, if any."""
    gguf_file: str | None = None
    """GGUF file name inside `path`, if the weights are GGUF."""
    dtype: str = "float32"
    """Compute dtype of the teacher forward."""
    backend: str = "hf"
    """`hf` or `vllm`."""
    num_params: int | None = None
    """Parameter count, for MFU figures."""
    num_layers: int | None = None
    """Transformer blocks in the teacher."""
    hidden_size: int | None = None
    """Hidden size of the teacher."""


@dataclass(kw_only=True)
class ShardInfo:
    """One complete shard, as recorded after it was renamed into place."""

    index: int
    """Global shard index."""
    file: str
    """Name relative to the teacher directory."""
    rows: int
    """Sequences in the shard."""
    first_seq_id: int
    """Smallest seq id (inclusive)."""
    last_seq_id: int
    """Largest seq id (inclusive); ids inside a shard are contiguous."""
    bytes: int
    """Size on disk (sum of files for Zarr)."""
    sha256: str
    """sha256 of the Parquet file; for Zarr, of the sorted (relative path, file sha256) list."""
    stats: dict[str, float] | None = None
    """Aligned caches only: sums over the shard's positions (ALIGNMENT_STATS); absent otherwise."""


@dataclass(kw_only=True)
class Manifest:
    """Everything needed to read, validate and join a teacher's cached targets."""

    schema_version: int = SCHEMA_VERSION
    """Shard schema version; readers refuse newer versions (1: slice-owned sequence ids; 2: partitioned
    sequence ids, and the only version for aligned or sampled caches)."""
    format: str = "parquet"
    """A name in `storage.formats.FORMATS`."""
    teacher: TeacherInfo
    """Where the targets came from."""
    tokenizer_fingerprint: str
    """sha256 of the tokenizer's vocab and special tokens."""
    vocab_size: int
    """Size of the output distribution (the model's logits width)."""
    seq_len: int
    """Tokens per packed sequence (L)."""
    top_k: int
    """Slots per position: k of a top-k cache; N (= `samples`) of a sampled cache."""
    temperature: float = 1.0
    """Temperature tau the log-probs were normalised at."""
    logprob_dtype: str = "float16"
    """Storage dtype of `topk_logprobs`."""
    logprob_mantissa_bits: int | None = None
    """Mantissa bits kept in each stored log-prob (rounded to nearest, ties to even; the dropped low bits are
    zero, so the column compresses better). None: the dtype's full precision (float16 10, float32 23)."""
    target_kind: str = "topk"
    """`topk` (columns topk_ids, topk_logprobs) or `sampled` (columns sample_ids, sample_counts). A manifest
    without the field is a top-k cache; a top-k manifest does not write the field, so its JSON and its shards'
    headers are what they were before sampled caches existed."""
    samples: int | None = None
    """Draws per position of a sampled cache (N); None for top-k."""
    sample_seed: str | None = None
    """How the draws are seeded (SAMPLE_SEED_RULE), so they can be reproduced; None for top-k."""
    entropy_kind: str = "exact"
    """`exact` (full-vocab entropy), `estimate` (from top-k plus tail; see notes) or `absent`."""
    pooled_layers: list[int] = field(default_factory=list)
    """Layers whose mean-pooled hidden states are stored as `pooled_<layer>` (empty: none)."""
    pooled_dims: dict[int, int] = field(default_factory=dict)
    """layer -> hidden size d of its pooled column."""
    corpus_fingerprint: str
    """sha256 over the corpus description and the packed token stream's identity."""
    corpus: dict[str, Any] = field(default_factory=dict)
    """Human-readable corpus description (source, text field, limits)."""
    shard_size: int
    """Sequences per shard (the last shard of each partition may hold fewer)."""
    num_partitions: int = 1
    """Corpus partitions the sequence ids were derived from (fixed by the corpus, not by the slicing)."""
    slice_index: int = 0
    """Which slice of the run this manifest covers (0 for a merged manifest)."""
    num_slices: int = 1
    """How many slices the run was split into (1 for a merged manifest)."""
    shards: list[ShardInfo] = field(default_factory=list)
    """Complete shards, sorted by index."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Free-form facts worth keeping (backend caveats, versions, token counts)."""
    alignment: dict[str, Any] | None = None
    """Set when the teacher has another tokenizer and its targets were aligned to the student's tokenizer S
    (`precompute --align-tokenizer`): `tokenizer` (S's path), `teacher_tokenizer`, `teacher_tokenizer_fingerprint`,
    `teacher_vocab_size`, `vocab_map` (counts per kind), `vocab_map_sha256`, `teacher_prefix`. The top-level
    `tokenizer_fingerprint` and `vocab_size` are then S's (the token space of the stored ids). None: a plain
    cache in the teacher's own token space."""
    observed_logprob: bool = False
    """A plain (not aligned) cache that stores the column `observed_logprob` [L] float32: the teacher's exact
    log-prob of the observed next token input_ids[t + 1] at temperature tau (NaN at t = L - 1). False (and the
    meaning of a manifest without the field, written before top-k and sampled caches stored it) for caches
    without it; an aligned cache always has the column (`has_observed_logprob`) and leaves this False. Not
    written when False, so older manifests and shard headers read as before."""
    loss_mask: dict[str, Any] | None = None
    """Set for a cache of conversations (`precompute --corpus-format chat`, common/chat.py): the per-position
    columns `column` (`loss_mask`, 1 where the next token belongs to an assistant reply) and `boundaries`
    (`doc_start`, 1 where a conversation begins), and how the mask was made: `marks` (`assistant`),
    `chat_template_sha256`, `method` (`generation` or `offsets`), `truncate_conversations`. None (and absent
    from the JSON): a text cache, every position counts."""

    # ---- derived -------------------------------------------------------------------------------
    def slice_of(self, shard: int) -> int:
        """Which slice of `num_slices` computes global shard `shard` (its partition's owner)."""
        owner = shard if self.schema_version < 2 else partition_of(shard)
        return owner % self.num_slices

    @property
    def num_sequences(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def column_names(self) -> list[str]:
        """Columns present in this teacher's shards."""
        cols = ["seq_id", "input_ids"]
        cols += ["sample_ids", "sample_counts"] if self.target_kind == "sampled" else ["topk_ids", "topk_logprobs"]
        if self.entropy_kind != "absent":
            cols.append("entropy")
        cols += [f"pooled_{layer}" for layer in self.pooled_layers]
        if self.alignment is not None:
            cols += ["target_mask", "observed_logprob"]
        elif self.observed_logprob:
            cols.append("observed_logprob")
        if self.loss_mask is not None:
            cols += [LOSS_MASK_COLUMN, BOUNDARY_COLUMN]
        return cols

    @property
    def has_observed_logprob(self) -> bool:
        """The shards hold `observed_logprob` (every aligned cache; plain caches written since it was stored)."""
        return self.alignment is not None or self.observed_logprob

    @property
    def aligned(self) -> bool:
        """True for a cache aligned to another tokenizer (it has per-position validity masks)."""
        return self.alignment is not None

    def alignment_totals(self) -> dict[str, float] | None:
        """Sums of the shards' alignment stats, plus `coverage` (aligned / positions), `observed_fraction`
        and the mean mass fractions over aligned positions; None for a plain cache."""
        if self.alignment is None:
            return None
        tot = {key: 0.0 for key in ALIGNMENT_STATS}
        for s in self.shards:
            for key in ALIGNMENT_STATS:
                tot[key] += float((s.stats or {}).get(key, 0.0))
        pos, al = tot["positions"], tot["aligned"]
        tot["coverage"] = al / pos if pos else 0.0
        tot["observed_fraction"] = tot["observed"] / pos if pos else 0.0
        for key in ("mass_whole", "mass_partial", "mass_unmapped"):
            tot[key + "_fraction"] = tot[key] / al if al else 0.0
        return tot

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pooled_dims"] = {str(k): v for k, v in self.pooled_dims.items()}
        if self.target_kind == "topk":
            for name in ("target_kind", "samples", "sample_seed"):
                del d[name]
        if d["alignment"] is None:  # plain caches carry no alignment entry
            del d["alignment"]
        if not d["observed_logprob"]:  # nor caches without the column this flag
            del d["observed_logprob"]
        if d["loss_mask"] is None:  # text caches carry no loss_mask entry
            del d["loss_mask"]
        for shard in d["shards"]:
            if shard["stats"] is None:
                del shard["stats"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<manifest>") -> Manifest:
        """Build and validate; raises ManifestError naming `source` and the first bad field."""
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: not a JSON object")
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise ManifestError(f"{source}: field 'schema_version' is missing or not an integer")
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: schema_version {version} is newer than this reader supports ({SCHEMA_VERSION}); "
                "upgrade the package"
            )
        if version < 1:
            raise ManifestError(f"{source}: schema_version {version} is invalid")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ManifestError(f"{source}: unknown field {unknown[0]!r}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        absent = [name for name in required if name not in d]
        if absent:
            raise ManifestError(f"{source}: field {absent[0]!r} is missing")
        try:
            kwargs = dict(d)
            kwargs["teacher"] = TeacherInfo(**d["teacher"])
            kwargs["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            kwargs["pooled_dims"] = {int(k): int(v) for k, v in d.get("pooled_dims", {}).items()}
            kwargs["pooled_layers"] = [int(x) for x in d.get("pooled_layers", [])]
            m = cls(**kwargs)
        except KeyError as e:
            raise ManifestError(f"{source}: field {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{source}: malformed field: {e}") from None
        m.validate(source)
        return m

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        return cls.from_dict(parse_json(text, label=source, error=ManifestError), source)

    def validate(self, source: str = "<manifest>") -> None:
        """Raise ManifestError naming the first bad field."""

        def bad(name: str, why: str) -> ManifestError:
            return ManifestError(f"{source}: field {name!r} {why}")

        if self.format not in FORMATS:
            raise bad("format", f"is {self.format!r}, expected one of {FORMATS}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise bad("logprob_dtype", f"is {self.logprob_dtype!r}, expected one of {LOGPROB_DTYPES}")
        bits = self.logprob_mantissa_bits
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                                 or not 1 <= bits <= MANTISSA_BITS[self.logprob_dtype]):
            raise bad("logprob_mantissa_bits", f"is {bits!r}, expected null or an integer in "
                      f"1..{MANTISSA_BITS[self.logprob_dtype]} for {self.logprob_dtype}")
        if self.target_kind not in TARGET_KINDS:
            raise bad("target_kind", f"is {self.target_kind!r}, expected one of {TARGET_KINDS}")
        if self.target_kind == "sampled":
            n = self.samples
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
                raise bad("samples", f"is {n!r}, expected an integer in 1..{MAX_SAMPLES} for a sampled cache")
            if self.top_k != n:
                raise bad("top_k", f"({self.top_k}) must equal samples ({n}) in a sampled cache")
            if not self.sample_seed:
                raise bad("sample_seed", "is missing (a sampled cache records its seed rule)")
        elif self.samples is not None or self.sample_seed is not None:
            raise bad("samples", "is set but target_kind is 'topk'")
        if self.entropy_kind not in ENTROPY_KINDS:
            raise bad("entropy_kind", f"is {self.entropy_kind!r}, expected one of {ENTROPY_KINDS}")
        for name in ("vocab_size", "seq_len", "top_k", "shard_size", "num_slices", "num_partitions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(name, f"must be a positive integer, got {value!r}")
        if self.top_k > self.vocab_size and self.target_kind == "topk":
            raise bad("top_k", f"({self.top_k}) exceeds vocab_size ({self.vocab_size})")
        if not (0 <= self.slice_index < self.num_slices):
            raise bad("slice_index", f"({self.slice_index}) is outside 0..{self.num_slices - 1}")
        if not (self.temperature > 0):
            raise bad("temperature", f"must be > 0, got {self.temperature!r}")
        if set(self.pooled_layers) != set(self.pooled_dims):
            raise bad("pooled_dims", f"must have one entry per pooled layer {self.pooled_layers}")
        if self.alignment is not None:
            if self.schema_version < ALIGNED_SCHEMA_VERSION:
                raise bad("schema_version", f"is {self.schema_version}; an aligned cache is schema "
                          f"{ALIGNED_SCHEMA_VERSION}")
            if not isinstance(self.alignment, dict) or "teacher_tokenizer_fingerprint" not in self.alignment:
                raise bad("alignment", "must be an object with 'teacher_tokenizer_fingerprint'")
            if self.observed_logprob:
                raise bad("observed_logprob", "is set in an aligned cache (its column comes with the alignment)")
        if not isinstance(self.observed_logprob, bool):
            raise bad("observed_logprob", f"must be true or false, got {self.observed_logprob!r}")
        if self.loss_mask is not None and (not isinstance(self.loss_mask, dict)
                                           or self.loss_mask.get("column") != LOSS_MASK_COLUMN):
            raise bad("loss_mask", f"must be an object with 'column': {LOSS_MASK_COLUMN!r}")
        previous = -1
        for s in self.shards:
            check_shard_file(s, self.format, source)
            where = f"shards[{s.index}] ({s.file})"
            if s.index <= previous:
                raise bad("shards", f"are not sorted by index at {where}")
            previous = s.index
            if self.schema_version >= 2 and partition_of(s.index) >= self.num_partitions:
                raise bad("shards", f"{where} lies in partition {partition_of(s.index)}, beyond num_partitions "
                          f"{self.num_partitions}")
            if self.slice_of(s.index) != self.slice_index:
                raise bad("shards", f"{where} does not belong to slice {self.slice_index} of {self.num_slices}")
            if s.rows < 1 or s.rows > self.shard_size:
                raise bad("shards", f"{where} has {s.rows} rows, expected 1..{self.shard_size}")
            if s.first_seq_id != s.index * self.shard_size or s.last_seq_id != s.first_seq_id + s.rows - 1:
                raise bad("shards", f"{where} covers seq ids {s.first_seq_id}..{s.last_seq_id}, "
                          f"expected {s.index * self.shard_size}..{s.index * self.shard_size + s.rows - 1}")

    # ---- comparison ----------------------------------------------------------------------------
    def compare(self, other: Manifest, fields: tuple[str, ...], what: str = "manifests") -> None:
        """Raise MismatchError naming the first of `fields` (dotted for teacher.*) that differs."""
        for name in fields:
            a, b = _get(self, name), _get(other, name)
            if a != b:
                raise MismatchError(f"{what} differ in {name!r}: {a!r} vs {b!r}", name, (a, b))


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
