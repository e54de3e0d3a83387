"""Where `evaluate` gets its sequences and teacher targets, and how it loads models (one at a time).

Held-out sequences come from text (`--dataset`, packed with the student's tokenizer exactly as `precompute`
packs) or from teacher caches (`--teacher-data`, opened and cross-checked by training's `join_teachers`:
fingerprints, sequence ids, temperature, an input_ids spot check, and the weighting scheme's
`check_caches`; every batch's input_ids are compared again, as training's loader does).

Teacher targets reach the metrics in one form, a `TeacherView` per teacher and batch (its sparse ids and
log-probs, entropy, target mask, log p(o)), fused by training's `student.targets.fuse` into the same
`FusedTargets`. A cache's view is built by training's own path (`student.targets.cache_views`). A live teacher
is scored alone first, and its view is what `precompute` would store: its top-k log-probs, its exact entropy
and its exact log p(o) per position (`TeacherRecord`), kept
on the host until the students are scored. So only one model is ever resident: three 7B teachers in bf16 need
the memory of one.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError, UserError
from storage.errors import MismatchError
from student.data import join_teachers, loss_mask_column
from student.model import is_hub_id
from student.observed import observed_logprobs
from student.targets import TeacherView, cache_columns, cache_views
from student.weighting import Weighting


# ---- model specs and loading ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model to score: its label, directory or hub id, and the GGUF file inside it (if any)."""

    label: str
    path: str
    gguf_file: str | None = None


def split_label(spec: str) -> tuple[str, str]:
    """`LABEL=PATH` -> (LABEL, PATH); a bare PATH is labelled by its last component (without .gguf)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        return label, path
    return Path(spec.rstrip("/")).name.removesuffix(".gguf"), spec


def model_specs(specs: Sequence[str], gguf_files: Sequence[str] = ()) -> list[ModelSpec]:
    """`--student`/`--teacher` values plus `--gguf-file LABEL=FILE` (or a bare FILE with one model).

    `DIR/FILE.gguf` is the older spelling of `DIR --gguf-file FILE` and is still accepted."""
    out = []
    for s in specs:
        label, path = split_label(s)
        p = Path(path)
        out.append(ModelSpec(label, str(p.parent), p.name) if p.suffix == ".gguf" else ModelSpec(label, path))
    by_label = {m.label: i for i, m in enumerate(out)}
    for g in gguf_files:
        if "=" in g:
            label, name = g.split("=", 1)
        elif len(out) == 1:
            label, name = out[0].label, g
        else:
            raise ConfigError(f"--gguf-file {g}: with several --teacher give it as LABEL=FILE "
                              f"(labels: {', '.join(by_label)})")
        if label not in by_label:
            raise ConfigError(f"--gguf-file {g}: no --teacher labelled {label!r} (labels: {', '.join(by_label)})")
        m = out[by_label[label]]
        if m.gguf_file is not None:
            raise ConfigError(f"teacher {label!r} has two GGUF files ({m.gguf_file}, {name}); give one")
        out[by_label[label]] = ModelSpec(label, m.path, name)
    return out


def _check_exists(spec: ModelSpec) -> None:
    if not Path(spec.path).exists() and not is_hub_id(spec.path):
        raise ConfigError(f"model path {spec.path} does not exist")


def model_config(spec: ModelSpec) -> Any:
    """The model's transformers config (no weights read), for checks before anything loads."""
    from transformers import AutoConfig

    _check_exists(spec)
    try:
        return AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model config of {spec.label} ({spec.path}): "
                        f"{str(e).splitlines()[0]}") from None


def _from_pretrained(spec: ModelSpec, dtype: torch.dtype) -> Any:
    """The one place `evaluate` reads model weights (GGUF files are dequantised to `dtype`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=dtype)


def load_model(spec: ModelSpec, device: str, dtype: torch.dtype) -> Any:
    """A causal LM in eval mode on `device` in `dtype`. Callers hold it in a function's locals and call
    `release()` after, so that the next model loads into freed memory."""
    _check_exists(spec)
    try:
        model = _from_pretrained(spec, dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {spec.path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def release() -> None:
    """Free the last model's memory (host and GPU) before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from {spec.path} ({str(e).splitlines()[0]}); pass --tokenizer DIR"
        ) from None


def vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


# ---- teacher targets -----------------------------------------------------------------------------
@dataclass
class TeacherRecord:
    """What a live teacher's pass keeps for the students' pass: its view at every held-out position."""

    label: str
    topk_ids: list[torch.Tensor] = field(default_factory=list)
    """Per batch [n, k] int32."""
    topk_logprobs: list[torch.Tensor] = field(default_factory=list)
    """Per batch [n, k] float32."""
    entropy: list[torch.Tensor] = field(default_factory=list)
    """Per batch [n] float32, exact (from the full distribution)."""
    observed: list[torch.Tensor] = field(default_factory=list)
    """Per batch [n] float32 exact log p(o) of the observed next token (NaN at each window's last position)."""

    def add(self, logits: torch.Tensor, top_k: int, input_ids: torch.Tensor) -> None:
        """Keep the top-k log-probs, the exact entropy and log p(o) of a batch's logits [B, L, V] (float32) for
        its windows input_ids [B, L]."""
        b, seq_len, vocab = logits.shape
        logp = torch.log_softmax(logits.reshape(-1, vocab), dim=-1)  # [n, V]
        top = logp.topk(min(top_k, vocab), dim=-1)
        self.topk_ids.append(top.indices.to(torch.int32).cpu())
        self.topk_logprobs.append(top.values.cpu())
        self.entropy.append(-(logp.exp() * logp).sum(dim=-1).cpu())
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1, 1).to(logp.device).long()
        obs = logp.gather(1, nxt).reshape(b, seq_len).clone()
        obs[:, -1] = float("nan")
        self.observed.append(obs.reshape(-1).cpu())

    def view(self, batch: int) -> TeacherView:
        obs = self.observed[batch]
        source = torch.where(torch.isnan(obs), -1, 0).to(torch.int8)  # every known log p(o) is exact
        return TeacherView(self.topk_ids[batch], self.topk_logprobs[batch], self.entropy[batch],
                           observed=obs, observed_source=source)


# ---- held-out sequences --------------------------------------------------------------------------
@dataclass
class HeldOut:
    """The held-out windows, in batches of `batch_size`; from packed text or from joined caches."""

    seq_len: int
    n_windows: int
    batch_size: int
    windows: torch.Tensor | None = None
    """[S, L] int64 packed text windows (text source)."""
    caches: list[Any] = field(default_factory=list)
    """Joined `TeacherDataset`s (cache source)."""
    cache_paths: list[str] = field(default_factory=list)
    mask_column: str | None = None
    """Caches of conversations: their loss-mask column (every figure averages over its positions only)."""
    masks: torch.Tensor | None = None
    """[S, L] bool loss masks of packed conversations (text source, `--corpus-format chat`)."""

    @property
    def masked(self) -> bool:
        """Conversations: every figure averages over the loss mask's positions only."""
        return self.mask_column is not None or self.masks is not None

    def loss_mask(self, lo: int) -> torch.Tensor | None:
        """[b, L] bool loss mask of the batch starting at `lo` (conversations), or None (every position)."""
        hi = min(self.n_windows, lo + self.batch_size)
        if self.masks is not None:
            return self.masks[lo:hi]
        if self.mask_column is None:
            return None
        return torch.from_numpy(self.caches[0].read_columns(list(range(lo, hi)), [self.mask_column])[self.mask_column] != 0)

    @property
    def temperature(self) -> float:
        return self.caches[0].manifest.temperature if self.caches else 1.0

    def batches(self) -> range:
        return range(0, self.n_windows, self.batch_size)

    def rows(self, rows: Sequence[int]) -> torch.Tensor:
        """[len(rows), L] int64 input ids of the given windows."""
        if self.windows is not None:
            return self.windows[list(rows)]
        ids = self.caches[0].read_columns(list(rows), ["input_ids"])["input_ids"]
        return torch.from_numpy(ids.astype(np.int64))

    def ids(self, lo: int) -> torch.Tensor:
        """The windows [b, L] int64 starting at `lo` (no teacher columns read)."""
        hi = min(self.n_windows, lo + self.batch_size)
        return self.windows[lo:hi] if not self.caches else self.rows(range(lo, hi))

    def batch(self, lo: int, weighting: Weighting, observed_correction: bool = True
              ) -> tuple[torch.Tensor, list[TeacherView]]:
        """The windows [b, L] int64 starting at `lo`, and the caches' views of them (none for text), built by
        training's targets path (student/targets.py): the same columns, observed-token correction and log p(o)."""
        hi = min(self.n_windows, lo + self.batch_size)
        if not self.caches:
            return self.windows[lo:hi], []
        cols = [ds.read_columns(list(range(lo, hi)), cache_columns(ds.manifest, weighting,
                                                                   observed_correction=observed_correction))
                for ds in self.caches]
        for path, c in zip(self.cache_paths[1:], cols[1:], strict=True):
            if (c["input_ids"] != cols[0]["input_ids"]).any():
                raise MismatchError(f"{path} holds other tokens than {self.cache_paths[0]}", "input_ids", (lo, hi))
        ids = torch.from_numpy(cols[0]["input_ids"].astype(np.int64))
        views = cache_views(cols, [ds.manifest for ds in self.caches], weighting,
                            observed_correction=observed_correction)
        return ids, views

    def observed_nll(self) -> dict[str, dict[str, float | None]]:
        """Per aligned cache (by teacher name): its teacher's perplexity over the positions where its log-prob of
        the observed next token is exact (`observed_logprob`; None when there is none), and how many positions
        those are."""
        out = {}
        for ds in self.caches:
            if not ds.manifest.aligned:
                continue
            nll, count = 0.0, 0
            positions = 0
            for lo in self.batches():
                hi = min(self.n_windows, lo + self.batch_size)
                obs = observed_logprobs(ds.read_columns(list(range(lo, hi)), ["observed_logprob"])["observed_logprob"])
                use = ~torch.isnan(obs)
                mask = self.loss_mask(lo)
                if mask is not None:  # conversations: the assistant positions only
                    use &= mask.reshape(-1)
                    positions += int(mask[:, :-1].sum())
                nll -= float(obs[use].double().sum())
                count += int(use.sum())
            out[ds.manifest.teacher.name] = {
                "perplexity_observed": math.exp(nll / count) if count else None,
                "observed_positions": count,
                "positions": positions if self.mask_column else self.n_windows * (self.seq_len - 1),
            }
        return out


def open_caches(paths: Sequence[str], weighting: Weighting, verify: str, max_tokens: int | None,
                batch_size: int) -> HeldOut:
    """Held-out windows from teacher caches, joined and checked exactly as training joins them."""
    caches = join_teachers(paths, verify=verify)
    weighting.check_caches(caches)
    m = caches[0].manifest
    n = len(caches[0]) if max_tokens is None else min(len(caches[0]), max_tokens // m.seq_len)
    if n < 1:
        raise UserError(f"max_tokens={max_tokens} is less than one window of {m.seq_len} tokens")
    return HeldOut(seq_len=m.seq_len, n_windows=n, batch_size=batch_size, caches=caches, cache_paths=list(paths),
                   mask_column=loss_mask_column(m))


def pack_text(corpus: Any, tokenizer: Any, seq_len: int, batch_size: int) -> HeldOut:
    """Held-out windows of text (`common.corpus.CorpusConfig`), packed as `precompute` packs; conversations
    (`corpus_format` chat) with their loss masks, rendered with the tokenizer's template (or the corpus')."""
    from common.corpus import iter_documents

    if corpus.chat:
        from common.chat import ChatPackStats, pack_conversations, resolve_template

        stats = ChatPackStats()
        packed = list(pack_conversations(iter_documents(corpus), tokenizer, seq_len=seq_len,
                                         template=resolve_template(tokenizer, corpus.chat_template),
                                         truncate=corpus.truncate_conversations, max_tokens=corpus.max_tokens,
                                         stats=stats))
        if stats.too_long:
            import click

            click.echo(f"evaluate: {stats.too_long} of {stats.documents} conversations are longer than seq_len="
                       f"{seq_len} and are left out", err=True)
    else:
        from common.packing import pack_documents

        packed = list(pack_documents(iter_documents(corpus), tokenizer, seq_len=seq_len, max_tokens=corpus.max_tokens))
    if not packed:
        raise UserError(f"{corpus.dataset} holds fewer than seq_len={seq_len} tokens; lower --seq-len")
    windows = torch.from_numpy(np.concatenate([b.input_ids for b in packed]).astype(np.int64))
    masks = None if packed[0].loss_mask is None else torch.from_numpy(
        np.concatenate([b.loss_mask for b in packed]) != 0)
    return HeldOut(seq_len=seq_len, n_windows=windows.shape[0], batch_size=batch_size, windows=windows, masks=masks)
