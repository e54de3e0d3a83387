"""How many positions a model was trained on, and the check that a window fits them.

Shared by `precompute` (the teacher's window) and `evaluate` (every model's window): a causal LM with rotary
or ALiBi positions runs on any length without complaint, but its outputs past the trained positions are not
the teacher's distribution, so a window longer than them is refused before any work.
"""

from __future__ import annotations

from typing import Any

from common.errors import ConfigError

POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")
"""transformers config attributes holding a model's trained positions, first match wins (GPT-2 style configs
name it `n_positions`)."""


def max_positions(config: Any) -> int | None:
    """The positions a model's transformers `config` declares (its text config for multimodal models), or None
    when it declares none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in POSITION_ATTRIBUTES:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(max_pos: dict[str, int], seq_len: int) -> None:
    """ConfigError naming the first model (label -> its positions) with fewer positions than `seq_len`."""
    for label, n in max_pos.items():
        if n < seq_len:
            raise ConfigError(f"{label} has max_position_embeddings {n} < seq_len {seq_len}; lower --seq-len")
