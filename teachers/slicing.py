"""Which node slice this process computes: `--num-slices N --slice-index i`, or the launcher's environment.

Slice s of N reads the corpus partitions p with p % N == s and computes every shard in them
(storage/layout.py), so slices are disjoint and their union is the whole run. Defaults, in order: explicit options; torchrun (`RANK`, `WORLD_SIZE`);
an srun step (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`: the processes actually started); else a single slice.

A batch script run directly by sbatch (no srun) sees `SLURM_PROCID=0` and the allocation's `SLURM_NTASKS`
but is one process: taking slice 0 of N would silently leave N-1 slices undone, so that is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from common.errors import ConfigError

_ENV_PAIRS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"))


def resolve_slice(num_slices: int | None = None, slice_index: int | None = None,
                  env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(slice_index, num_slices) for this process; ConfigError on inconsistent values."""
    env = os.environ if env is None else env
    source = "--num-slices/--slice-index"
    if num_slices is None or slice_index is None:
        for rank_var, size_var in _ENV_PAIRS:
            if rank_var in env and size_var in env:
                try:
                    rank, size = int(env[rank_var]), int(env[size_var])
                except ValueError:
                    raise ConfigError(f"{rank_var}={env[rank_var]!r} / {size_var}={env[size_var]!r} "
                                      "are not integers") from None
                if num_slices is None:
                    num_slices = size
                if slice_index is None:
                    slice_index = rank
                source = f"{rank_var}/{size_var}"
                break
    if (num_slices is None or slice_index is None) and source == "--num-slices/--slice-index":
        ntasks = env.get("SLURM_NTASKS", "1")
        if "SLURM_JOB_ID" in env and "SLURM_STEP_NUM_TASKS" not in env and ntasks.isdigit() and int(ntasks) > 1:
            raise ConfigError(f"inside a Slurm allocation of {ntasks} tasks but not in an srun step: this single "
                              f"process would compute only slice 0 of {ntasks}; launch it with srun, or pass "
                              "--num-slices and --slice-index")
    if num_slices is None:
        num_slices = 1
    if slice_index is None:
        if num_slices != 1:
            raise ConfigError(f"--num-slices {num_slices} needs --slice-index (or RANK / SLURM_PROCID)")
        slice_index = 0
    if num_slices < 1:
        raise ConfigError(f"number of slices must be >= 1, got {num_slices} (from {source})")
    if not 0 <= slice_index < num_slices:
        raise ConfigError(f"slice index {slice_index} is outside 0..{num_slices - 1} (from {source})")
    return slice_index, num_slices


def owns_partition(partition: int, slice_index: int, num_slices: int) -> bool:
    """True when corpus partition `partition` is read (and its shards computed) by slice `slice_index`."""
    return partition % num_slices == slice_index
