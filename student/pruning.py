"""`init-student`: a student cut from a teacher by depth pruning (dropping whole decoder blocks).

    python cli.py init-student --from runs/teachers/smollm2 --keep-layers 0-5,24-29 --output students/s12
    python cli.py init-student --from "$SMOL" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --keep-layers 12 \
        --dataset data/corpus/train.jsonl --calibration-tokens 16384 --output students/s12-bi

`--keep-layers` is either an explicit list of blocks and ranges (`0-5,24-29`, `3,7-9`; 0-based, inclusive)
or a count N (a bare integer). With a count, the N blocks kept are the N with the highest **Block
Influence** (ShortGPT, Men et al. 2024): `BI_i = 1 - mean_tokens cos(x_i, y_i)`, where `x_i` is the
hidden state entering block i and `y_i` the one leaving it, averaged over every token of a calibration
slice of the corpus (packed exactly as `precompute` packs it). A block that barely turns its input has
low BI and is the cheapest to drop. It was chosen because it is cheap (one forward pass, no gradients,
no search over subsets), published with evidence that it ranks blocks well on decoder LMs, and needs
nothing but the hidden states. Its limit: it scores blocks one at a time, so it cannot see that two
blocks are jointly redundant.

The cut model keeps its config class, with `num_hidden_layers`, per-layer lists (`layer_types`, ...) and
each block's `layer_idx` renumbered, so it loads with `AutoModelForCausalLM` and runs with a KV cache.
The output directory holds the `save_pretrained` weights (float32), the tokenizer, and `init_student.json`
(the teacher, the blocks kept, every block's score when measured, parameter counts).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import click

from common.errors import ConfigError, UserError

log = logging.getLogger("student")

CARD = "init_student.json"


@dataclass(kw_only=True)
class InitStudentConfig:
    """Everything `run_init_student` needs."""

    teacher: str
    """Hub id, local model directory, or a directory holding `gguf_file`."""
    output: str
    """Directory to write the cut student into (save_pretrained + tokenizer + init_student.json)."""
    keep_layers: str
    """Blocks to keep: an explicit list/ranges ("0-5,24-29") or a count N (kept by Block Influence)."""
    gguf_file: str | None = None
    """GGUF file name inside `teacher` (weights de-quantised to float32 on load)."""
    revision: str | None = None
    """Hub revision of the teacher."""
    dataset: str | None = None
    """Calibration corpus (same forms as `precompute --dataset`); required when keep_layers is a count."""
    dataset_config: str | None = None
    """Hub dataset configuration (e.g. `en` for allenai/c4); hub datasets only."""
    split: str = "train"
    """Hub dataset split; hub datasets only."""
    text_field: str = "text"
    """Column holding the document text."""
    calibration_tokens: int = 16384
    """Tokens of the calibration slice (the first ones of the packed corpus)."""
    seq_len: int = 512
    """Calibration window length."""
    batch_size: int = 4
    """Calibration windows per forward pass."""
    trust_remote_code: bool = False
    """Passed to transformers when loading the teacher."""
    overwrite: bool = False
    """Replace an existing model directory at `output` (never the teacher, nor another kind of artifact)."""

    def __post_init__(self) -> None:
        for name in ("calibration_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.calibration_tokens < self.seq_len:
            raise ConfigError(f"--calibration-tokens ({self.calibration_tokens}) must be >= --seq-len ({self.seq_len})")
        spec = parse_keep_layers(self.keep_layers)
        if isinstance(spec, int) and self.dataset is None:
            raise ConfigError(f"--keep-layers {self.keep_layers} is a count: blocks are chosen by Block Influence "
                              "on a calibration slice, so --dataset is required")


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_keep_layers(spec: str) -> list[int] | int:
    """'0-5,24-29' -> [0..5, 24..29] (sorted, unique); '12' -> 12 (a count). ConfigError otherwise."""
    text = spec.replace(" ", "")
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 1:
            raise ConfigError(f"--keep-layers {spec!r}: a count must be >= 1")
        return n
    blocks: set[int] = set()
    for part in text.split(","):
        if not part:
            continue
        m = _RANGE.match(part)
        if m is None:
            raise ConfigError(f"--keep-layers {spec!r}: expected a count N or blocks/ranges like 0-5,24-29")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ConfigError(f"--keep-layers {spec!r}: range {part} is empty")
        blocks.update(range(lo, hi + 1))
    if not blocks:
        raise ConfigError(f"--keep-layers {spec!r} names no block")
    return sorted(blocks)


def decoder_blocks(model: Any) -> Any:
    """`model.model.layers` (an nn.ModuleList); ConfigError for any other layout."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no model.model.layers ModuleList; init-student prunes "
                          "decoder-only transformers laid out like Llama, Qwen2 or Gemma3")
    return layers


def block_influence(model: Any, windows: Any, *, batch_size: int) -> list[float]:
    """ShortGPT Block Influence of every block: 1 - cos(block input, block output), mean over all tokens.

    `windows` [S, L] int64 token windows. Returns one float per block, in block order. Inputs and outputs
    are captured with forward hooks (pre-hook on the hidden states going in, hook on those coming out), so
    the last block is scored before the final norm, like every other block.
    """
    import torch

    layers = decoder_blocks(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):
        def hook(_module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i: int):
        def hook(_module, _args, _kwargs, output):
            out = output[0] if isinstance(output, tuple) else output  # [B, L, H]
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).double(), out.double(), dim=-1)  # [B, L]
            sums[i] += (1.0 - cos).sum().cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                chunk = windows[start: start + batch_size]
                model.model(input_ids=chunk, use_cache=False)
                count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()


def choose_by_influence(scores: list[float], n: int) -> list[int]:
    """The `n` blocks with the highest scores, in block order (ties: the earlier block is kept)."""
    if not 1 <= n <= len(scores):
        raise ConfigError(f"--keep-layers {n}: the teacher has {len(scores)} blocks")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:n])


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


def calibration_windows(cfg: InitStudentConfig, tokenizer: Any) -> Any:
    """[S, seq_len] int64: the first calibration_tokens of the corpus, packed as `precompute` packs."""
    import numpy as np
    import torch

    from common.corpus import CorpusConfig, iter_documents
    from common.packing import pack_documents

    assert cfg.dataset is not None
    corpus = CorpusConfig(dataset=cfg.dataset, dataset_config=cfg.dataset_config, split=cfg.split,
                          text_field=cfg.text_field, max_tokens=cfg.calibration_tokens)
    batches = list(pack_documents(iter_documents(corpus), tokenizer, seq_len=cfg.seq_len,
                                  max_tokens=cfg.calibration_tokens))
    if not batches:
        raise ConfigError(f"{cfg.dataset} holds fewer than --seq-len {cfg.seq_len} tokens for calibration")
    return torch.from_numpy(np.concatenate([b.input_ids for b in batches]).astype(np.int64))


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
    }
    with open(os.path.join(cfg.output, CARD), "w") as f:
        json.dump(card, f, indent=2)
    return card


@click.command("init-student")
@click.option("--from", "teacher", required=True,
              help="Teacher to cut: a hub id, a local model directory, or a directory holding --gguf-file.")
@click.option("--gguf-file", default=None, help="GGUF file name inside --from (de-quantised to float32).")
@click.option("--revision", default=None, help="Hub revision of the teacher.")
@click.option("--keep-layers", required=True,
              help="Blocks to keep: explicit blocks/ranges, 0-based and inclusive (0-5,24-29), or a count N: the N "
                   "blocks of highest ShortGPT Block Influence (1 - cos between a block's input and output, "
                   "averaged over the calibration tokens; one forward pass, no gradients; drops the blocks that "
                   "change their input least).")
@click.option("--output", required=True, help="Directory for the student (save_pretrained + tokenizer + init_student.json).")
@click.option("--dataset", default=None,
              help="Calibration corpus, as precompute --dataset (needed for a count; with a list, scores are "
                   "recorded too).")
@click.option("--dataset-config", default=None, help="Hub dataset configuration (e.g. en for allenai/c4).")
@click.option("--split", default="train", show_default=True, help="Hub dataset split.")
@click.option("--text-field", default="text", show_default=True, help="Column holding the document text.")
@click.option("--calibration-tokens", type=int, default=16384, show_default=True,
              help="Tokens of the calibration slice (the first ones of the packed corpus).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Calibration window length.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Calibration windows per forward.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the hub.")
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace the model directory already at --output (never the teacher or another kind of output).")
def init_student_cmd(**kw) -> None:
    """Cut a student from a teacher by dropping decoder blocks (depth pruning).

    \b
    python cli.py init-student --from TEACHER --keep-layers 0-5,24-29 --output DIR
    python cli.py init-student --from TEACHER --keep-layers 12 --dataset data/corpus/train.jsonl --output DIR

    DIR loads with AutoModelForCausalLM and as train-student --student DIR.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    card = run_init_student(InitStudentConfig(**kw))
    scores = card["scores"]
    click.echo(f"kept {len(card['kept_blocks'])} of {card['teacher_blocks']} blocks {card['kept_blocks']}; "
               f"{card['parameters_student']:,} parameters (teacher {card['parameters_teacher']:,}) -> {kw['output']}")
    if scores is not None:
        click.echo("block influence: " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)))
