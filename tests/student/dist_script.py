"""Run `cli.py train-student ARGS` (under torchrun or alone) and record the seq ids each rank trains on.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/student/dist_script.py SEEN_DIR ARGS...

Writes SEEN_DIR/seen-rank{R}.json: one list of seq ids per micro-batch, in order, and
SEEN_DIR/hashes-rank{R}.json: the files whose sha256 this rank computed (storage.fs.sha256_of calls).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import storage.fs as storage_fs  # noqa: E402
import student.trainer as trainer_mod  # noqa: E402
from cli import main  # noqa: E402

seen: list[list[int]] = []
hashed: list[str] = []
_original = trainer_mod.Trainer.compute_loss
_original_sha = storage_fs.sha256_of


def _counting_sha(fs, path):
    hashed.append(path)
    return _original_sha(fs, path)


def _recording(self, batch, *, train):
    if train:
        seen.append(batch.seq_ids.tolist())
    return _original(self, batch, train=train)


if __name__ == "__main__":
    out_dir, args = sys.argv[1], sys.argv[2:]
    trainer_mod.Trainer.compute_loss = _recording
    storage_fs.sha256_of = _counting_sha
    try:
        main(["train-student", *args], standalone_mode=False)
    finally:
        with open(os.path.join(out_dir, f"seen-rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(seen, f)
        with open(os.path.join(out_dir, f"hashes-rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(hashed, f)
