"""Errors the storage layer raises for bad user data (never AssertionError); the generic ones
(`UserError`, `ConfigError`) are in `common/errors.py`."""

from __future__ import annotations

from common.errors import UserError


class StorageError(UserError):
    """A shard, manifest or directory cannot be used; the message names the file and why."""


class ManifestError(StorageError):
    """A manifest is missing, malformed, or of an unsupported schema version."""


class ShardCorruptError(StorageError):
    """A shard's bytes do not match its manifest entry (size, sha256, rows) or cannot be decoded."""


class MismatchError(StorageError):
    """Two things that must agree (a resumed run and its config, two teachers, two slices) do not.

    `field` names the first differing field; `values` holds the two differing values.
    """

    def __init__(self, message: str, field: str, values: tuple[object, object]) -> None:
        super().__init__(message)
        self.field = field
        self.values = values
