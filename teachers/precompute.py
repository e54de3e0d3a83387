"""Stage one: corpus -> packed windows -> teacher -> targets head -> shards -> manifest.

    manifest = run_precompute(cfg)

Packing runs in a background thread (the Rust tokenizer releases the GIL) and the TargetsWriter compresses
and writes in another, so the teacher forward is the only thing on the critical path. Every slice packs the
whole stream (cheap) but runs the teacher only on the global shards it owns and has not completed; a
re-run of the same command therefore resumes where it stopped and yields identical shards. Batches never
cross a shard boundary, so a shard's bytes do not depend on how the run was sliced or resumed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.errors import ConfigError
from storage.manifest import Manifest
from storage.records import TeacherTargets
from teachers.config import PrecomputeConfig
from teachers.packing import PackedBatch, PackStats

if TYPE_CHECKING:
    from storage.lock import CacheLock
    from teachers.backends import TeacherBackend

_DONE = object()
log = logging.getLogger(__name__)


def group_by_shard(batches: Iterator[PackedBatch], shard_size: int,
                   wanted: Callable[[int], bool]) -> Iterator[tuple[int, PackedBatch]]:
    """Regroup consecutive windows into whole global shards; yields (shard index, its windows) for the
    shards `wanted(index)` accepts, in order. The last shard may be partial."""
    current, pieces = -1, []
    for batch in batches:
        start = 0
        while start < len(batch):
            g = int(batch.seq_ids[start]) // shard_size
            stop = min(len(batch), start + (g + 1) * shard_size - int(batch.seq_ids[start]))
            if g != current:
                if pieces:
                    yield current, _concat(pieces)
                current, pieces = g, []
            if wanted(g):
                pieces.append(batch.slice(start, stop))
            start = stop
    if pieces:
        yield current, _concat(pieces)


def _concat(pieces: list[PackedBatch]) -> PackedBatch:
    if len(pieces) == 1:
        return pieces[0]
    return PackedBatch(seq_ids=np.concatenate([p.seq_ids for p in pieces]),
                       input_ids=np.concatenate([p.input_ids for p in pieces]))


def prefetch(it: Iterator[Any], depth: int = 8) -> Iterator[Any]:
    """Run `it` in a daemon thread, `depth` items ahead; its exceptions are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, _DONE))
        except BaseException as e:  # handed to the consumer
            q.put((False, e))

    thread = threading.Thread(target=produce, name="packing", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()


def compute_shard(backend: Any, windows: PackedBatch, batch_size: int) -> TeacherTargets:
    """Targets of one shard's windows, `batch_size` sequences per forward (batches start at the shard's
    first window, so the result does not depend on slicing)."""
    parts = [backend.compute(windows.slice(s, s + batch_size)) for s in range(0, len(windows), batch_size)]
    return parts[0] if len(parts) == 1 else TeacherTargets.concat(parts)


def run_precompute(cfg: PrecomputeConfig, *, backend: TeacherBackend | None = None) -> Manifest:
    """Run one slice of stage one and return the manifest it wrote (see the module docstring).

    `backend`: an already loaded backend built from `cfg.teacher` (benchmarks and tests reuse one model
    across runs); by default it is created from `cfg.teacher`. The slice's lock is taken first, before the
    teacher loads, so a second process on the same slice is refused in seconds (storage/lock.py).
    """
    from storage import fs as sfs
    from storage.lock import CacheLock, lock_name
    from storage.writer import prepare_output
    from teachers.slicing import resolve_slice

    slice_index, num_slices = resolve_slice(cfg.num_shards, cfg.shard_index)
    output = cfg.storage.output
    fs, root = sfs.resolve(output)
    prepare_output(fs, root, output)  # a file or an unwritable --output fails here, before anything loads
    lock = CacheLock(fs, root, lock_name(slice_index, num_slices), what=f"slice {slice_index} of {num_slices} of "
                     f"{output}", slice_index=slice_index, num_slices=num_slices)
    with lock:
        return _run_slice(cfg, backend, slice_index, num_slices, lock)


def _run_slice(cfg: PrecomputeConfig, backend: TeacherBackend | None, slice_index: int, num_slices: int,
               lock: CacheLock) -> Manifest:
    from tqdm.auto import tqdm

    from storage.writer import TargetsWriter
    from teachers.backends import create_backend
    from teachers.corpus import corpus_fingerprint, iter_documents
    from teachers.packing import load_tokenizer, pack_documents, tokenizer_fingerprint
    from teachers.slicing import owns_shard

    t_cfg, s_cfg = cfg.teacher, cfg.storage
    corpus_fp, corpus_desc = corpus_fingerprint(cfg.corpus)
    tok_path = t_cfg.tokenizer or t_cfg.path
    tokenizer = load_tokenizer(tok_path, gguf_file=None if t_cfg.tokenizer else t_cfg.gguf_file,
                               revision=None if t_cfg.tokenizer else t_cfg.revision,
                               trust_remote_code=t_cfg.trust_remote_code)
    if backend is None:
        backend = create_backend(t_cfg, seq_len=cfg.seq_len)
    if t_cfg.top_k > backend.vocab_size:
        raise ConfigError(f"top_k {t_cfg.top_k} exceeds the teacher's vocab size {backend.vocab_size}")
    header = Manifest(
        format=s_cfg.format, teacher=backend.info(), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=backend.vocab_size, seq_len=cfg.seq_len, top_k=t_cfg.top_k, temperature=t_cfg.temperature,
        logprob_dtype=s_cfg.logprob_dtype, logprob_mantissa_bits=s_cfg.manifest_mantissa_bits,
        entropy_kind=backend.entropy_kind,
        pooled_layers=sorted(backend.pooled_dims), pooled_dims=dict(backend.pooled_dims),
        corpus_fingerprint=corpus_fp, corpus=corpus_desc, shard_size=s_cfg.shard_size,
        slice_index=slice_index, num_slices=num_slices,
        notes={"backend": dict(backend.notes), "tokenizer": tok_path, "batch_size": cfg.batch_size},
    )
    stats = PackStats()
    with TargetsWriter(s_cfg.output, header, lock=lock) as writer:
        done_before = set(writer.completed)

        def wanted(g: int) -> bool:
            return owns_shard(g, slice_index, num_slices) and g not in done_before

        total = _expected_sequences(cfg, wanted)
        bar = tqdm(total=None if total is None else total * cfg.seq_len, unit="tok", unit_scale=True,
                   disable=not cfg.progress, desc=f"precompute {t_cfg.name} slice {slice_index}/{num_slices}",
                   dynamic_ncols=True)
        windows = prefetch(pack_documents(iter_documents(cfg.corpus), tokenizer, seq_len=cfg.seq_len,
                                          max_tokens=cfg.corpus.max_tokens, stats=stats))
        seqs, shards, teacher_s, writer_wait_s = 0, 0, 0.0, 0.0
        run_t0 = time.perf_counter()
        for g, shard_windows in group_by_shard(windows, s_cfg.shard_size, wanted):
            t0 = time.perf_counter()
            targets = compute_shard(backend, shard_windows, cfg.batch_size)
            t1 = time.perf_counter()
            teacher_s += t1 - t0
            writer.write_shard(g, targets)  # validates, copies and queues; blocks only while the queue is full
            writer_wait_s += time.perf_counter() - t1
            seqs, shards = seqs + len(shard_windows), shards + 1
            bar.update(len(shard_windows) * cfg.seq_len)
            bar.set_postfix(seqs=seqs, shards=shards, refresh=False)
        bar.close()
        if stats.windows == 0:
            raise ConfigError(f"the corpus has {stats.tokens} tokens, fewer than one window of seq_len "
                              f"{cfg.seq_len}")
        writer.header.notes.update(
            packing=stats.to_dict(),
            num_shards_total=-(-stats.windows // s_cfg.shard_size),
            this_run={"sequences": seqs, "shards": shards, "skipped_completed": len(done_before),
                      "teacher_seconds": round(teacher_s, 3), "writer_wait_s": round(writer_wait_s, 3),
                      "loop_seconds": round(time.perf_counter() - run_t0, 3)},
        )
    manifest = writer.close()
    log.info("precompute %s slice %d/%d: %d sequences in %d shards; teacher %.2f s, writer wait %.2f s "
             "(time the producer spent inside write_shard), loop %.2f s", t_cfg.name, slice_index, num_slices,
             seqs, shards, teacher_s, writer_wait_s, manifest.notes["this_run"]["loop_seconds"])
    return manifest


def _expected_sequences(cfg: PrecomputeConfig, wanted: Callable[[int], bool]) -> int | None:
    """Sequences this run will compute when the stream length is known up front (`max_tokens`), else None."""
    if cfg.corpus.max_tokens is None:
        return None
    windows = cfg.corpus.max_tokens // cfg.seq_len
    size = cfg.storage.shard_size
    if windows > 10**9:  # a huge --max-tokens caps nothing: count like an uncapped stream, not shard by shard
        return None
    return sum(min(size, windows - g * size) for g in range(-(-windows // size)) if wanted(g))
