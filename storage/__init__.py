"""Shard storage shared by both stages: manifests (schema version `SCHEMA_VERSION`, 2), shards of every format
in the registry (storage/formats.py), writers, readers, merge."""

from common.errors import ConfigError, UserError
from storage.errors import ManifestError, MismatchError, ShardCorruptError, StorageError
from storage.manifest import SCHEMA_VERSION, Manifest, ShardInfo, TeacherInfo
from storage.records import TeacherTargets

__all__ = [
    "SCHEMA_VERSION", "ConfigError", "Manifest", "ManifestError", "MismatchError", "ShardCorruptError",
    "ShardInfo", "StorageError", "TeacherInfo", "TeacherTargets", "UserError",
]
