"""Errors caused by user input or user data (never AssertionError); the CLI prints them as one line.

Storage-specific errors (a shard, a manifest, two caches that disagree) derive from these in
`storage/errors.py`; stage one adds `TeacherLoadError` in `teachers/errors.py`.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by user input or user data; the CLI prints its message as one line
    and exits with code 2 instead of showing a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid (raised from config dataclasses' __post_init__)."""


class CorpusError(UserError):
    """The corpus cannot be read: a missing file, an empty corpus, a missing or non-text field."""


class LoadError(UserError):
    """A model or tokenizer cannot be loaded, or cannot be used as asked."""
