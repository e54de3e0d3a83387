"""Which manifest fields must agree, and the comparisons that name the first that does not: between the
parts of one cache (slices, a resumed run and its earlier part, the slices a merge joins) and between the
teachers a student is trained from."""

from __future__ import annotations

from typing import Any

from storage.errors import MismatchError
from storage.manifest import Manifest

# Fields that must agree between slices of one run (and between a resumed run and its earlier part).
RUN_FIELDS: tuple[str, ...] = (
    "schema_version", "format", "teacher.name", "teacher.path", "teacher.revision", "teacher.gguf_file",
    "teacher.dtype", "teacher.backend", "tokenizer_fingerprint", "vocab_size", "seq_len", "top_k",
    "target_kind", "samples", "sample_seed", "temperature", "logprob_dtype", "logprob_mantissa_bits",
    "entropy_kind", "pooled_layers", "corpus_fingerprint", "shard_size", "num_partitions",
    "alignment", "observed_logprob", "loss_mask",
)

# Settings kept in `notes` (dotted paths below `notes`) that change shard bytes without being a manifest
# field: the head's chunking and its compiled-or-eager kernels change entropy and log-probs in the last
# float32 bits (`head_lse_entropy` names the path: eager, torch.compile or the fused kernel of --head-kernel),
# and so does the device type (cpu / cuda), derived from `notes.backend.device`.
SETTING_NOTES: tuple[str, ...] = (
    "backend.head_chunk_size", "backend.head_lse_entropy", "backend.vllm_tensor_parallel_size",
)

# Everything that must agree between two parts of one cache (slices, a resumed run and its earlier part):
# the run fields, the pooled widths and the teacher's shape (the same path may hold other weights).
CACHE_FIELDS: tuple[str, ...] = RUN_FIELDS + (
    "pooled_dims", "teacher.num_params", "teacher.num_layers", "teacher.hidden_size",
)


def run_settings(m: Manifest) -> dict[str, Any]:
    """The byte-changing settings recorded in `notes` ({"notes.<path>": value}; None when not recorded)."""
    out: dict[str, Any] = {}
    for dotted in SETTING_NOTES:
        value: Any = m.notes
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[f"notes.{dotted}"] = value
    backend = m.notes.get("backend")
    device = backend.get("device") if isinstance(backend, dict) else None
    out["device type"] = device.split(":", 1)[0] if isinstance(device, str) else None
    return out


def run_slices(m: Manifest) -> int:
    """How many slices the run that wrote `m` had (a merged manifest says 1 and records the original count)."""
    merged = m.notes.get("merged_from_slices")
    return merged if isinstance(merged, int) and m.num_slices == 1 else m.num_slices


def compare_parts(a: Manifest, b: Manifest, what: str, *, slicing: bool = False) -> None:
    """Raise MismatchError naming the first field, byte-changing setting or (with `slicing`) slice count
    where `a` and `b`, two parts of one cache, differ; `what` names the two ("this run and x.json")."""
    a.compare(b, CACHE_FIELDS, what)
    sa, sb = run_settings(a), run_settings(b)
    for key in sa:
        if sa[key] != sb[key]:
            raise MismatchError(f"{what} differ in {key!r}: {sa[key]!r} vs {sb[key]!r}", key, (sa[key], sb[key]))
    if slicing and run_slices(a) != run_slices(b):
        na, nb = run_slices(a), run_slices(b)
        raise MismatchError(f"{what} differ in 'num_slices': {na} vs {nb} (a cache is written with one slice "
                            "count; use the earlier one)", "num_slices", (na, nb))


# Fields that must agree between teachers that are trained from together.
JOIN_FIELDS: tuple[str, ...] = ("tokenizer_fingerprint", "seq_len", "corpus_fingerprint", "num_partitions",
                                 "vocab_size", "loss_mask")
