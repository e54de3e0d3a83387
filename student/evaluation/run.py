"""`run_evaluate`: score the teachers one after another, then each student against their fused target.

Every check that needs no weights runs first (tokenizers, model configs, window length, output file), so a
mistake fails before anything loads. Then one model at a time is loaded, scored over all held-out batches,
and released: live teachers keep their top-k + exact entropy per position (`sources.TeacherRecord`), students
are scored against the fused target built from the caches and those records (the caches' teachers first).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import torch

from common.errors import ConfigError
from common.positions import check_positions, max_positions
from storage.errors import MismatchError
from student.evaluation.config import DEFAULT_SEQ_LEN, EvalConfig
from student.evaluation.metrics import (
    Scores,
    bleu_scores,
    compare_students,
    decode_until_eos,
    greedy_continuations,
)
from student.evaluation.report import REPORT_CONFIG, check_output_file, model_summary, write_json
from student.evaluation.sources import (
    HeldOut,
    ModelSpec,
    TeacherRecord,
    load_model,
    load_tokenizer,
    model_config,
    model_specs,
    open_caches,
    pack_text,
    release,
    vocab_size,
)
from student.targets import OBSERVED_SOURCES, fuse, observed_counts, valid_mask, with_loss_mask


def check_report_output(cfg: EvalConfig, students: list[ModelSpec], teachers: list[ModelSpec]) -> None:
    """The output rule (storage/artifacts.py) for the JSON report, before anything loads: a new file, or an
    existing report with --overwrite; never a model, cache, corpus or other input, nor a path inside one."""
    from storage.artifacts import Input, Kind, check_output, existing_paths

    assert cfg.output is not None
    inputs = [Input(flag, p) for flag, models in (("--student", students), ("--teacher", teachers))
              for m in models for p in existing_paths([m.path])]
    inputs += [Input("--teacher-data", p) for p in existing_paths(cfg.teacher_data)]
    inputs += [Input("--dataset", p) for p in existing_paths((cfg.data or "").split(","))]
    inputs += [Input("--tokenizer", p) for p in existing_paths([cfg.tokenizer])]
    check_output(cfg.output, command="evaluate", writes=Kind.REPORT, inputs=inputs, replace_flag="--overwrite",
                 replace=cfg.overwrite)


def _window_length(cfg: EvalConfig, max_pos: dict[str, int]) -> int:
    """--seq-len, or DEFAULT_SEQ_LEN lowered to the smallest max_position_embeddings (said on stderr)."""
    if cfg.seq_len is not None:
        return cfg.seq_len
    limit = min(max_pos.values(), default=DEFAULT_SEQ_LEN)
    if limit < DEFAULT_SEQ_LEN:
        click.echo(f"evaluate: windows of {limit} tokens (the smallest max_position_embeddings of the models; "
                   f"--seq-len sets it)", err=True)
    return min(limit, DEFAULT_SEQ_LEN)


def _held_out(cfg: EvalConfig, tokenizer: Any, fingerprint: str, max_pos: dict[str, int]) -> HeldOut:
    from common.corpus import CorpusConfig

    if not cfg.teacher_data:
        seq_len = _window_length(cfg, max_pos)
        check_positions(max_pos, seq_len)
        corpus = CorpusConfig(dataset=cfg.data, dataset_config=cfg.dataset_config, split=cfg.split,
                              revision=cfg.dataset_revision, text_field=cfg.text_field, max_tokens=cfg.max_tokens,
                              corpus_format=cfg.corpus_format, messages_field=cfg.messages_field,
                              chat_template=cfg.chat_template)
        return pack_text(corpus, tokenizer, seq_len, cfg.batch_size)
    held = open_caches(cfg.teacher_data, cfg.weighting(), cfg.verify, cfg.max_tokens, cfg.batch_size)
    m = held.caches[0].manifest
    if cfg.seq_len is not None and cfg.seq_len != m.seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} differs from the caches' seq_len {m.seq_len}; "
                          "leave it out with --teacher-data (the caches' windows are evaluated)")
    if m.tokenizer_fingerprint != fingerprint:
        raise MismatchError(f"the student's tokenizer differs from the one {cfg.teacher_data[0]} was computed with",
                            "tokenizer_fingerprint", (fingerprint, m.tokenizer_fingerprint))
    check_positions(max_pos, m.seq_len)
    return held


def _check_vocab(tokenizer: Any, configs: dict[str, Any], what: str) -> None:
    """ConfigError when the tokenizer has more tokens than a model's vocab: its ids would index past that
    model's embeddings (an IndexError deep in the forward pass, after other models were scored)."""
    n = len(tokenizer)
    for label, config in configs.items():
        v = getattr(config, "vocab_size", None)
        if isinstance(v, int) and n > v:
            raise ConfigError(f"{what} has {n} tokens, more than {label}'s vocab of {v}; use the tokenizer the "
                              "models were trained with (--tokenizer)")


@dataclass
class _Pass:
    """What every model's pass shares."""

    device: str
    dtype: torch.dtype
    vocab: _Vocab
    tokenizer: Any
    prompts: torch.Tensor | None
    """[n, prompt_tokens] int64 BLEU prompts on `device`, or None."""
    teacher_names: list[str]
    scores: dict[str, Scores]
    texts: dict[str, list[str]] = field(default_factory=dict)
    """Greedy continuations of the prompts, per model."""
    observed_sources: dict[str, dict[str, int]] | None = None
    """Per teacher, the positions whose log p(o) (observed-token weightings) was exact, listed or bounded."""


class _Vocab:
    """The vocab size every model must share (the caches' when given), checked as each model loads."""

    def __init__(self, held: HeldOut) -> None:
        self.size = held.caches[0].manifest.vocab_size if held.caches else None
        self.first = "the caches" if held.caches else None

    def check(self, label: str, model: Any) -> None:
        v = vocab_size(model)
        if self.size is None:
            self.size, self.first = v, label
        elif v != self.size:
            raise MismatchError(f"models disagree on the vocab size: {self.first} {self.size}, {label} {v}",
                                "vocab_size", (self.size, v))


def _continuations(model: Any, prompts: torch.Tensor | None, new_tokens: int, tokenizer: Any) -> list[str]:
    if prompts is None:
        return []
    out = greedy_continuations(model, prompts, new_tokens).cpu()
    return [decode_until_eos(tokenizer, r.tolist(), tokenizer.eos_token_id) for r in out]


def _score_teacher(spec: ModelSpec, held: HeldOut, cfg: EvalConfig, run: _Pass) -> TeacherRecord:
    """One live teacher's pass: its NLL, its record for the students' pass, its continuations."""
    from tqdm import tqdm

    model = load_model(spec, run.device, run.dtype)
    run.vocab.check(spec.label, model)
    record, scores = TeacherRecord(spec.label), run.scores[spec.label]
    with torch.no_grad(), tqdm(total=held.n_windows * held.seq_len, unit="tok", desc=spec.label) as bar:
        for lo in held.batches():
            ids = held.ids(lo).to(run.device)
            logits = model(input_ids=ids).logits.float()  # [B, L, V]
            mask = held.loss_mask(lo)
            scores.add_nll(logits, ids, None if mask is None else mask.to(run.device))
            record.add(logits, cfg.top_k, ids)
            bar.update(ids.numel())
    run.texts[spec.label] = _continuations(model, run.prompts, cfg.new_tokens, run.tokenizer)
    return record


def _score_student(spec: ModelSpec, held: HeldOut, records: list[TeacherRecord], cfg: EvalConfig,
                   run: _Pass) -> None:
    """One student's pass: NLL, and against the fused target (records or caches) KL and agreement."""
    from tqdm import tqdm

    model = load_model(spec, run.device, run.dtype)
    run.vocab.check(spec.label, model)
    scores = run.scores[spec.label]
    weighting = cfg.weighting()
    counts = None
    with torch.no_grad(), tqdm(total=held.n_windows * held.seq_len, unit="tok", desc=spec.label) as bar:
        for i, lo in enumerate(held.batches()):
            ids, views = held.batch(lo, weighting, cfg.observed_correction)
            views = views + [r.view(i) for r in records]  # the caches' teachers first, then the live ones
            ids = ids.to(run.device)
            logits = model(input_ids=ids).logits.float()  # [B, L, V]
            mask = held.loss_mask(lo)
            mask = None if mask is None else mask.to(run.device)  # [B, L] bool: conversations' assistant positions
            scores.add_nll(logits, ids, mask)
            if views:
                views = [v.to(run.device) for v in views]
                if mask is not None:
                    views = with_loss_mask(views, mask.reshape(-1))
                batch_counts = observed_counts(views)  # [K, 3] or None, over the loss mask's positions
                if batch_counts is not None:
                    counts = batch_counts if counts is None else counts + batch_counts
                fused = fuse(views, weighting, held.seq_len)
                scores.add_targets(logits, ids, fused, valid_mask(views), run.teacher_names, held.temperature,
                                   masked=mask is not None)
            bar.update(ids.numel())
    if counts is not None:
        run.observed_sources = {name: dict(zip(OBSERVED_SOURCES, row.tolist(), strict=True))
                                for name, row in zip(run.teacher_names, counts, strict=True)}
    run.texts[spec.label] = _continuations(model, run.prompts, cfg.new_tokens, run.tokenizer)


def run_evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every student (and the teacher models, when given); returns the JSON-able results."""
    from common.devices import resolve_device, resolve_dtype
    from common.tokenizer import tokenizer_fingerprint

    device = resolve_device(cfg.device)
    dtype = getattr(torch, resolve_dtype(cfg.dtype, device))
    students, teachers = model_specs(cfg.students), model_specs(cfg.teachers, cfg.gguf_files)
    if cfg.output:
        check_report_output(cfg, students, teachers)
        check_output_file(cfg.output)
    labels = [m.label for m in (*students, *teachers)]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"two models share a label ({', '.join(labels)}); name them with LABEL=PATH")
    tokenizer = load_tokenizer(model_specs([cfg.tokenizer])[0] if cfg.tokenizer else students[0])
    fingerprint = tokenizer_fingerprint(tokenizer)
    for t in teachers:  # before any weights load
        fp = tokenizer_fingerprint(load_tokenizer(t))
        if fp != fingerprint:
            raise MismatchError(f"teacher {t.label} ({t.path}) uses a different tokenizer than the student",
                                "tokenizer_fingerprint", (fingerprint, fp))
    configs = {m.label: model_config(m) for m in (*students, *teachers)}
    _check_vocab(tokenizer, configs, f"--tokenizer {cfg.tokenizer}" if cfg.tokenizer else
                 f"the tokenizer of {students[0].label}")
    max_pos = {label: n for label, c in configs.items() if (n := max_positions(c)) is not None}
    held = _held_out(cfg, tokenizer, fingerprint, max_pos)

    n_prompts = min(cfg.bleu_prompts, held.n_windows) if cfg.prompt_tokens + cfg.new_tokens <= held.seq_len else 0
    if cfg.bleu_prompts and not n_prompts:
        raise ConfigError(f"prompt_tokens + new_tokens must fit in a window of {held.seq_len} tokens")
    prompts, truth = None, []
    if n_prompts:  # evenly spaced held-out windows: their start is the prompt, the rest the reference
        rows = [round(i * (held.n_windows - 1) / max(1, n_prompts - 1)) for i in range(n_prompts)]
        win = held.rows(rows)
        prompts = win[:, : cfg.prompt_tokens].to(device)
        truth = [decode_until_eos(tokenizer, r.tolist(), tokenizer.eos_token_id)
                 for r in win[:, cfg.prompt_tokens : cfg.prompt_tokens + cfg.new_tokens]]

    teacher_names = [ds.manifest.teacher.name for ds in held.caches] + [t.label for t in teachers]
    if len(set(teacher_names)) < len(teacher_names):
        raise ConfigError(f"two teachers share a name ({', '.join(teacher_names)}): a --teacher model's label "
                          "must differ from the caches' teacher names (name it with LABEL=PATH)")
    if teachers and held.caches and held.temperature != 1.0:
        raise ConfigError(f"the caches were computed at temperature {held.temperature}; live --teacher models "
                          "are scored at temperature 1, so they cannot join them")
    run = _Pass(device=device, dtype=dtype, vocab=_Vocab(held), tokenizer=tokenizer, prompts=prompts,
                teacher_names=teacher_names, scores={label: Scores() for label in labels})
    start = time.perf_counter()
    records = []
    for t in teachers:  # one model resident at a time: each is released before the next loads
        records.append(_score_teacher(t, held, cfg, run))
        release()
    for s in students:
        _score_student(s, held, records, cfg, run)
        release()

    vocab = run.vocab.size
    kl_kind = None
    if held.caches:
        kl_kind = "topk+tail"
    elif teachers:
        kl_kind = "full" if cfg.top_k >= vocab else "topk+tail"
    student_labels, teacher_labels = [s.label for s in students], [t.label for t in teachers]
    bleu = bleu_scores(run.texts, truth, student_labels, teacher_labels) if n_prompts else {}
    scores = run.scores
    result = {
        "source": cfg.data if cfg.data else cfg.teacher_data,
        "teacher_source": "+".join(x for x, on in (("caches", held.caches), ("models", teachers)) if on) or None,
        "kl_kind": kl_kind,
        "top_k": min(cfg.top_k, vocab) if teachers else None,
        "temperature": held.temperature,
        "teacher_weighting": cfg.teacher_weighting if teacher_names else None,
        "observed_sources": run.observed_sources,
        "teachers": teacher_names,
        "windows": held.n_windows,
        "seq_len": held.seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - start,
        "bleu_prompts": n_prompts,
        "models": {
            **{lab: model_summary(scores[lab], "student", teacher_names, bleu.get(lab)) for lab in student_labels},
            **{lab: model_summary(scores[lab], "teacher", teacher_names, bleu.get(lab)) for lab in teacher_labels},
        },
        "cache_teachers": held.observed_nll(),
        "comparisons": compare_students(scores, student_labels, cfg.bootstrap, cfg.seed),
        "continuations": ({"prompts": [tokenizer.decode(p.tolist(), skip_special_tokens=True) for p in prompts],
                           "reference": truth, **run.texts} if n_prompts else {}),
        REPORT_CONFIG: asdict(cfg),
    }
    if held.masked:  # conversations (text results keep their keys)
        from student.data import LOSS_MASK_POSITIONS

        result["positions"] = LOSS_MASK_POSITIONS
    if cfg.output:
        write_json(result, cfg.output)
    return result
