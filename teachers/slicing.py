"""Which node slice this process computes: `--num-shards N --shard-index i`, or the launcher's environment.

Slice s of N reads the corpus partitions p with p % N == s and computes every shard in them
(storage/manifest.py), so slices are disjoint and their union is the whole run. Defaults, in order: explicit options; torchrun (`RANK`, `WORLD_SIZE`);
an srun step (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`: the processes actually started); else a single slice.

A batch script run directly by sbatch (no srun) sees `SLURM_PROCID=0` and the allocation's `SLURM_NTASKS`
but is one process: taking slice 0 of N would silently leave N-1 slices undone, so that is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from common.errors import ConfigError

_ENV_PAIRS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"))


def resolve_slice(num_shards: int | None = None, shard_index: int | None = None,
                  env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(shard_index, num_shards) for this process; ConfigError on inconsistent values."""
    env = os.environ if env is None else env
    source = "--num-shards/--shard-index"
    if num_shards is None or shard_index is None:
        for rank_var, size_var in _ENV_PAIRS:
            if rank_var in env and size_var in env:
                try:
                    rank, size = int(env[rank_var]), int(env[size_var])
                except ValueError:
                    raise ConfigError(f"{rank_var}={env[rank_var]!r} / {size_var}={env[size_var]!r} "
                                      "are not integers") from None
                if num_shards is None:
                    num_shards = size
                if shard_index is None:
                    shard_index = rank
                source = f"{rank_var}/{size_var}"
                break
    if (num_shards is None or shard_index is None) and source == "--num-shards/--shard-index":
        ntasks = env.get("SLURM_NTASKS", "1")
        if "SLURM_JOB_ID" in env and "SLURM_STEP_NUM_TASKS" not in env and ntasks.isdigit() and int(ntasks) > 1:
            raise ConfigError(f"inside a Slurm allocation of {ntasks} tasks but not in an srun step: this single "
                              f"process would compute only slice 0 of {ntasks}; launch it with srun, or pass "
                              "--num-shards and --shard-index")
    if num_shards is None:
        num_shards = 1
    if shard_index is None:
        if num_shards != 1:
            raise ConfigError(f"--num-shards {num_shards} needs --shard-index (or RANK / SLURM_PROCID)")
        shard_index = 0
    if num_shards < 1:
        raise ConfigError(f"number of slices must be >= 1, got {num_shards} (from {source})")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"slice index {shard_index} is outside 0..{num_shards - 1} (from {source})")
    return shard_index, num_shards


def owns_partition(partition: int, shard_index: int, num_shards: int) -> bool:
    """True when corpus partition `partition` is read (and its shards computed) by slice `shard_index`."""
    return partition % num_shards == shard_index
