"""TeacherDataset: random access by position or seq id to one teacher's cached targets.

    ds = TeacherDataset.open("out/teacher-a")           # sizes; sha256 of shards no stamp covers
    pos = ds.position_of(12345)                           # seq id -> position in 0..len(ds)-1
    cols = ds.read_columns([pos, 7], ["topk_ids", "topk_logprobs"])   # {"topk_ids": [2, L, k] int32, ...}
    batch = ds.read([pos, 7])                             # TeacherTargets

Only shards listed in the manifest are read. Positions follow sorted seq ids. Arrays come back freshly
allocated (writable, C-contiguous), without per-element Python objects. Shard files are opened lazily and
per process (the pid is checked on every access), so a dataset built in the parent can be used inside
DataLoader worker processes, forked or spawned.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from storage import fs as sfs
from storage import shards as shard_io
from storage.formats import shard_format
from storage.manifest import Manifest
from storage.merge import open_manifest
from storage.records import TeacherTargets
from storage.schema import check_header, from_columns
from storage.schema import columns as schema_columns
from storage.stamps import VerifyReport, verify_shards

MAX_OPEN_SHARDS = 64
"""Open shard readers kept per process (least recently used are dropped, and closed once no read uses them)."""


class TeacherDataset:
    """One teacher directory: manifest plus random access to its shards."""

    def __init__(self, path: str, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.fs, self.root = sfs.resolve(path)
        self._columns = schema_columns(manifest)
        rows = np.array([s.rows for s in manifest.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._seq_ids = (np.concatenate([np.arange(s.first_seq_id, s.last_seq_id + 1, dtype=np.int64)
                                         for s in manifest.shards])
                         if manifest.shards else np.zeros(0, dtype=np.int64))
        self._seq_ids.setflags(write=False)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._readers: OrderedDict[int, tuple[object, threading.Lock]] = OrderedDict()

    @classmethod
    def open(cls, path: str, *, verify: bool | str = "stamp") -> TeacherDataset:
        """Open a teacher directory (manifest.json, or the merge of its slice manifests).

        verify: `full` (or True) checks size and sha256 of every shard now, `stamp` (default) sizes and the
        sha256 of shards no verified stamp covers (storage/stamps.py), `off` sizes only (ShardCorruptError
        naming the file and why); False checks nothing now. A damaged shard is still detected when read,
        wherever the format can tell.
        """
        ds = cls(path, open_manifest(path))
        if verify is not False:
            ds.verify("full" if verify is True else verify)
        return ds

    def verify(self, mode: str = "full", *, by: str = "reader") -> VerifyReport:
        """Check the shards under `mode` (storage/stamps.py); ShardCorruptError for the first bad one. Then
        the first shard's stored header is compared with the manifest (`check_header`)."""
        report = verify_shards(self.fs, self.root, self.manifest.shards, mode=mode, by=by)
        self.check_header()
        return report

    def check_header(self) -> None:
        """MismatchError when the manifest contradicts the header stored in its first shard (one footer or
        attribute read). Every shard of a cache stores the same header, so an edited manifest is refused here,
        in the process that opens the cache, before any DataLoader worker reads; each shard is compared again
        when a reader opens it (a shard from another cache)."""
        if not self.manifest.shards:
            return
        path = shard_io.shard_path(self.root, self.manifest.shards[0])
        header, _, _ = shard_format(self.manifest.format).read_header(self.fs, path)
        check_header(path, header, self.manifest)

    # ---- indexing ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def seq_ids(self) -> np.ndarray:
        """[len] int64 sorted global seq ids; position i holds seq id seq_ids[i] (read-only)."""
        return self._seq_ids

    def position_of(self, seq_id: int | np.ndarray) -> int | np.ndarray:
        """Position of a seq id (or an array of them); KeyError if the dataset lacks one."""
        ids = np.asarray(seq_id, dtype=np.int64)
        pos = np.searchsorted(self._seq_ids, ids)
        found = (pos < len(self)) & (self._seq_ids[np.minimum(pos, max(len(self) - 1, 0))] == ids) \
            if len(self) else np.zeros(ids.shape, dtype=bool)
        if not np.all(found):
            missing = ids[~found].reshape(-1)[0]
            raise KeyError(f"seq id {int(missing)} is not in {self.path}")
        return int(pos) if np.ndim(seq_id) == 0 else pos.astype(np.int64)

    # ---- reading -------------------------------------------------------------------------------
    def read_columns(self, positions: Sequence[int] | np.ndarray,
                     columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Columns at `positions` -> {name: array} shaped [n], [n, L], [n, L, k] or [n, d].

        Positions may repeat and come in any order; the result follows their order.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        names = list(columns) if columns is not None else list(self._columns)
        unknown = [n for n in names if n not in self._columns]
        if unknown:
            raise KeyError(f"unknown column {unknown[0]!r}; this teacher has {list(self._columns)}")
        if pos.size and (pos.min() < 0 or pos.max() >= len(self)):
            bad = pos[(pos < 0) | (pos >= len(self))][0]
            raise IndexError(f"position {int(bad)} is outside 0..{len(self) - 1}")
        out = {n: np.empty((pos.size, *self._columns[n].shape), dtype=self._columns[n].dtype) for n in names}
        if pos.size == 0:
            return out
        shard_of = np.searchsorted(self._starts, pos, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            local, inverse = np.unique(pos[mask] - self._starts[shard], return_inverse=True)
            reader, lock = self._reader(int(shard))
            with lock:  # one open file, one position: threads sharing a shard take turns (pyarrow crashes otherwise)
                got = reader.read(local, names)
            for n in names:
                out[n][mask] = got[n][inverse]
        return out

    def read(self, positions: Sequence[int] | np.ndarray) -> TeacherTargets:
        """All columns at `positions` as a TeacherTargets."""
        return from_columns(self.read_columns(positions), self.manifest)

    def _reader(self, shard: int) -> tuple[object, threading.Lock]:
        """(open reader, its lock) for a shard of this process; reads through one reader must hold its lock."""
        if os.getpid() != self._pid:  # forked into a worker: never share the parent's open files
            self._readers = OrderedDict()
            self._lock = threading.Lock()
            self._pid = os.getpid()
        with self._lock:
            entry = self._readers.get(shard)
            if entry is None:
                reader = shard_io.open_shard(self.fs, self.root, self.manifest, self.manifest.shards[shard])
                entry = self._readers[shard] = (reader, threading.Lock())
                while len(self._readers) > MAX_OPEN_SHARDS:
                    # dropped, not closed: a thread may be reading through it right now; its file closes
                    # when the last reference goes
                    self._readers.popitem(last=False)
            else:
                self._readers.move_to_end(shard)
            return entry

    def close(self) -> None:
        """Close the shard files this process opened."""
        if os.getpid() == self._pid:
            for reader, lock in self._readers.values():
                with lock:  # wait for a read in flight
                    reader.close()
        self._readers = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # open files never travel to another process
        state["_lock"] = None
        state["_pid"] = -1  # so the receiving process starts afresh
        return state

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherDataset({self.path!r}, teacher={m.teacher.name!r}, sequences={len(self)}, "
                f"seq_len={m.seq_len}, top_k={m.top_k}, format={m.format!r})")
