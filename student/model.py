"""The student: a transformers causal LM from a local directory, a hub id, a JSON config, or a preset.

    build_student("tiny", vocab_size=512, seq_len=128)          # preset (a small Llama), random init
    build_student("cfg.json", vocab_size=512, seq_len=128)      # {"model_type": "llama", ...}, random init
    build_student("runs/a/final", vocab_size=512, seq_len=128)  # save_pretrained dir (weights if present),
                                                                # e.g. one written by `init-student`
    build_student("HuggingFaceTB/SmolLM2-135M", ...)           # hub id: pretrained weights

The vocab must equal the teachers' vocab_size (the targets index it); a mismatch is refused.
`freeze(model, embeddings=..., lm_head=...)` stops gradients to the input embeddings and/or the output head.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError
from common.sidefile import read_side_json
from storage.errors import MismatchError

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
}
"""Llama-style presets (tied embeddings), sized by the teachers' vocab and seq_len."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""owner/name, as the hub spells model ids (checked only after presets, directories and files)."""


def is_hub_id(spec: str) -> bool:
    """`spec` is spelled as a hub model id (owner/name); the caller checks local paths first."""
    return bool(_HUB_ID.match(spec))


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def build_student(spec: str, *, vocab_size: int, seq_len: int, seed: int = 0,
                  special_ids: dict[str, int | None] | None = None) -> torch.nn.Module:
    """A float32 causal LM per `spec` (see the module docstring), initialised from `seed` if not loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    path = Path(spec)
    if spec in PRESETS:
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max(seq_len, 512),
                             tie_word_embeddings=True, **PRESETS[spec], **(special_ids or {}))
        model = AutoModelForCausalLM.from_config(config)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--student {spec}: directory has no config.json")
        if any((path / f).is_file() for f in WEIGHT_FILES):
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    elif path.is_file():
        try:
            d = read_side_json(str(path), label=f"--student {spec}", error=ConfigError)
        except OSError as e:  # vanished since is_file()
            raise ConfigError(f"--student {spec}: not a readable JSON config ({e})") from None
        if not isinstance(d, dict) or "model_type" not in d:
            raise ConfigError(f"--student {spec}: a JSON config needs a 'model_type' (e.g. \"llama\")")
        d = dict(d)
        try:
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"--student {spec}: {e}") from None
        model = AutoModelForCausalLM.from_config(config)
    elif is_hub_id(spec):
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--student {spec}: no such directory or file, and not loadable as a hub model "
                              f"({first})") from None
    else:
        raise ConfigError(f"--student {spec!r} is not a directory, a JSON config file, a hub id or a preset "
                          f"({', '.join(PRESETS)})")
    model = model.float()
    check_student(model, vocab_size=vocab_size, seq_len=seq_len, spec=spec)
    return model


def check_student(model: torch.nn.Module, *, vocab_size: int, seq_len: int, spec: str) -> None:
    """Refuse a student whose output width differs from the teachers' vocab or whose context is too short."""
    width = model.get_output_embeddings().weight.shape[0]
    if width != vocab_size:
        raise MismatchError(f"student {spec!r} and teachers differ in 'vocab_size': {width} vs {vocab_size}",
                            "vocab_size", (width, vocab_size))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max_pos < seq_len:
        raise ConfigError(f"student {spec!r} has max_position_embeddings {max_pos} < the caches' seq_len {seq_len}")


def freeze(model: torch.nn.Module, *, embeddings: bool, lm_head: bool) -> list[str]:
    """Stop gradients to the input embeddings and/or the output head; returns the frozen parameter names.

    With tied embeddings the two are one tensor, so freezing either freezes both (logged as a warning):
    a tied head cannot train while the embedding stays fixed.
    """
    targets = []
    if embeddings:
        targets.append(model.get_input_embeddings())
    if lm_head:
        targets.append(model.get_output_embeddings())
    frozen = {id(p) for module in targets for p in module.parameters()}
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    if tied and embeddings != lm_head:
        logging.getLogger("student").warning(
            "the student ties its input embeddings and output head: freezing %s freezes both",
            "the embeddings" if embeddings else "the output head")
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in frozen:
            p.requires_grad_(False)
            names.append(name)
    return names


def hidden_width(model: torch.nn.Module) -> int:
    """Hidden size of the student's pooled states."""
    return int(model.get_input_embeddings().weight.shape[1])


def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (for FSDP wrapping); empty if the architecture hides them."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def save_student(model: torch.nn.Module, out: str, tokenizer: Any | None) -> None:
    """save_pretrained the student (and the tokenizer, if given: a loaded tokenizer or its path) so
    AutoModelForCausalLM and AutoTokenizer load `out`."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    if isinstance(tokenizer, str):
        from common.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
