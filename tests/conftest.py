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
