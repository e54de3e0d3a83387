"""What `cli.py inspect` shows: a report on a teacher directory or one shard, as a dict and as text."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from storage import fs as sfs
from storage import shards as shard_io
from storage.errors import ShardCorruptError, StorageError
from storage.formats import format_of_file
from storage.manifest import Manifest, ShardInfo
from storage.merge import open_manifest
from storage.reader import TeacherDataset
from storage.schema import columns
from storage.stamps import write_stamp

SHOWN_TOPK = 8
"""Top-k entries printed per decoded row (all of them go into --json)."""


def describe(path: str, *, rows: int = 0, position: int = 0, verify: bool = True) -> dict[str, Any]:
    """Report on `path` (teacher directory or single shard). Raises ShardCorruptError naming every shard
    that is missing or damaged (verify: size and sha256; always: existence)."""
    fs, inner = sfs.resolve(path)
    if _is_shard(fs, inner):
        manifest, root = _single_shard_manifest(fs, inner, path)
        kind = "shard"
    else:
        manifest, root = open_manifest(path), path
        kind = "teacher"
    _, root_inner = sfs.resolve(root)
    statuses = []
    for info in manifest.shards:
        why = shard_io.problem(fs, root_inner, info, check_sha=verify)
        statuses.append(why if why is not None else ("ok" if verify else "size ok"))
    if "standalone" in manifest.notes and statuses == ["ok"]:
        statuses = ["not listed in a manifest (sha256 computed, not checked)"]
    bad = [f"{info.file} ({why})" for info, why in zip(manifest.shards, statuses, strict=True)
           if why not in ("ok", "size ok") and not why.startswith("not listed")]
    if bad:
        raise ShardCorruptError(f"{root}: {len(bad)} of {len(manifest.shards)} shard(s) damaged: " + "; ".join(bad))
    if verify and kind == "teacher":
        write_stamp(fs, root_inner, manifest.shards, by="inspect")

    m = manifest
    report: dict[str, Any] = {
        "path": path, "kind": kind, "format": m.format, "schema_version": m.schema_version,
        "teacher": copy.deepcopy(m.teacher.__dict__), "vocab_size": m.vocab_size, "seq_len": m.seq_len,
        "top_k": m.top_k, "target_kind": m.target_kind, "samples": m.samples, "sample_seed": m.sample_seed,
        "temperature": m.temperature, "logprob_dtype": m.logprob_dtype,
        "logprob_mantissa_bits": m.logprob_mantissa_bits,
        "entropy_kind": m.entropy_kind, "pooled_dims": {str(k): v for k, v in m.pooled_dims.items()},
        "tokenizer_fingerprint": m.tokenizer_fingerprint, "corpus_fingerprint": m.corpus_fingerprint,
        "corpus": m.corpus, "shard_size": m.shard_size, "num_slices": m.notes.get("merged_from_slices", m.num_slices),
        "sequences": m.num_sequences, "tokens": m.num_tokens, "bytes": m.total_bytes,
        "bytes_per_token": (m.total_bytes / m.num_tokens) if m.num_tokens else None,
        "columns": {c.name: {"dtype": str(c.dtype), "row_shape": list(c.shape)} for c in columns(m).values()},
        "shards": [{**s.__dict__, "status": st} for s, st in zip(m.shards, statuses, strict=True)],
        "notes": m.notes, "verified": verify, "rows": [],
        "alignment": copy.deepcopy(m.alignment), "alignment_totals": m.alignment_totals(),
    }
    if m.loss_mask is not None:  # conversations (text reports keep their keys)
        report["loss_mask"] = copy.deepcopy(m.loss_mask)
    if rows > 0 and m.num_sequences:
        report["rows"] = _decode_rows(TeacherDataset(root, m), rows, position)
    return report


def _is_shard(fs, inner: str) -> bool:
    fmt = format_of_file(inner.rstrip("/").rsplit("/", 1)[-1])
    return fmt is not None and fmt.is_shard(fs, inner)


def _single_shard_manifest(fs, inner: str, path: str) -> tuple[Manifest, str]:
    """A one-shard manifest from the header stored inside the shard (and its entry in the directory's
    manifest, when there is one, so its sha256 can be checked)."""
    name = inner.rstrip("/").rsplit("/", 1)[-1]
    parent = inner.rstrip("/").rsplit("/", 1)[0] if "/" in inner.rstrip("/") else "."
    header, index, nrows = format_of_file(name).read_header(fs, inner)
    m = Manifest.from_dict({**header, "shards": []}, source=path)
    listed = None
    try:
        listed = next((s for s in open_manifest(fs.unstrip_protocol(parent)).shards if s.file == name), None)
    except StorageError:
        listed = None  # a shard on its own: nothing to compare against
    if listed is not None:
        info = listed
    else:
        info = ShardInfo(index=index, file=name, rows=nrows, first_seq_id=index * m.shard_size,
                         last_seq_id=index * m.shard_size + nrows - 1, bytes=sfs.size_of(fs, inner),
                         sha256=sfs.sha256_of(fs, inner))
        m.notes = {"standalone": "no manifest in the parent directory lists this shard; sha256 is computed, "
                   "not checked"}
    m.shards = [info]
    m.validate(path)
    return m, fs.unstrip_protocol(parent)


def _decode_rows(ds: TeacherDataset, rows: int, position: int) -> list[dict[str, Any]]:
    m = ds.manifest
    if not 0 <= position < m.seq_len:
        raise StorageError(f"--position {position} is outside 0..{m.seq_len - 1}")
    cols = ds.read_columns(np.arange(min(rows, len(ds))))
    out = []
    for i in range(cols["seq_id"].shape[0]):
        if m.target_kind == "sampled":
            counts = cols["sample_counts"][i, position].astype(np.int64)
            keep = counts > 0
            out.append({
                "seq_id": int(cols["seq_id"][i]), "position": position,
                "input_id": int(cols["input_ids"][i, position]),
                "next_input_id": int(cols["input_ids"][i, position + 1]) if position + 1 < m.seq_len else None,
                "sample_ids": cols["sample_ids"][i, position][keep].tolist(), "sample_counts": counts[keep].tolist(),
                "entropy": float(cols["entropy"][i, position]) if "entropy" in cols else None,
            })
            continue
        lp = cols["topk_logprobs"][i, position].astype(np.float64)
        row = {
            "seq_id": int(cols["seq_id"][i]), "position": position,
            "input_id": int(cols["input_ids"][i, position]),
            "next_input_id": int(cols["input_ids"][i, position + 1]) if position + 1 < m.seq_len else None,
            "topk_ids": cols["topk_ids"][i, position].tolist(), "topk_logprobs": [round(float(x), 4) for x in lp],
            "topk_mass": float(np.exp(lp).sum()),
            "entropy": float(cols["entropy"][i, position]) if "entropy" in cols else None,
        }
        if "target_mask" in cols:
            row["has_target"] = bool(cols["target_mask"][i, position])
            obs = float(cols["observed_logprob"][i, position])
            row["observed_logprob"] = None if np.isnan(obs) else obs
        out.append(row)
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _targets_text(r: dict[str, Any]) -> str:
    """The kind of targets: `kind=topk top_k=64 log-probs=float16 (...)` or `kind=sampled samples=16 ...`."""
    if r.get("target_kind", "topk") == "sampled":
        return f"kind=sampled  samples={r['samples']} (distinct ids + uint16 counts, target = count / N)"
    return (f"kind=topk  top_k={r['top_k']}  log-probs={r['logprob_dtype']}"
            + (f" ({r['logprob_mantissa_bits']} mantissa bits)" if r.get("logprob_mantissa_bits") else ""))


def _conversations_text(lm: dict[str, Any], packing: dict[str, Any]) -> str:
    """The `conversations` line of a chat cache: template, mask method and what packing kept or refused."""
    counts = ", ".join(f"{packing[k]} {label}" for k, label in (
        ("conversations_packed", "packed"), ("too_long", "refused (longer than seq_len)"),
        ("truncated_conversations", "truncated"), ("masked_positions", "masked positions"),
        ("padding_tokens", "padding tokens")) if k in packing)
    return (f"conversations column {lm['column']} marks {lm['marks']} replies (template sha256 "
            f"{lm['chat_template_sha256'][:16]}, mask from {lm['method']})" + (f"; {counts}" if counts else ""))


def format_report(r: dict[str, Any]) -> str:
    """Human-readable text of a describe() report."""
    t = r["teacher"]
    pooled = ", ".join(f"{k} (d={v})" for k, v in r["pooled_dims"].items()) or "none"
    bpt = f"{r['bytes_per_token']:.1f}" if r["bytes_per_token"] is not None else "-"
    lines = [
        f"path         {r['path']}  ({'teacher directory' if r['kind'] == 'teacher' else 'single shard'})",
        f"teacher      {t['name']}  path={t['path']}  backend={t['backend']}  dtype={t['dtype']}"
        + (f"  gguf={t['gguf_file']}" if t.get("gguf_file") else "")
        + (f"  revision={t['revision']}" if t.get("revision") else ""),
        f"format       {r['format']} (schema v{r['schema_version']}), {len(r['shards'])} shard(s) of "
        f"{r['shard_size']} sequences, {r['num_slices']} slice(s)",
        f"size         {r['sequences']} sequences, {r['tokens']} tokens, {_size(r['bytes'])}, {bpt} bytes/token",
        f"targets      seq_len={r['seq_len']}  " + _targets_text(r) + f"  vocab={r['vocab_size']}  "
        f"temperature={r['temperature']}  entropy={r['entropy_kind']}",
        f"pooled       {pooled}",
        f"fingerprints tokenizer={r['tokenizer_fingerprint'][:16]}  corpus={r['corpus_fingerprint'][:16]}",
    ]
    a, tot = r.get("alignment"), r.get("alignment_totals")
    if a is not None:
        vm = a["vocab_map"]
        lines += [
            f"aligned      to tokenizer {a['tokenizer']} (fingerprint above); teacher tokenizer "
            f"{a['teacher_tokenizer']} fingerprint={a['teacher_tokenizer_fingerprint'][:16]} "
            f"vocab={a['teacher_vocab_size']}",
            f"  coverage   {tot['coverage']:.1%} of {int(tot['positions'])} positions have a target; exact "
            f"observed-token log-prob at {tot['observed_fraction']:.1%}",
            f"  mass       {tot['mass_whole_fraction']:.1%} on whole S tokens, {tot['mass_partial_fraction']:.1%} "
            f"on first sub-tokens/bytes, {tot['mass_unmapped_fraction']:.2%} unmappable (dropped, renormalised)",
            "  vocab map  " + ", ".join(f"{k} {v}" for k, v in vm.items()),
        ]
    if r.get("loss_mask") is not None:
        lines.append(_conversations_text(r["loss_mask"], r["notes"].get("packing", {})))
    lines.append("columns")
    for name, c in r["columns"].items():
        shape = "x".join(str(s) for s in c["row_shape"]) or "scalar"
        lines.append(f"  {name:<16} {c['dtype']:<8} per sequence: {shape}")
    lines.append("shards" + ("" if r["verified"] else "  (sha256 not checked: --no-verify)"))
    lines.append(f"  {'index':>6}  {'file':<22} {'rows':>6}  {'seq ids':<17} {'bytes':>10}  sha256        status")
    for s in r["shards"]:
        ids = f"{s['first_seq_id']}..{s['last_seq_id']}"
        lines.append(f"  {s['index']:>6}  {s['file']:<22} {s['rows']:>6}  {ids:<17} {_size(s['bytes']):>10}  "
                     f"{s['sha256'][:12]}  {s['status']}")
    if r["target_kind"] == "sampled":
        lines.append(f"seed rule    {r['sample_seed']}")
    for row in r["rows"]:
        entropy = f"{row['entropy']:.4f}" if row["entropy"] is not None else "absent"
        if "sample_ids" in row:
            n = sum(row["sample_counts"])
            shown = ", ".join(f"{i}:{c}" for i, c in zip(row["sample_ids"][:SHOWN_TOPK],
                                                         row["sample_counts"][:SHOWN_TOPK], strict=True))
            more = " ..." if len(row["sample_ids"]) > SHOWN_TOPK else ""
            lines.append(f"seq {row['seq_id']} position {row['position']}: input {row['input_id']} -> next "
                         f"{row['next_input_id']}; {len(row['sample_ids'])} distinct of {n} draws; entropy "
                         f"{entropy} nats")
            lines.append(f"  sampled id:count  {shown}{more}")
            continue
        shown = ", ".join(f"{i}:{lp:.3f}" for i, lp in zip(row["topk_ids"][:SHOWN_TOPK],
                                                          row["topk_logprobs"][:SHOWN_TOPK], strict=True))
        more = " ..." if len(row["topk_ids"]) > SHOWN_TOPK else ""
        aligned = ""
        if "has_target" in row:
            obs = row["observed_logprob"]
            aligned = (f"; target {'yes' if row['has_target'] else 'none (masked)'}; observed log-prob "
                       + ("unavailable" if obs is None else f"{obs:.4f}"))
        lines.append(f"seq {row['seq_id']} position {row['position']}: input {row['input_id']} -> next "
                     f"{row['next_input_id']}; top-k mass {row['topk_mass']:.4f}; entropy {entropy} nats{aligned}")
        lines.append(f"  top-k id:log-prob  {shown}{more}")
    return "\n".join(lines)
