"""Shard storage shared by both stages: schema v1, Parquet and Zarr shards, manifests, readers."""

from common.errors import ConfigError, UserError
from storage.errors import ManifestError, MismatchError, ShardCorruptError, StorageError
from storage.manifest import SCHEMA_VERSION, Manifest, ShardInfo, TeacherInfo
from storage.records import TeacherTargets

__all__ = [
    "SCHEMA_VERSION", "ConfigError", "Manifest", "ManifestError", "MismatchError", "ShardCorruptError",
    "ShardInfo", "StorageError", "TeacherInfo", "TeacherTargets", "UserError",
]
