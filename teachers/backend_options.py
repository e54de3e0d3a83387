"""Typed settings of each teacher backend (`--backend-option KEY=VALUE`), one options class per backend.

`TeacherConfig.backend_options` holds an instance of the class of its `backend` (`BACKEND_OPTIONS`); a dict
(from the command line, or a replayed `config.json`) is turned into it by `parse_backend_options`, which
refuses an unknown key or a value of the wrong type (checked against the class's annotations by
`common.config_types.check_types`) in one line. Backends receive the typed object, never
a dict, so an option meant for one backend cannot reach another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from common.config_types import check_types
from common.errors import ConfigError

ENTROPY_CHOICES = ("estimate", "absent")
HIDDEN_CHOICES = ("none", "hf")


@dataclass(kw_only=True, frozen=True)
class HFOptions:
    """Settings only the transformers backend has: none (its settings are `TeacherConfig` fields)."""

    kind: ClassVar[str] = "hf"


@dataclass(kw_only=True, frozen=True)
class VllmOptions:
    """Settings only the vLLM backend has."""

    kind: ClassVar[str] = "vllm"

    tensor_parallel_size: int = 1
    """GPUs one teacher is split over (vLLM tensor parallelism); use for teachers larger than one GPU."""
    gpu_memory_utilization: float = 0.85
    """Fraction of each GPU vLLM may take (weights + KV cache + the [tokens, V] prompt-logprob logits)."""
    entropy: str = "estimate"
    """`estimate` (lower bound from top-k plus tail, manifest `entropy_kind=estimate`) or `absent`."""
    hidden_from: str = "none"
    """`none` (no pooled states) or `hf` (pooled states from a second transformers pass)."""
    max_num_batched_tokens: int | None = None
    """vLLM scheduler token budget per step (None: vLLM's default); lower it if prompt logprobs run out of memory."""
    enforce_eager: bool = False
    """Disable CUDA graphs (slower, less memory, easier to debug)."""
    seed: int = 0
    """vLLM seed (only the discarded sampled token depends on it)."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.entropy not in ENTROPY_CHOICES:
            raise ConfigError(f"entropy is {self.entropy!r}, expected one of {', '.join(ENTROPY_CHOICES)}")
        if self.hidden_from not in HIDDEN_CHOICES:
            raise ConfigError(f"hidden_from is {self.hidden_from!r}, expected one of {', '.join(HIDDEN_CHOICES)}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens!r}")


BackendOptions = HFOptions | VllmOptions
BACKEND_OPTIONS: dict[str, type[HFOptions] | type[VllmOptions]] = {"hf": HFOptions, "vllm": VllmOptions}
"""The options class of each `--backend`."""


def _check_types(options: object) -> None:
    """Every field of a backend's options object checked against its annotation by the one config type
    checker (common/config_types.py); numbers are kept as the annotation declares them (1 -> 1.0)."""
    kind = getattr(type(options), "kind", "")
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}  # type: ignore[arg-type]
    for name, value in check_types(type(options), values, where=f"{kind} backend options").items():
        object.__setattr__(options, name, value)  # the options are frozen once checked


def options_help() -> str:
    """`hf: none; vllm: tensor_parallel_size=1, ...` (each key with its default), for `--backend-option`'s help."""
    parts = []
    for backend, cls in BACKEND_OPTIONS.items():
        keys = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        parts.append(f"{backend}: {keys or 'none'}")
    return "; ".join(parts)


def parse_backend_options(backend: str, given: Mapping[str, object] | None) -> BackendOptions:
    """The options object of `backend` from KEY=VALUE settings (values already parsed: numbers, booleans,
    strings); ConfigError naming an unknown key (and the known ones) or a value of the wrong type."""
    cls = BACKEND_OPTIONS[backend]
    given = dict(given or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown and not names:
        raise ConfigError(f"the {backend} backend takes no backend options, got {unknown}")
    if unknown:
        raise ConfigError(f"unknown {backend} backend option {unknown[0]!r}; known: {', '.join(names)}")
    return cls(**given)


def options_for(backend: str, value: BackendOptions | Mapping[str, object] | None) -> BackendOptions:
    """`TeacherConfig.backend_options` as the typed object of `backend`: a dict or None is parsed, an object
    of another backend's class is refused."""
    if value is None or isinstance(value, Mapping):
        return parse_backend_options(backend, value)
    if not isinstance(value, BACKEND_OPTIONS[backend]):
        raise ConfigError(f"backend_options are {type(value).__name__} ({value.kind} backend) but the backend is "
                          f"{backend!r}")
    return value
