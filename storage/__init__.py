"""Shard storage shared by both stages: schema v1, Parquet and Zarr shards, manifests, readers."""

from storage.errors import (
    ConfigError,
    ManifestError,
    MismatchError,
    ShardCorruptError,
    StorageError,
    UserError,
)
from storage.manifest import SCHEMA_VERSION, Manifest, ShardInfo, TeacherInfo
from storage.records import TeacherTargets

__all__ = [
    "SCHEMA_VERSION", "ConfigError", "Manifest", "ManifestError", "MismatchError", "ShardCorruptError",
    "ShardInfo", "StorageError", "TeacherInfo", "TeacherTargets", "UserError",
]
