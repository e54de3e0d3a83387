"""TargetsWriter: writes whole global shards in a background thread, keeps a resume ledger, writes the
slice manifest last.

    with TargetsWriter("out/teacher-a", header) as w:
        for index in my_shards:
            if index in w.completed:          # done by an earlier (preempted) run, verified
                continue
            w.write_shard(index, targets)     # returns once queued; compression and I/O run in a thread
    manifest = w.close()                      # (the `with` block calls it too)

Ledger: `ledger-slice-IIIII-of-NNNNN.json` in the output directory, a manifest of the shards done so far,
rewritten atomically after every shard. On start, before anything is written:

- the slice's lock `lock-slice-IIIII-of-NNNNN.json` is taken (storage/lock.py): a second writer of the same
  slice is refused with a message naming the holder, a stale lock of a dead process on this host is removed;
- every manifest, slice manifest and ledger already in the directory (not only this slice's) is compared
  with `header`: run fields, pooled widths, teacher shape, the byte-changing settings kept in notes, and the
  slice count (MismatchError naming the first difference). A live lock of a run with another slice count is
  refused too. So a cache is only ever extended by a run that writes the same bytes;
- this slice's own ledger and manifest are read back and every listed shard verified (exists, size,
  sha256); a shard that fails is dropped with a warning and must be written again;
- temporaries this slice left when killed (half-written shards, `*.json.tmp-*`) are removed.

Failing writes (disk full, permissions) raise StorageError naming the file; the shard being written is never
recorded, so a re-run after freeing space resumes from the ledger.
"""

from __future__ import annotations

import copy
import os
import queue
import re
import threading
import warnings
from types import TracebackType

import numpy as np
from fsspec import AbstractFileSystem

from storage import fs as sfs
from storage import shards as shard_io
from storage.consistency import compare_parts
from storage.errors import ManifestError, MismatchError, StorageError
from storage.formats import FORMATS, shard_format
from storage.layout import MANIFEST_NAME, shard_file_name, slice_manifest_name
from storage.lock import CacheLock, live_locks, lock_name
from storage.manifest import ALIGNMENT_STATS, Manifest, ShardInfo
from storage.records import TeacherTargets
from storage.run_stats import SliceStats
from storage.schema import check_header, to_columns
from storage.stamps import write_stamp

_STOP = object()
_TEMP_RE = re.compile(rf"^shard-(\d{{6,}})\.({'|'.join(FORMATS)})\.tmp-\d+-[0-9a-f]+$")
_PART_RE = re.compile(r"^(manifest\.json|manifest-slice-\d{5}-of-\d{5}\.json|ledger-slice-\d{5}-of-\d{5}\.json)$")


def ledger_name(slice_index: int, num_slices: int) -> str:
    """File name of the resume ledger of one slice."""
    return f"ledger-slice-{slice_index:05d}-of-{num_slices:05d}.json"


def prepare_output(fs: AbstractFileSystem, root: str, output: str) -> None:
    """Create output directory `root` (StorageError if it is a file or cannot be created)."""
    if fs.exists(root) and not fs.isdir(root):
        raise StorageError(f"{output}: is a file, not a directory; choose another --output")
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{output}: cannot create the output directory: {sfs.os_error_reason(e)}") from e
    if sfs.is_local(fs) and not os.access(root, os.W_OK | os.X_OK):
        raise StorageError(f"{output}: the output directory is not writable")


def output_manifest_name(m: Manifest) -> str:
    """manifest.json for an unsliced run, else this slice's manifest name."""
    return MANIFEST_NAME if m.num_slices == 1 else slice_manifest_name(m.slice_index, m.num_slices)


class TargetsWriter:
    """Writes the shards of one slice of a teacher's targets (see the module docstring)."""

    def __init__(self, output: str, header: Manifest, *, background: bool = True, max_pending: int = 2,
                 lock: CacheLock | None = None) -> None:
        """`lock`: this slice's lock, already held by the caller (who releases it); by default the writer
        takes it here and releases it on close / abort."""
        if max_pending < 1:
            raise StorageError(f"max_pending must be >= 1, got {max_pending}")
        header.validate("header")
        self.header = copy.deepcopy(header)
        self.header.shards = []
        self.fs, self.root = sfs.resolve(output)
        prepare_output(self.fs, self.root, output)
        self.completed: dict[int, ShardInfo] = {}
        """Global shard index -> ShardInfo of every shard known complete (from a resumed run or this one)."""
        self._ledger = sfs.join(self.root, ledger_name(header.slice_index, header.num_slices))
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._failed = threading.Event()  # set once the thread failed; it then writes nothing more
        self._first_error: BaseException | None = None
        self._manifest: Manifest | None = None
        self._run_stats: SliceStats | None = None
        self._closed = False
        name = lock_name(header.slice_index, header.num_slices)
        self._owns_lock = lock is None
        if lock is None:
            lock = CacheLock(self.fs, self.root, name, what=f"slice {header.slice_index} of {header.num_slices} "
                             f"of {output}", slice_index=header.slice_index, num_slices=header.num_slices)
            lock.acquire()
        elif not lock.held or lock.name != name or lock.root != self.root:
            raise StorageError(f"TargetsWriter needs the held lock {name} of {output}, got {lock.path} "
                               f"({'held' if lock.held else 'not held'})")
        self._slice_lock = lock
        try:
            self._check_other_writers()
            self._resume(self._check_directory())
            self._remove_stale_temporaries()
        except BaseException:
            self._release_lock()
            raise
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._work, name="targets-writer", daemon=True)
            self._thread.start()

    # ---- resume --------------------------------------------------------------------------------
    def _check_other_writers(self) -> None:
        """MismatchError if a live writer of this directory runs with another slice count."""
        h = self.header
        for name, holder in live_locks(self.fs, self.root).items():
            theirs = holder.get("num_slices")
            if isinstance(theirs, int) and theirs != h.num_slices:
                raise MismatchError(
                    f"this run and the writer holding {sfs.join(self.root, name)} (pid {holder.get('pid')} on "
                    f"host {holder.get('host')}) differ in 'num_slices': {h.num_slices} vs {theirs}",
                    "num_slices", (h.num_slices, theirs))

    def _check_directory(self) -> dict[str, Manifest]:
        """Compare `header` with every manifest, slice manifest and ledger in the directory; return them by
        file name (MismatchError naming the file and the first difference)."""
        parts: dict[str, Manifest] = {}
        names = [full.rstrip("/").rsplit("/", 1)[-1] for full in self.fs.ls(self.root, detail=False)]
        # finished manifests first (the most useful file to name), then slice manifests, then ledgers
        for name in sorted((n for n in names if _PART_RE.match(n)), key=lambda n: (n[:3] != "man", n != MANIFEST_NAME, n)):
            path = sfs.join(self.root, name)
            try:
                text = sfs.read_text(self.fs, path, error=ManifestError)
            except FileNotFoundError:
                continue  # replaced by another slice right now (atomic rename); it is compared on its next run
            earlier = Manifest.from_json(text, source=path)
            compare_parts(self.header, earlier, f"this run and the earlier run recorded in {path}", slicing=True)
            parts[name] = earlier
        return parts

    def _resume(self, parts: dict[str, Manifest]) -> None:
        h = self.header
        found: dict[int, ShardInfo] = {}
        for name in (output_manifest_name(h), ledger_name(h.slice_index, h.num_slices)):
            earlier = parts.get(name)
            if earlier is None:
                continue
            if (earlier.slice_index, earlier.num_slices) != (h.slice_index, h.num_slices):
                raise MismatchError(f"this run and the earlier run recorded in {sfs.join(self.root, name)} differ "
                                    f"in 'slice_index': {h.slice_index} vs {earlier.slice_index}", "slice_index",
                                    (h.slice_index, earlier.slice_index))
            for info in earlier.shards:
                found[info.index] = info
        dropped = False
        for index in sorted(found):
            info = found[index]
            why = shard_io.problem(self.fs, self.root, info)
            if why is None:
                # the records agree with this run, but they may have been edited: the shard's own header says
                # what it was computed with (a footer or attribute read, next to the sha256 just taken)
                path = shard_io.shard_path(self.root, info)
                stored, _, _ = shard_format(h.format).read_header(self.fs, path)
                check_header(path, stored, h)
                self.completed[index] = info
            else:
                dropped = True
                warnings.warn(f"{sfs.join(self.root, info.file)}: {why}; dropped from the ledger, it will be "
                              "written again", stacklevel=3)
        if dropped or (found and not self.fs.exists(self._ledger)):
            self._write_ledger()

    def _remove_stale_temporaries(self) -> None:
        """Remove what a killed (or disk-full) run of this slice left half-written: shards of this slice
        (shard-GGGGGG.<fmt>.tmp-*), and temporaries of this slice's ledger, manifest and lock (*.tmp-*).

        Runs while holding this slice's lock; other slices' files are never touched (they may be writing)."""
        h = self.header
        own = (ledger_name(h.slice_index, h.num_slices), output_manifest_name(h),
               lock_name(h.slice_index, h.num_slices))
        for full in self.fs.ls(self.root, detail=False):
            name = full.rstrip("/").rsplit("/", 1)[-1]
            match = _TEMP_RE.match(name)
            mine = (match is not None and h.slice_of(int(match.group(1))) == h.slice_index) or any(
                name.startswith(f"{base}.tmp-") or name.startswith(f"{base}.stale-") for base in own)
            if mine:
                self.fs.rm(full, recursive=True)

    def _write_ledger(self) -> None:
        ledger = copy.deepcopy(self.header)
        ledger.shards = [self.completed[i] for i in sorted(self.completed)]
        sfs.atomic_write_text(self.fs, self._ledger, ledger.to_json())

    # ---- writing -------------------------------------------------------------------------------
    def write_shard(self, index: int, targets: TeacherTargets) -> None:
        """Queue global shard `index` (seq ids index*shard_size.. contiguous, 1..shard_size rows).

        Validates and copies the arrays now (the caller may reuse its buffers), then returns once the shard
        is queued; blocks while `max_pending` shards wait. Re-raises an error of the writer thread.
        """
        self._raise_pending()
        if self._closed:
            raise StorageError("write_shard called on a closed TargetsWriter")
        data = self._validate(index, targets)
        stats = self._stats(index, targets)
        if self._queue is None:
            self._write(index, data, stats)
            return
        while True:  # put with a timeout so a writer thread that died cannot block us forever
            try:
                self._queue.put((index, data, stats), timeout=0.5)
                break
            except queue.Full:
                self._raise_pending()
                if not self._thread.is_alive():
                    raise StorageError("the writer thread stopped unexpectedly") from None

    def _validate(self, index: int, targets: TeacherTargets) -> dict[str, np.ndarray]:
        h = self.header
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise StorageError(f"shard index must be a non-negative integer, got {index!r}")
        index = int(index)
        if h.slice_of(index) != h.slice_index:
            raise StorageError(f"shard {index} belongs to slice {h.slice_of(index)} of {h.num_slices}, "
                               f"this writer is slice {h.slice_index}")
        rows = len(targets)
        if not 1 <= rows <= h.shard_size:
            raise StorageError(f"shard {index} has {rows} rows, expected 1..{h.shard_size}")
        first = index * h.shard_size
        seq = np.asarray(targets.seq_ids)
        if seq.ndim != 1 or not np.array_equal(seq, np.arange(first, first + rows)):
            got = f"{seq[0]}..{seq[-1]}" if seq.ndim == 1 and seq.size else f"shape {seq.shape}"
            raise StorageError(f"shard {index} must hold contiguous seq ids {first}..{first + rows - 1}, "
                               f"got {got}")
        return to_columns(targets, h)

    def _stats(self, index: int, targets: TeacherTargets) -> dict[str, float] | None:
        """Totals of an aligned shard's per-sequence statistics (ALIGNMENT_STATS), rounded so the manifest
        does not depend on summation order; None for a plain cache."""
        if self.header.alignment is None:
            return None
        if targets.stats is None or set(targets.stats) != set(ALIGNMENT_STATS):
            raise StorageError(f"shard {index} of an aligned cache needs the statistics {ALIGNMENT_STATS}, got "
                               f"{None if targets.stats is None else sorted(targets.stats)}")
        return {key: round(float(np.sum(targets.stats[key], dtype=np.float64)), 6) for key in ALIGNMENT_STATS}

    def _write(self, index: int, data: dict[str, np.ndarray], stats: dict[str, float] | None = None) -> None:
        name = shard_file_name(index, self.header.format)
        self._slice_lock.verify()
        try:
            info = shard_io.write_shard(self.fs, self.root, self.header, index, data)
            info.stats = stats
        except OSError as e:  # disk full, permissions, a vanished directory: the user's to fix
            raise StorageError(f"{sfs.join(self.root, name)}: cannot write: {sfs.os_error_reason(e)}; the shards before it "
                               "are recorded in the ledger, re-run the same command to resume") from e
        with self._lock:  # a failing ledger write (storage.fs names the file) fails the run: no manifest
            self.completed[index] = info
            self._write_ledger()

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._failed.is_set():
                continue  # drain without writing, so producers never block on a dead thread
            try:
                self._write(*item)
            except BaseException as e:  # handed to the caller on its next call
                self._error = self._first_error = e
                self._failed.set()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._closed = True
            self._stop_thread()
            raise error

    def _stop_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def record_stats(self, stats: SliceStats) -> None:
        """This slice's statistics (what it read, packed and computed), written into its manifest's notes at
        `close` (storage/run_stats.py); a merge sums them over the slices."""
        self._run_stats = stats

    # ---- closing -------------------------------------------------------------------------------
    def close(self) -> Manifest:
        """Wait for queued shards, then write this slice's manifest atomically and return it."""
        if self._manifest is not None:
            return self._manifest
        try:
            self._stop_thread()
            self._raise_pending()
            if self._failed.is_set():  # the error was raised before: never write a manifest that lacks a shard
                raise StorageError(f"{self.root}: a shard failed to write ({self._first_error}); no manifest "
                                   "written, re-run to resume")
            self._closed = True
            manifest = copy.deepcopy(self.header)
            if self._run_stats is not None:
                manifest.notes.update(self._run_stats.to_notes())
            manifest.shards = [self.completed[i] for i in sorted(self.completed)]
            manifest.validate(output_manifest_name(manifest))
            self._slice_lock.verify()
            # every listed sha256 was computed from the bytes on the filesystem (written now, or re-checked
            # on resume), so readers may trust them without hashing again
            write_stamp(self.fs, self.root, manifest.shards, by="precompute")
            sfs.atomic_write_text(self.fs, sfs.join(self.root, output_manifest_name(manifest)), manifest.to_json())
        finally:
            self._release_lock()
        self._manifest = manifest
        return manifest

    def abort(self) -> None:
        """Finish queued shards (they stay in the ledger) and stop, without writing a manifest."""
        self._closed = True
        try:
            self._stop_thread()
        finally:
            self._release_lock()
        if self._error is not None:
            warnings.warn(f"the writer thread also failed: {self._error!r}", stacklevel=3)
            self._error = None

    def _release_lock(self) -> None:
        if self._owns_lock:
            self._slice_lock.release()

    def __enter__(self) -> TargetsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.close()
