"""Fixtures shared by the test suite."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def memory_url():
    """A fresh memory:// directory, removed afterwards."""
    import fsspec

    url = f"memory://storage-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """Each test module starts and ends with the process's torch thread count: some set 1 thread for speed, and
    a leaked count changes the float sums of later in-process references (an aligned cache computed in-process
    with 1 thread differs in bytes from the same command run with 2, so a byte comparison would fail)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
