"""Errors of stage one caused by user input (the CLI prints them as one line and exits 2)."""

from __future__ import annotations

from common.errors import LoadError


class TeacherLoadError(LoadError):
    """The teacher model cannot be loaded, or cannot be used by this backend."""
