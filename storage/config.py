"""Configs of the storage commands: `InspectConfig` (inspect) and `MergeConfig` (merge)."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError


@dataclass(kw_only=True)
class InspectConfig:
    """What `inspect` describes and how much of it it decodes."""

    path: str
    """A teacher directory or a single shard (local path or fsspec URL)."""
    rows: int = 0
    """Sequences decoded (from the first), each shown at `position`."""
    position: int = 0
    """Token position inside each decoded sequence whose top-k, mass and entropy are shown."""
    verify: bool = True
    """Check the sha256 of every shard (and record a verified stamp); False checks sizes only."""
    as_json: bool = False
    """Print the report as one JSON object instead of text."""

    def __post_init__(self) -> None:
        for name in ("rows", "position"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class MergeConfig:
    """Which teacher directory `merge` writes the manifest.json of."""

    path: str
    """The teacher directory holding the slice manifests (local path or fsspec URL)."""
    verify: bool = False
    """Also check the sha256 of every shard before writing (and record a verified stamp)."""
