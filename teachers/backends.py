"""The teacher backend interface and the factory that picks one (`--backend hf|vllm`).

A backend module (`teachers/hf_backend.py`, `teachers/vllm_backend.py`) exposes
`create_backend(cfg: TeacherConfig, *, seq_len: int) -> TeacherBackend`. The vllm module is imported only when asked for,
so the package works without vllm installed.

Pooled layer convention (every backend, and the student side, must use the same one): pooled layer i is
the mean over a sequence's L tokens of transformers' `output_hidden_states[i + 1]`, i.e. the output of
decoder block i (0-based); for the last block that is the output *after* the final norm (what the
lm_head consumes), as transformers reports it. Negative indices count from the end (-1 = last block) and
are resolved to non-negative ones before they reach the manifest.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from common.packing import PackedBatch
from storage.manifest import TeacherInfo
from storage.records import TeacherTargets
from teachers.config import TeacherConfig
from teachers.errors import TeacherLoadError


@runtime_checkable
class TeacherBackend(Protocol):
    """Computes `TeacherTargets` for packed sequences."""

    vocab_size: int
    """Width of the teacher's output distribution (rows of its output embedding)."""
    entropy_kind: str
    """`exact`, `estimate` or `absent` (see storage.manifest.ENTROPY_KINDS)."""
    observed_logprob: bool
    """The plain (not aligned) targets carry `observed_logprob`, log p(next token) (manifest field of that name;
    True for the hf and vllm backends)."""
    pooled_dims: dict[int, int]
    """Resolved (non-negative) pooled layer -> hidden size; empty when no states are pooled."""
    notes: dict[str, Any]
    """Facts for the manifest notes (versions, caveats: what the backend cannot give and why)."""

    def info(self) -> TeacherInfo:
        """Identity of the teacher for the manifest."""
        ...

    def compute(self, batch: PackedBatch) -> TeacherTargets:
        """Targets for `batch` (top-k log-probs as float32; the caller casts for storage)."""
        ...


def create_backend(cfg: TeacherConfig, *, seq_len: int) -> TeacherBackend:
    """Load the backend named by `cfg.backend` (raises TeacherLoadError when it is unavailable)."""
    module_name = {"hf": "teachers.hf_backend", "vllm": "teachers.vllm_backend"}[cfg.backend]
    try:
        module = importlib.import_module(module_name)
        return module.create_backend(cfg, seq_len=seq_len)
    except ModuleNotFoundError as e:  # the backend module, or the package it wraps (imported lazily)
        missing = e.name or ""
        if missing == module_name or missing == "vllm" or missing.startswith("vllm."):
            raise TeacherLoadError(
                f"backend {cfg.backend!r} is unavailable ({missing} is not installed); "
                "install the extra with `pip install 'multidistill[vllm]'` or use --backend hf"
            ) from None
        raise


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Map possibly negative layer indices onto 0..num_layers-1 (sorted); ConfigError when out of range."""
    from common.errors import ConfigError

    resolved = []
    for layer in layers:
        r = layer + num_layers if layer < 0 else layer
        if not 0 <= r < num_layers:
            raise ConfigError(f"pool layer {layer} is out of range for a teacher with {num_layers} layers")
        resolved.append(r)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"pool layers {layers} name the same layer twice")
    return sorted(resolved)
