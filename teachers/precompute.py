"""Stage one: corpus -> packed windows -> teacher -> targets head -> shards -> manifest.

    manifest = run_precompute(cfg)

Packing runs in a background thread (the Rust tokenizer releases the GIL) and the TargetsWriter compresses
and writes in another, so the teacher forward is the only thing on the critical path. The corpus is cut into
fixed partitions (common/corpus.py); slice s of n reads, tokenizes and packs only the partitions
p % n == s, each on its own, and runs the teacher on the shards of those partitions it has not completed; a
re-run of the same command therefore resumes where it stopped and yields identical shards. Sequence ids
come from (partition, window in partition) (storage/layout.py), and batches never cross a shard boundary,
so a shard's bytes do not depend on how the run was sliced or resumed.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from common.packing import PackedBatch, PackStats
from common.positions import check_positions, max_positions
from storage.layout import SHARDS_PER_PARTITION
from storage.manifest import ALIGNED_SCHEMA_VERSION, SAMPLE_SEED_RULE, SCHEMA_VERSION, Manifest
from storage.records import TeacherTargets
from teachers.config import PrecomputeConfig, TeacherConfig

if TYPE_CHECKING:
    from common.corpus import Partition, ReadStats
    from storage.artifacts import Input
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
    return pieces[0] if len(pieces) == 1 else PackedBatch.concat(pieces)


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
    targets = parts[0] if len(parts) == 1 else TeacherTargets.concat(parts)
    if windows.loss_mask is not None:  # conversations: the mask and boundaries come from packing, in S's positions
        targets.loss_mask, targets.doc_start = windows.loss_mask, windows.doc_start
    return targets


def precompute_inputs(cfg: PrecomputeConfig) -> list[Input]:
    """The local paths precompute reads (teacher, tokenizers, corpus files), which its output must not be."""
    import glob

    from storage.artifacts import Input, existing_paths

    t = cfg.teacher
    inputs = [Input(flag, p) for flag, value in (("--teacher", t.path), ("--tokenizer", t.tokenizer),
                                                  ("--align-tokenizer", t.align_tokenizer))
              for p in existing_paths([value])]
    for part in (cfg.corpus.dataset or "").split(","):  # a path, a glob, a directory or a comma list
        part = part.strip()
        matches = glob.glob(part) if glob.has_magic(part) else [part]
        inputs += [Input("--dataset", p) for p in existing_paths(matches)]
    return inputs


def run_precompute(cfg: PrecomputeConfig, *, backend: TeacherBackend | None = None) -> Manifest:
    """Run one slice of stage one and return the manifest it wrote (see the module docstring).

    `backend`: an already loaded backend built from `cfg.teacher` (benchmarks and tests reuse one model
    across runs); by default it is created from `cfg.teacher`. The slice's lock is taken first, before the
    teacher loads, so a second process on the same slice is refused in seconds (storage/lock.py).
    """
    from storage import fs as sfs
    from storage.artifacts import Kind, check_output
    from storage.lock import CacheLock, lock_name
    from storage.writer import prepare_output
    from teachers.slicing import resolve_slice

    slice_index, num_slices = resolve_slice(cfg.num_slices, cfg.slice_index)
    check_window(cfg, teacher_positions(cfg.teacher))  # before the output is created or the weights load
    output = cfg.storage.output
    fs, root = sfs.resolve(output)
    check_output(output, command="precompute", writes=Kind.CACHE, inputs=precompute_inputs(cfg),
                 replace=True)  # its own cache is resumed (settings compared by the writer), nothing else written
    prepare_output(fs, root, output)  # a file or an unwritable --output fails here, before anything loads
    lock = CacheLock(fs, root, lock_name(slice_index, num_slices), what=f"slice {slice_index} of {num_slices} of "
                     f"{output}", slice_index=slice_index, num_slices=num_slices)
    with lock:
        return _run_slice(cfg, backend, slice_index, num_slices, lock)


def teacher_positions(t: TeacherConfig) -> int | None:
    """The positions the teacher's config declares, read without its weights; None when it declares none or
    the config cannot be read here (loading the teacher then reports why, in one line)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(revision=t.revision, trust_remote_code=t.trust_remote_code)
    if t.gguf_file:
        kwargs["gguf_file"] = t.gguf_file
    try:
        return max_positions(AutoConfig.from_pretrained(t.path, **kwargs))
    except (OSError, ValueError):
        return None


def check_window(cfg: PrecomputeConfig, positions: int | None) -> None:
    """ConfigError when the teacher would see a window longer than its `positions`: its outputs there are not
    the distribution it was trained to give (rotary models compute them without complaint). An aligned
    teacher's window is its own tokens of seq_len S tokens, a count known only once the text is tokenized:
    AlignedBackend checks it per batch, before the forward."""
    t = cfg.teacher
    if positions is None or t.align_tokenizer is not None:
        return
    check_positions({f"teacher {t.path}": positions}, cfg.seq_len)
    if t.backend == "vllm" and cfg.seq_len + 1 > positions:
        # vLLM schedules the L prompt tokens plus the one generated step it always takes (max_model_len L + 1)
        raise ConfigError(f"teacher {t.path} has max_position_embeddings {positions}; the vllm backend needs "
                          f"seq_len + 1 = {cfg.seq_len + 1} positions; lower --seq-len")


def _run_slice(cfg: PrecomputeConfig, backend: TeacherBackend | None, slice_index: int, num_slices: int,
               lock: CacheLock) -> Manifest:
    from tqdm.auto import tqdm

    from common.chat import ChatPackStats
    from common.corpus import ReadStats, corpus_fingerprint, corpus_partitions
    from common.tokenizer import load_tokenizer, tokenizer_fingerprint
    from storage.run_stats import SliceStats
    from storage.writer import TargetsWriter
    from teachers.backends import create_backend
    from teachers.sampling import sample_key
    from teachers.slicing import owns_partition

    t_cfg, s_cfg = cfg.teacher, cfg.storage
    corpus_fp, corpus_desc = corpus_fingerprint(cfg.corpus)
    partitions = corpus_partitions(cfg.corpus)
    mine = [p for p in partitions if owns_partition(p.index, slice_index, num_slices)]
    if not mine:
        log.warning("slice %d of %d has no corpus partition to read (the corpus has %d; a smaller "
                    "--partition-bytes makes more)", slice_index, num_slices, len(partitions))
    tok_path = t_cfg.tokenizer or t_cfg.path
    tokenizer = load_tokenizer(tok_path, gguf_file=None if t_cfg.tokenizer else t_cfg.gguf_file,
                               revision=None if t_cfg.tokenizer else t_cfg.revision,
                               trust_remote_code=t_cfg.trust_remote_code)
    if backend is None:
        backend = create_backend(t_cfg, seq_len=cfg.seq_len)
    check_window(cfg, getattr(backend, "max_positions", None))  # the loaded model's own config (a given backend)
    schema_version, alignment = SCHEMA_VERSION, None
    if t_cfg.align_tokenizer is not None:
        if t_cfg.targets == "sampled":
            raise ConfigError("--targets sampled cannot be combined with --align-tokenizer yet: the draws are "
                              "taken in the teacher's own token space; use top-k targets for an aligned cache")
        from teachers.aligned_backend import AlignedBackend

        student_tok = load_tokenizer(t_cfg.align_tokenizer, gguf_file=t_cfg.align_gguf_file)
        s_path = t_cfg.align_tokenizer + (f"/{t_cfg.align_gguf_file}" if t_cfg.align_gguf_file else "")
        if not isinstance(backend, AlignedBackend):
            backend = AlignedBackend(backend, tokenizer, student_tok, student_tokenizer=s_path,
                                     teacher_tokenizer=tok_path, specials_as_text=cfg.corpus.chat)
        tokenizer, tok_path = student_tok, s_path  # packing and the stored token space are S's
        schema_version, alignment = ALIGNED_SCHEMA_VERSION, backend.alignment
    loss_mask = chat_mask_info(cfg, tokenizer) if cfg.corpus.chat else None
    sampled = t_cfg.targets == "sampled"
    if t_cfg.top_k > backend.vocab_size and not sampled:
        raise ConfigError(f"top_k {t_cfg.top_k} exceeds the teacher's vocab size {backend.vocab_size}")
    info = backend.info()
    if sampled:
        # the draws of position (seq id, t) are keyed by this run's corpus and teacher (SAMPLE_SEED_RULE)
        backend.sample_key = sample_key(corpus_fp, info.name, info.path)
    header = Manifest(
        schema_version=schema_version, alignment=alignment, loss_mask=loss_mask, format=s_cfg.format, teacher=info, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=backend.vocab_size, seq_len=cfg.seq_len, top_k=cfg.slots, temperature=t_cfg.temperature,
        target_kind=t_cfg.targets, samples=t_cfg.samples if sampled else None,
        sample_seed=SAMPLE_SEED_RULE if sampled else None,
        logprob_dtype=s_cfg.logprob_dtype, logprob_mantissa_bits=s_cfg.manifest_mantissa_bits,
        entropy_kind=backend.entropy_kind, observed_logprob=alignment is None and backend.observed_logprob,
        pooled_layers=sorted(backend.pooled_dims), pooled_dims=dict(backend.pooled_dims),
        corpus_fingerprint=corpus_fp, corpus=corpus_desc, shard_size=s_cfg.shard_size,
        num_partitions=len(partitions), slice_index=slice_index, num_slices=num_slices,
        notes={"backend": dict(backend.notes), "tokenizer": tok_path, "batch_size": cfg.batch_size,
               **({"chat_template": chat_template_text(cfg, tokenizer)} if cfg.corpus.chat else {})},
    )
    stats, read = (ChatPackStats() if cfg.corpus.chat else PackStats()), ReadStats()
    windows_per_partition: dict[int, int] = {}
    with TargetsWriter(s_cfg.output, header, lock=lock) as writer:
        done_before = set(writer.completed)

        def wanted(g: int) -> bool:
            return g not in done_before

        total = _expected_sequences(cfg, len(partitions), mine)
        bar = tqdm(total=None if total is None else total * cfg.seq_len, unit="tok", unit_scale=True,
                   disable=not cfg.progress, desc=f"precompute {t_cfg.name} slice {slice_index}/{num_slices}",
                   dynamic_ncols=True)
        windows = prefetch(pack_partitions(cfg, tokenizer, mine, len(partitions), stats=stats, read=read,
                                           windows_per_partition=windows_per_partition))
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
        if stats.windows == 0 and num_slices == 1:
            if getattr(stats, "too_long", 0):
                raise ConfigError(f"all {stats.too_long} conversations are longer than seq_len {cfg.seq_len}; raise "
                                  "--seq-len or pass --truncate-conversations")
            raise ConfigError(f"the corpus has {stats.tokens} tokens, fewer than one window of seq_len "
                              f"{cfg.seq_len}")
        writer.record_stats(SliceStats(
            packing=stats.to_dict(),
            partitions={"total": len(partitions), "read": [p.index for p in mine],
                        "windows": {str(p): w for p, w in windows_per_partition.items()}},
            this_run={"sequences": seqs, "shards": shards, "skipped_completed": len(done_before),
                      "corpus_bytes_read": read.bytes_read, "corpus_documents_read": read.documents,
                      "teacher_seconds": round(teacher_s, 3), "writer_wait_s": round(writer_wait_s, 3),
                      "loop_seconds": round(time.perf_counter() - run_t0, 3)},
        ))
    manifest = writer.close()
    log.info("precompute %s slice %d/%d: %d sequences in %d shards; teacher %.2f s, writer wait %.2f s "
             "(time the producer spent inside write_shard), loop %.2f s", t_cfg.name, slice_index, num_slices,
             seqs, shards, teacher_s, writer_wait_s, manifest.notes["this_run"]["loop_seconds"])
    return manifest


def pack_partitions(cfg: PrecomputeConfig, tokenizer: Any, parts: list[Partition], num_partitions: int, *,
                    stats: PackStats, read: ReadStats,
                    windows_per_partition: dict[int, int]) -> Iterator[PackedBatch]:
    """Pack each partition of `parts` on its own, with its share of the corpus limits; window w of
    partition p gets seq id shard_of(p, w) * shard_size + w % shard_size (storage/layout.py).

    `stats` sums the packing counts over the partitions, `read` counts bytes and documents read, and
    `windows_per_partition` receives each partition's window count once it is packed.
    """
    from common.chat import ChatPackStats, pack_conversations, resolve_template
    from common.corpus import iter_partition, share
    from common.packing import pack_documents

    size = cfg.storage.shard_size
    template = resolve_template(tokenizer, cfg.corpus.chat_template) if cfg.corpus.chat else None
    for part in parts:
        max_docs = share(cfg.corpus.max_documents, num_partitions, part.index)
        max_tokens = share(cfg.corpus.max_tokens, num_partitions, part.index)
        if max_docs == 0 or max_tokens == 0:
            windows_per_partition[part.index] = 0
            continue
        offset = part.index * SHARDS_PER_PARTITION * size  # first seq id of the partition
        docs = iter_partition(cfg.corpus, part, max_documents=max_docs, stats=read)
        if template is not None:
            own: PackStats = ChatPackStats()
            packed = pack_conversations(docs, tokenizer, seq_len=cfg.seq_len, template=template,
                                        truncate=cfg.corpus.truncate_conversations, max_tokens=max_tokens,
                                        stats=own)
        else:
            own = PackStats()
            packed = pack_documents(docs, tokenizer, seq_len=cfg.seq_len, max_tokens=max_tokens, stats=own)
        for batch in packed:
            yield dataclasses.replace(batch, seq_ids=batch.seq_ids + offset)
        windows_per_partition[part.index] = own.windows
        if isinstance(stats, ChatPackStats):
            stats.add(own)  # type: ignore[arg-type]
            continue
        stats.documents += own.documents
        stats.tokens += own.tokens
        stats.windows += own.windows
        stats.dropped_tokens += own.dropped_tokens
        stats.truncated = stats.truncated or own.truncated


def chat_mask_info(cfg: PrecomputeConfig, tokenizer: Any) -> dict[str, Any]:
    """The manifest's `loss_mask` entry of a conversation cache: its columns and how the mask was made
    (`tokenizer` is the one packing renders with: the student's S for an aligned teacher)."""
    from common.chat import mask_method, resolve_template, template_sha256
    from storage.manifest import BOUNDARY_COLUMN, LOSS_MASK_COLUMN

    template = resolve_template(tokenizer, cfg.corpus.chat_template)
    return {"column": LOSS_MASK_COLUMN, "boundaries": BOUNDARY_COLUMN, "marks": "assistant",
            "chat_template_sha256": template_sha256(template), "method": mask_method(template),
            "truncate_conversations": cfg.corpus.truncate_conversations}


def chat_template_text(cfg: PrecomputeConfig, tokenizer: Any) -> str:
    """The template the conversations were rendered with, kept in the notes so the trained student's saved
    tokenizer renders conversations the same way."""
    from common.chat import resolve_template

    return resolve_template(tokenizer, cfg.corpus.chat_template)


def _expected_sequences(cfg: PrecomputeConfig, num_partitions: int, parts: list[Partition]) -> int | None:
    """At most how many sequences this slice packs, when the stream length is capped (`max_tokens`), else
    None; an upper bound for the progress bar (shards done by an earlier run are not subtracted)."""
    from common.corpus import share

    if cfg.corpus.max_tokens is None:
        return None
    if cfg.corpus.max_tokens // cfg.seq_len > 10**9:  # a huge --max-tokens caps nothing: count as uncapped
        return None
    return sum(share(cfg.corpus.max_tokens, num_partitions, p.index) // cfg.seq_len for p in parts)
