"""Depth pruning: `run_init_student(cfg)` cuts a student from a teacher by dropping whole decoder blocks.

    python cli.py init-student --from runs/teachers/smollm2 --keep-layers 0-5,24-29 --output students/s12
    python cli.py init-student --from "$SMOL" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --keep-layers 12 \
        --dataset data/corpus/train.jsonl --calibration-tokens 16384 --output students/s12-bi

`--keep-layers` is either an explicit list of blocks and ranges (`0-5,24-29`, `3,7-9`; 0-based, inclusive)
or a count N (a bare integer): then the N blocks with the highest Block Influence are kept
(student/block_influence.py). The config is `student.config.InitStudentConfig`, the command
`student/commands.py`.

The cut model keeps its config class, with `num_hidden_layers`, per-layer lists (`layer_types`, ...) and
each block's `layer_idx` renumbered, so it loads with `AutoModelForCausalLM` and runs with a KV cache.
The output directory holds the `save_pretrained` weights (float32), the tokenizer, and `init_student.json`
(the teacher, the blocks kept, every block's score when measured, parameter counts, and under `config` the
InitStudentConfig it was made with: `init-student --config DIR/init_student.json` replays it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from common.errors import ConfigError, UserError
from student.block_influence import block_influence, calibration_windows, choose_by_influence, decoder_blocks
from student.config import InitStudentConfig, parse_keep_layers

log = logging.getLogger("student")

CARD = "init_student.json"
"""The card `run_init_student` writes into the student's directory."""
CARD_CONFIG = "config"
"""The card's member holding the InitStudentConfig (`init-student --config DIR/init_student.json`)."""

__all__ = ["CARD", "CARD_CONFIG", "count_parameters", "prune_blocks", "run_init_student"]


def prune_blocks(model: Any, keep: list[int]) -> Any:
    """Keep only blocks `keep` (in that order) of `model`, in place; renumber everything per-layer.

    Sets `config.num_hidden_layers`, slices every config list that has one entry per block (`layer_types`
    and the like), and renumbers each kept block's modules' `layer_idx` (the KV-cache slot they use).
    Returns `model`.
    """
    import torch

    layers = decoder_blocks(model)
    n = len(layers)
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--keep-layers names blocks {bad} but the teacher has {n} (0..{n - 1})")
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    for cfg in configs:
        for name, value in list(vars(cfg).items()):
            if isinstance(value, (list, tuple)) and len(value) == n and name != "architectures":
                setattr(cfg, name, type(value)(value[i] for i in keep))
                log.info("config.%s sliced to the kept blocks", name)
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(keep)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for j, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    return model


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _load_teacher(cfg: InitStudentConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(revision=cfg.revision, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.teacher, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load teacher {cfg.teacher!r}: {first}") from None
    return model.eval()


def _plain_copy(model: Any) -> Any:
    """A model loaded from GGUF is flagged as quantised and refuses save_pretrained: copy it into a plain one."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if not hasattr(model.config, "quantization_config"):
        return model
    config = copy.deepcopy(model.config)
    delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def check_output_dir(cfg: InitStudentConfig) -> None:
    """The output rule (storage/artifacts.py), before the teacher loads: a new or empty directory, or an
    existing model directory with --overwrite; never the teacher, its calibration corpus, or any other kind."""
    from storage.artifacts import Input, Kind, check_output, existing_paths

    inputs = [Input("--from", p) for p in existing_paths([cfg.teacher])]
    inputs += [Input("--dataset", p) for p in existing_paths((cfg.dataset or "").split(","))]
    check_output(cfg.output, command="init-student", writes=Kind.MODEL, inputs=inputs, replace_flag="--overwrite",
                 replace=cfg.overwrite)


def run_init_student(cfg: InitStudentConfig) -> dict[str, Any]:
    """Load the teacher, choose and keep blocks, save the student; returns the card written to init_student.json."""
    import os

    from common.tokenizer import load_tokenizer

    spec = parse_keep_layers(cfg.keep_layers)
    check_output_dir(cfg)
    model = _load_teacher(cfg)
    layers = decoder_blocks(model)
    n = len(layers)
    tokenizer = load_tokenizer(cfg.teacher, gguf_file=cfg.gguf_file, revision=cfg.revision,
                               trust_remote_code=cfg.trust_remote_code)
    params_before = count_parameters(model)
    scores = None
    windows = 0
    if cfg.dataset is not None:
        batch = calibration_windows(cfg, tokenizer)
        windows = int(batch.shape[0])
        scores = block_influence(model, batch, batch_size=cfg.batch_size)
    keep = choose_by_influence(scores, spec) if isinstance(spec, int) else spec
    prune_blocks(model, keep)
    model = _plain_copy(model)
    os.makedirs(cfg.output, exist_ok=True)
    model.save_pretrained(cfg.output)
    tokenizer.save_pretrained(cfg.output)
    card = {
        "teacher": cfg.teacher, "gguf_file": cfg.gguf_file, "revision": cfg.revision,
        "keep_layers": cfg.keep_layers, "teacher_blocks": n, "kept_blocks": keep,
        "dropped_blocks": [i for i in range(n) if i not in keep],
        "score": "block_influence (ShortGPT): 1 - mean cos(block input, block output)" if scores else None,
        "scores": scores,
        "calibration": ({"dataset": cfg.dataset, "tokens": windows * cfg.seq_len, "seq_len": cfg.seq_len}
                        if scores else None),
        "parameters_teacher": params_before, "parameters_student": count_parameters(model),
        CARD_CONFIG: dataclasses.asdict(cfg),
    }
    with open(os.path.join(cfg.output, CARD), "w") as f:
        json.dump(card, f, indent=2)
    return card
