"""Node slices: explicit options, torchrun / SLURM defaults, disjoint slices covering the run."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from teachers.slicing import owns_partition, resolve_slice


def test_defaults_and_environment() -> None:
    assert resolve_slice(env={}) == (0, 1)
    assert resolve_slice(4, 2, env={"RANK": "1", "WORLD_SIZE": "8"}) == (2, 4)
    assert resolve_slice(env={"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    srun = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_ID": "0"}
    assert resolve_slice(env={**srun, "SLURM_PROCID": "5"}) == (5, 6)
    # the step's task count wins over the allocation's (srun -n 3 inside a 6-task allocation)
    assert resolve_slice(env={**srun, "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3"}) == (2, 3)
    # torchrun wins over SLURM when a torchrun fleet runs inside a SLURM allocation
    assert resolve_slice(env={"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (1, 2)


def test_sbatch_without_srun_is_refused() -> None:
    """The batch script itself sees SLURM_PROCID=0 and SLURM_NTASKS=N but is one process."""
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "24", "SLURM_PROCID": "0"}
    with pytest.raises(ConfigError, match=r"not in an srun step: this single process would compute only slice 0 of 24"):
        resolve_slice(env=batch)
    assert resolve_slice(3, 1, env=batch) == (1, 3)  # explicit options are honoured
    assert resolve_slice(env={**batch, "SLURM_NTASKS": "1"}) == (0, 1)


def test_bad_values_are_user_errors() -> None:
    with pytest.raises(ConfigError, match="needs --slice-index"):
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
