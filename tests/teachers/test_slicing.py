"""Node slices: explicit options, torchrun / SLURM defaults, disjoint slices covering the run."""

from __future__ import annotations

import pytest

from storage.errors import ConfigError
from teachers.slicing import owns_partition, resolve_slice


def test_defaults_and_environment() -> None:
    assert resolve_slice(env={}) == (0, 1)
    assert resolve_slice(4, 2, env={"RANK": "1", "WORLD_SIZE": "8"}) == (2, 4)
    assert resolve_slice(env={"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert resolve_slice(env={"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}) == (5, 6)
    # torchrun wins over SLURM when a torchrun fleet runs inside a SLURM allocation
    assert resolve_slice(env={"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (1, 2)


def test_bad_values_are_user_errors() -> None:
    with pytest.raises(ConfigError, match="needs --shard-index"):
        resolve_slice(3, None, env={})
    with pytest.raises(ConfigError, match="outside 0..1"):
        resolve_slice(2, 2, env={})
    with pytest.raises(ConfigError, match="RANK"):
        resolve_slice(env={"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_slices_are_disjoint_and_cover_all_partitions(n: int) -> None:
    owners = [[s for s in range(n) if owns_partition(g, s, n)] for g in range(50)]
    assert all(len(o) == 1 for o in owners)
    assert {o[0] for o in owners} == set(range(n))
