"""Errors of stage one caused by user input (the CLI prints them as one line and exits 2)."""

from __future__ import annotations

from storage.errors import UserError


class CorpusError(UserError):
    """The corpus cannot be read: a missing file, an empty corpus, a missing or non-text field."""


class TeacherLoadError(UserError):
    """The teacher model or its tokenizer cannot be loaded, or cannot be used by this backend."""
