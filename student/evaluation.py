"""`evaluate`: perplexity, KL to each teacher and to the fused target, top-1 agreement, BLEU.

Two sources of held-out sequences:

- `--data FILE` (jsonl, jsonl.gz, parquet, txt): documents packed with the student's tokenizer exactly as
  `precompute` packs them (joined with EOS, cut into `seq_len` windows). With `--teacher MODEL` the teachers
  run on the same windows and the KL is the full-vocab KL(P_T || P_S); their greedy continuations of
  held-out prompts are the references for BLEU.
- `--teacher-data DIR` (caches precomputed on held-out text): the windows are the caches' `input_ids` and
  the KL compares each teacher's top-k plus its own tail bucket with the student's view on the same
  partition (`student.losses.sparse_kl`), at the temperature the caches were written with.

The fused target uses the same weighting as training (`student.fusion.teacher_weights`): per-position
entropy weights by default. An aligned cache (a teacher with another tokenizer) has targets only where its
`target_mask` is set: its KL averages over those positions, the fused KL and agreement over positions where
some teacher has a target, and the counts are reported apart (`target_positions`, `positions_with_target`).
The observed-token correction is a training choice and is not applied here. "KL fused" is the training KD quantity sum_k alpha_k KL_k, the weighted KL to
each teacher (from models, the full KL; from caches, each teacher's top-k plus tail); it is 0 when the student
equals every teacher and differs from KL(mixture || student) by a constant in the student (the teachers'
weighted Jensen-Shannon divergence). Position t of a window predicts token t + 1: KL and agreement use every position
(the teacher target exists for all of them), perplexity uses positions 0..L-2 of each window.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from common.devices import DEVICE_HELP, DeviceParam, check_device
from common.errors import ConfigError, UserError
from common.params import FLOAT_LIST, check_finite, check_weights
from storage.errors import MismatchError, StorageError

WEIGHTINGS = ("entropy", "uniform", "fixed")


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate, on which held-out sequences, against which teachers."""

    students: list[str]
    """Student model directories (`save_pretrained` output), each optionally `LABEL=PATH`."""
    data: str | None = None
    """Held-out text file(s) (jsonl, jsonl.gz, parquet, txt); exclusive with `teacher_data`."""
    text_field: str = "text"
    """Field holding the document text in jsonl/parquet files."""
    teachers: list[str] = field(default_factory=list)
    """Teacher models (directory, or a `.gguf` file path), each optionally `LABEL=PATH`; needs `data`."""
    teacher_data: list[str] = field(default_factory=list)
    """Teacher caches precomputed on held-out text; their `input_ids` are the evaluation sequences."""
    tokenizer: str | None = None
    """Tokenizer directory or `.gguf` file; defaults to the first student's directory."""
    seq_len: int = 256
    """Tokens per packed window (`data` only; caches carry their own)."""
    max_tokens: int | None = None
    """Evaluate at most this many tokens (whole windows; None: all)."""
    batch_size: int = 4
    """Windows per forward pass."""
    weighting: str = "entropy"
    """Teacher weighting of the fused target: entropy, uniform or fixed."""
    fixed_weights: list[float] | None = None
    """One weight per teacher for `fixed` weighting."""
    bleu_prompts: int = 16
    """Held-out prompts continued greedily for BLEU (0: no BLEU)."""
    prompt_tokens: int = 32
    """Tokens of each prompt (the start of an evenly spaced held-out window)."""
    new_tokens: int = 32
    """Greedy continuation length."""
    output: str | None = None
    """Write the results as JSON to this file."""
    bootstrap: int = 2000
    """Paired-bootstrap replicates for the first student against each other one (0: none)."""
    seed: int = 0
    """Seed of the bootstrap."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu`, `cuda` or `cuda:N`."""

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.students:
            raise ConfigError("give at least one --student")
        if (self.data is None) == (not self.teacher_data):
            raise ConfigError(
                "give held-out text with --dataset or held-out caches with --teacher-data (exactly one)"
            )
        if self.teachers and self.data is None:
            raise ConfigError(
                "--teacher models need --dataset (with --teacher-data the KL comes from the caches)"
            )
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting is {self.weighting!r}, expected one of {', '.join(WEIGHTINGS)}")
        n_teachers = len(self.teachers) + len(self.teacher_data)
        if self.weighting == "fixed" and (
            self.fixed_weights is None or len(self.fixed_weights) != n_teachers
        ):
            raise ConfigError(f"fixed weighting needs one weight per teacher ({n_teachers})")
        check_weights("--teacher-weights", self.fixed_weights)
        check_device("--device", self.device)
        for name in ("seq_len", "batch_size", "prompt_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError("seq_len must be at least 2")
        if not 0 <= self.bootstrap <= 1_000_000:
            raise ConfigError(f"bootstrap must be in 0..1000000, got {self.bootstrap}")
        if self.bleu_prompts < 0:
            raise ConfigError("bleu_prompts must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError("max_tokens must be at least 2")


# ---- loading -------------------------------------------------------------------------------------
def split_label(spec: str) -> tuple[str, str]:
    """`LABEL=PATH` -> (LABEL, PATH); a bare PATH is labelled by its last component (without .gguf)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        return label, path
    return Path(spec.rstrip("/")).name.removesuffix(".gguf"), spec


def _dir_and_gguf(path: str) -> tuple[str, str | None]:
    p = Path(path)
    return (str(p.parent), p.name) if p.suffix == ".gguf" else (path, None)


def load_model(path: str, device: Any) -> Any:
    """A causal LM in float32 eval mode from a directory or a `.gguf` file (dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, gguf = _dir_and_gguf(path)
    if not Path(directory).exists():
        raise ConfigError(f"model path {path} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {path}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    directory, gguf = _dir_and_gguf(path)
    try:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); pass --tokenizer DIR"
        ) from e


def _vocab(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


# ---- metrics -------------------------------------------------------------------------------------
def next_token_nll(logits: Any, input_ids: Any) -> tuple[float, int]:
    """Sum and count of -log q(x_{t+1} | x_<=t) over positions 0..L-2: logits [B, L, V], input_ids [B, L]."""
    import torch.nn.functional as F

    v = logits.shape[-1]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(), reduction="sum"
    )
    return float(nll), int(input_ids[:, 1:].numel())


def window_nll(logits: Any, input_ids: Any) -> list[float]:
    """Mean -log q(x_{t+1} | x_<=t) over positions 0..L-2 of each window: logits [B, L, V] -> B floats."""
    import torch.nn.functional as F

    b, _, v = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(),
                          reduction="none")
    return nll.reshape(b, -1).mean(dim=1).tolist()


def dense_target(p: Any) -> tuple[Any, Any]:
    """A teacher distribution p [N, V] (float32 probabilities) prepared for `full_kl`: (p, sum p log p [N])."""
    import torch

    return p, torch.xlogy(p, p).sum(dim=-1)


def full_kl(target: tuple[Any, Any], q_log: Any) -> Any:
    """KL(P || Q) = sum p log p - sum p log q per position -> [N]; target from `dense_target`, q_log [N, V]."""
    p, p_log_p = target
    return p_log_p - (p * q_log).sum(dim=-1)


def greedy_continuations(model: Any, prompts: Any, new_tokens: int) -> Any:
    """Greedy continuation [n, new_tokens] int64 of equal-length prompts [n, P] (KV cache, no padding)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=prompts, use_cache=True)
        nxt = out.logits[:, -1].argmax(dim=-1)
        tokens = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(dim=-1)
            tokens.append(nxt)
    return torch.stack(tokens, dim=1)


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults) of hypotheses against one or more reference streams."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, references).score)


def decode_until_eos(tokenizer: Any, ids: list[int], eos: int | None) -> str:
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class _Acc:
    """Running sums for one model."""

    nll: float = 0.0
    count: int = 0
    kl: dict[str, float] = field(default_factory=dict)
    kl_fused: float = 0.0
    agree: int = 0
    positions: int = 0
    """Positions where some teacher has a target (all of them, unless a cache is aligned)."""
    kl_positions: dict[str, int] = field(default_factory=dict)
    """Per teacher: positions where it has a target (an aligned cache's `target_mask`)."""
    window_nll: list[float] = field(default_factory=list)
    """Mean next-token NLL of each held-out window, in window order (for the paired bootstrap)."""
    window_kl: list[float] = field(default_factory=list)
    """Mean KL to the fused target of each window."""

    def add_kl(self, name: str, value: float, positions: int) -> None:
        self.kl[name] = self.kl.get(name, 0.0) + value
        self.kl_positions[name] = self.kl_positions.get(name, 0) + positions


# ---- held-out sequences --------------------------------------------------------------------------
def _text_windows(cfg: EvalConfig, tokenizer: Any) -> Any:
    """[S, L] int64 windows of the held-out text, packed like `precompute` packs."""
    import numpy as np
    import torch

    from common.corpus import CorpusConfig, iter_documents
    from common.packing import pack_documents

    corpus = CorpusConfig(dataset=cfg.data, text_field=cfg.text_field, max_tokens=cfg.max_tokens)
    batches = list(
        pack_documents(iter_documents(corpus), tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.max_tokens)
    )
    if not batches:
        raise UserError(f"{cfg.data} holds fewer than seq_len={cfg.seq_len} tokens; lower --seq-len")
    return torch.from_numpy(np.concatenate([b.input_ids for b in batches]).astype(np.int64))


def _open_caches(cfg: EvalConfig) -> tuple[list[Any], list[str]]:
    from storage.manifest import JOIN_FIELDS
    from storage.reader import TeacherDataset

    caches = [TeacherDataset.open(p) for p in cfg.teacher_data]
    first = caches[0]
    for path, ds in zip(cfg.teacher_data[1:], caches[1:], strict=True):
        first.manifest.compare(
            ds.manifest, (*JOIN_FIELDS, "temperature"), what=f"{cfg.teacher_data[0]} and {path}"
        )
        if len(ds) != len(first) or (ds.seq_ids != first.seq_ids).any():
            raise MismatchError(
                f"{cfg.teacher_data[0]} and {path} hold different sequences", "seq_ids", (len(first), len(ds))
            )
    if cfg.weighting == "entropy":
        for path, ds in zip(cfg.teacher_data, caches, strict=True):
            if ds.manifest.entropy_kind == "absent":
                raise ConfigError(f"{path} has no entropy column; use --weighting uniform or fixed")
    names = [ds.manifest.teacher.name for ds in caches]
    return caches, names


# ---- the run -------------------------------------------------------------------------------------
def run_evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every student (and the teacher models, when given); returns the JSON-able results."""
    import torch
    from tqdm import tqdm

    from common.tokenizer import tokenizer_fingerprint
    from student.data import sparse_target, target_columns
    from student.fusion import fuse_topk, teacher_weights
    from student.fusion import fused_top1 as known_top1
    from student.losses import sparse_kl

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine")
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    if cfg.output:
        _check_output_file(cfg.output)
    students = [split_label(s) for s in cfg.students]
    teachers = [split_label(t) for t in cfg.teachers]
    tokenizer = load_tokenizer(cfg.tokenizer or students[0][1])
    fingerprint = tokenizer_fingerprint(tokenizer)
    eos = tokenizer.eos_token_id

    caches, cache_names = _open_caches(cfg) if cfg.teacher_data else ([], [])
    temperature = caches[0].manifest.temperature if caches else 1.0
    if caches:
        m = caches[0].manifest
        if m.tokenizer_fingerprint != fingerprint:
            raise MismatchError(
                f"the student's tokenizer differs from the one {cfg.teacher_data[0]} was computed with",
                "tokenizer_fingerprint",
                (fingerprint, m.tokenizer_fingerprint),
            )
        n_windows = (
            len(caches[0]) if cfg.max_tokens is None else min(len(caches[0]), cfg.max_tokens // m.seq_len)
        )
        seq_len = m.seq_len
        windows = None
    else:
        windows = _text_windows(cfg, tokenizer)
        n_windows, seq_len = windows.shape
    if n_windows < 1:
        raise UserError(f"max_tokens={cfg.max_tokens} is less than one window of {seq_len} tokens")

    student_models = {label: load_model(path, device) for label, path in students}
    teacher_models = {label: load_model(path, device) for label, path in teachers}
    for label, path in teachers:
        tok = load_tokenizer(path)
        if tokenizer_fingerprint(tok) != fingerprint:
            raise MismatchError(
                f"teacher {label} ({path}) uses a different tokenizer than the student",
                "tokenizer_fingerprint",
                (fingerprint, tokenizer_fingerprint(tok)),
            )
    for label, model in {**student_models, **teacher_models}.items():
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and max_pos < seq_len:
            raise ConfigError(
                f"{label} has max_position_embeddings {max_pos} < seq_len {seq_len}; lower --seq-len"
            )
    vocab = {label: _vocab(m) for label, m in {**student_models, **teacher_models}.items()}
    if caches:
        vocab["(caches)"] = caches[0].manifest.vocab_size
    if len(set(vocab.values())) > 1:
        raise MismatchError(
            f"models disagree on the vocab size: {vocab}", "vocab_size", tuple(vocab.values())[:2]
        )

    teacher_names = list(teacher_models) or cache_names
    accs = {label: _Acc() for label in [*student_models, *teacher_models]}
    fixed = cfg.fixed_weights
    bar = tqdm(total=n_windows * seq_len, unit="tok", desc="evaluate", dynamic_ncols=True)
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n_windows, cfg.batch_size):
            hi = min(n_windows, lo + cfg.batch_size)
            if caches:
                cols = [
                    ds.read_columns(
                        list(range(lo, hi)),
                        ["input_ids", *target_columns(ds.manifest)]
                        + (["entropy"] if cfg.weighting == "entropy" else [])
                        + (["target_mask"] if ds.manifest.aligned else []),
                    )
                    for ds in caches
                ]
                ids = torch.from_numpy(cols[0]["input_ids"].astype("int64"))
                for path, c in zip(cfg.teacher_data[1:], cols[1:], strict=True):
                    if (c["input_ids"] != cols[0]["input_ids"]).any():
                        raise MismatchError(
                            f"{path} holds other tokens than {cfg.teacher_data[0]}", "input_ids", (lo, hi)
                        )
            else:
                ids = windows[lo:hi]
            ids = ids.to(device)
            n_pos = ids.numel()

            # teacher distributions at every position: dense (models) or sparse (caches)
            per_teacher_fused, fused, fused_top1 = {}, None, None
            if teacher_models:
                targets = {}  # teacher -> (p [N, V], sum p log p [N]), computed once per batch
                teacher_logq = {}  # teacher -> log p [N, V]
                for label, model in teacher_models.items():
                    logits = model(input_ids=ids).logits.float()
                    nll, cnt = next_token_nll(logits, ids)
                    accs[label].nll += nll
                    accs[label].count += cnt
                    accs[label].window_nll += window_nll(logits, ids)
                    teacher_logq[label] = torch.log_softmax(logits.reshape(n_pos, -1), dim=-1)
                    targets[label] = dense_target(teacher_logq[label].exp())
                    del logits
                ent = torch.stack([-t[1] for t in targets.values()], dim=1)  # [N, K] entropies
                alpha = teacher_weights(ent, cfg.weighting, fixed)
                fused_p = sum(alpha[:, i : i + 1] * t[0] for i, t in enumerate(targets.values()))
                fused = fused_p  # [N, V] the mixture; its argmax is the top-1 target
                fused_top1 = fused_p.argmax(dim=-1)
                for label, logq in teacher_logq.items():  # a teacher's own sum_k alpha_k KL_k (own term 0)
                    kl = sum(alpha[:, i] * full_kl(t, logq) for i, t in enumerate(targets.values()))
                    kl = kl.reshape(ids.shape)
                    accs[label].kl_fused += float(kl.sum())
                    accs[label].positions += n_pos
                    accs[label].window_kl += kl.mean(dim=1).tolist()
            elif caches:
                views = [sparse_target(c, ds.manifest, n_pos) for c, ds in zip(cols, caches, strict=True)]
                k_ids = [i.to(device) for i, _ in views]
                k_lp = [lp.float().to(device) for _, lp in views]
                sampled = [ds.manifest.target_kind == "sampled" for ds in caches]
                ent = (
                    torch.stack([torch.from_numpy(c["entropy"]).reshape(n_pos) for c in cols], dim=1).to(
                        device
                    )
                    if cfg.weighting == "entropy"
                    else torch.zeros((n_pos, len(cols)), device=device)
                )
                # aligned caches (teachers with another tokenizer) have targets only where `target_mask` says
                valid = torch.stack([torch.from_numpy(c["target_mask"] != 0).reshape(n_pos) if "target_mask" in c
                                     else torch.ones(n_pos, dtype=torch.bool) for c in cols], dim=1).to(device)
                mask = valid if any("target_mask" in c for c in cols) else None
                alpha = teacher_weights(ent, cfg.weighting, fixed, valid=mask)
                ones = torch.ones((n_pos, 1), device=device)
                per_teacher_fused = {
                    n: fuse_topk([i], [lp], ones, None if mask is None else mask[:, j : j + 1], tailless=[s])
                    for j, (n, i, lp, s) in enumerate(zip(cache_names, k_ids, k_lp, sampled, strict=True))
                }
                fused = fuse_topk(k_ids, k_lp, alpha, mask, tailless=sampled)
                fused_top1 = known_top1(fused)

            for label, model in student_models.items():
                acc = accs[label]
                logits = model(input_ids=ids).logits.float()
                nll, cnt = next_token_nll(logits, ids)
                acc.nll += nll
                acc.count += cnt
                acc.window_nll += window_nll(logits, ids)
                flat = logits.reshape(n_pos, -1)
                if fused is None:
                    continue
                # positions without any target (aligned caches only) are counted apart, not averaged in
                has = fused.has_target if not teacher_models else torch.ones(n_pos, dtype=torch.bool,
                                                                               device=flat.device)
                acc.positions += int(has.sum())
                acc.agree += int(((flat.argmax(dim=-1) == fused_top1) & has).sum())
                if teacher_models:
                    q = torch.log_softmax(flat, dim=-1)
                    kl_fused = torch.zeros(n_pos, device=q.device)  # sum_k alpha_k KL_k, as sparse_kl
                    for i, (name, target) in enumerate(targets.items()):
                        kl_k = full_kl(target, q)  # [N]
                        acc.add_kl(name, float(kl_k.sum()), n_pos)
                        kl_fused += alpha[:, i] * kl_k
                    acc.kl_fused += float(kl_fused.sum())
                    acc.window_kl += kl_fused.reshape(ids.shape).mean(dim=1).tolist()
                else:
                    for name, f in per_teacher_fused.items():
                        kl_k = sparse_kl(flat, f, temperature=temperature, reduction="none")  # [N]
                        acc.add_kl(name, float((kl_k * f.has_target).sum()), int(f.has_target.sum()))
                    kl = (sparse_kl(flat, fused, temperature=temperature, reduction="none") * has).reshape(ids.shape)
                    acc.kl_fused += float(kl.sum())
                    # per window: the mean over its positions with a target
                    acc.window_kl += (kl.sum(dim=1) / has.reshape(ids.shape).sum(dim=1).clamp_min(1)).tolist()
            bar.update(n_pos)
            bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start):.0f}")
    bar.close()

    # BLEU of greedy continuations of evenly spaced held-out prompts
    bleu_res: dict[str, dict[str, float]] = {}
    n_prompts = min(cfg.bleu_prompts, n_windows) if cfg.prompt_tokens + cfg.new_tokens <= seq_len else 0
    if cfg.bleu_prompts and not n_prompts:
        raise ConfigError(f"prompt_tokens + new_tokens must fit in a window of {seq_len} tokens")
    if n_prompts:
        rows = [round(i * (n_windows - 1) / max(1, n_prompts - 1)) for i in range(n_prompts)]
        if caches:
            win = torch.from_numpy(caches[0].read_columns(rows, ["input_ids"])["input_ids"].astype("int64"))
        else:
            win = windows[rows]
        prompts = win[:, : cfg.prompt_tokens].to(device)
        truth = [
            decode_until_eos(tokenizer, r.tolist(), eos)
            for r in win[:, cfg.prompt_tokens : cfg.prompt_tokens + cfg.new_tokens]
        ]
        texts = {}
        for label, model in tqdm(
            {**teacher_models, **student_models}.items(), desc="continuations", unit="model"
        ):
            out = greedy_continuations(model, prompts, cfg.new_tokens).cpu()
            texts[label] = [decode_until_eos(tokenizer, r.tolist(), eos) for r in out]
        for label in [*student_models, *teacher_models]:
            res = {"reference": bleu(texts[label], [truth])}
            if label in student_models and teacher_models:
                for t in teacher_models:
                    res[t] = bleu(texts[label], [texts[t]])
                res["teachers"] = bleu(texts[label], [texts[t] for t in teacher_models])
            bleu_res[label] = res
        continuations = {"prompts": [tokenizer.decode(p.tolist(), skip_special_tokens=True) for p in prompts],
                         "reference": truth, **texts}
    else:
        continuations = {}

    def summary(label: str, role: str) -> dict[str, Any]:
        a = accs[label]
        out: dict[str, Any] = {
            "role": role,
            "perplexity": math.exp(a.nll / a.count),
            "tokens_scored": a.count,
        }
        if role == "student" and a.positions:
            out["kl"] = {t: a.kl[t] / max(a.kl_positions[t], 1) for t in teacher_names}
            out["top1_agreement"] = a.agree / a.positions
            # per teacher, the positions its KL averages over; an aligned cache's masked positions are not in it
            out["target_positions"] = {t: a.kl_positions[t] for t in teacher_names}
            out["positions_with_target"] = a.positions
        if a.positions:
            out["kl_fused"] = a.kl_fused / a.positions
        out["window_nll"] = a.window_nll
        if a.window_kl:
            out["window_kl_fused"] = a.window_kl
        if label in bleu_res:
            out["bleu"] = bleu_res[label]
        return out

    result = {
        "source": cfg.data if cfg.data else cfg.teacher_data,
        "kl_kind": "full" if teacher_models else ("topk+tail" if caches else None),
        "temperature": temperature,
        "weighting": cfg.weighting if teacher_names else None,
        "teachers": teacher_names,
        "windows": n_windows,
        "seq_len": seq_len,
        "bleu_prompts": n_prompts,
        "models": {
            **{lab: summary(lab, "student") for lab in student_models},
            **{lab: summary(lab, "teacher") for lab in teacher_models},
        },
        "comparisons": compare_students(accs, list(student_models), cfg.bootstrap, cfg.seed),
        "continuations": continuations,
        "config": asdict(cfg),
    }
    if cfg.output:
        try:
            Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise StorageError(f"cannot write --output {cfg.output}: {e.strerror or e}") from e
    return result


def _check_output_file(path: str) -> None:
    """Create the parent directory of the results file and check it can be written, before any work;
    ConfigError naming the path when it is a directory, under a file, or not writable."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name for the JSON results")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
        if not existed:
            out.unlink()
    except OSError as e:
        raise ConfigError(f"--output {path} cannot be written: {e.strerror or e}") from None


def compare_students(accs: dict[str, _Acc], students: list[str], replicates: int, seed: int) -> list[dict]:
    """The first student against each other one: differences with paired-bootstrap intervals over windows."""
    from student.stats import mean, paired_bootstrap, perplexity_of_means

    out = []
    if replicates < 1:
        return out
    first = students[0] if students else None
    for other in students[1:]:
        a, b = accs[first], accs[other]
        if len(a.window_nll) < 2:
            break
        rec: dict[str, Any] = {"a": first, "b": other, "replicates": replicates, "windows": len(a.window_nll)}
        metrics = [("perplexity", a.window_nll, b.window_nll, perplexity_of_means),
                   ("nll", a.window_nll, b.window_nll, mean)]
        if a.window_kl and b.window_kl:
            metrics.append(("kl_fused", a.window_kl, b.window_kl, mean))
        for name, x, y, stat in metrics:
            r = paired_bootstrap(x, y, n=replicates, seed=seed, stat=stat)
            rec[name] = {"difference": r.estimate, "low": r.low, "high": r.high, "excludes_zero": r.excludes_zero()}
        out.append(rec)
    return out


def format_comparisons(result: dict[str, Any]) -> str:
    """One line per comparison: a - b with its 95% paired-bootstrap interval."""
    lines = []
    for c in result.get("comparisons", []):
        parts = [f"{name} {c[name]['difference']:+.3f} [{c[name]['low']:+.3f}, {c[name]['high']:+.3f}]"
                 for name in ("perplexity", "nll", "kl_fused") if name in c]
        lines.append(f"{c['a']} - {c['b']}: " + ", ".join(parts) + f" (95% paired bootstrap over {c['windows']} "
                     f"windows, {c['replicates']} replicates)")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per model."""
    teachers = result["teachers"]
    header = ["model", "perplexity"]
    if result["kl_kind"]:
        header += ["KL fused", *[f"KL {t}" for t in teachers], "top-1 agree"]
    has_bleu = result["bleu_prompts"] > 0
    if has_bleu:
        header += (["BLEU teachers"] if result["kl_kind"] == "full" else []) + ["BLEU text"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def f(x: float | None, nd: int = 3) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    for label, m in result["models"].items():
        row = [f"{label} ({m['role']})", f(m["perplexity"], 2)]
        if result["kl_kind"]:
            kl = m.get("kl", {}) if m["role"] == "student" else {}
            row += [f(m.get("kl_fused"))] + [f(kl.get(t)) for t in teachers] + [f(m.get("top1_agreement"))]
        if has_bleu:
            b = m.get("bleu", {})
            row += ([f(b.get("teachers"), 1)] if result["kl_kind"] == "full" else []) + [
                f(b.get("reference"), 1)
            ]
        lines.append("| " + " | ".join(row) + " |")
    total = result["windows"] * result["seq_len"]
    for label, m in result["models"].items():
        counts = m.get("target_positions", {})
        partial = {t: n for t, n in counts.items() if n < total}
        if partial:  # aligned caches: their KL is over the positions with a target only
            lines.append(f"{label}: KL over positions with a target only: "
                         + ", ".join(f"{t} {n} of {total}" for t, n in partial.items()))
    return "\n".join(lines)


# ---- command -------------------------------------------------------------------------------------
@click.command("evaluate")
@click.option(
    "--student",
    "students",
    multiple=True,
    required=True,
    help="Student model directory, or LABEL=DIR; repeat to compare several students in one table.",
)
@click.option(
    "--dataset",
    "data",
    default=None,
    help="Held-out text (jsonl, jsonl.gz, parquet, txt), packed with the student's tokenizer.",
)
@click.option("--data", "data_alias", default=None, hidden=True, help="Old spelling of --dataset.")
@click.option(
    "--text-field", default="text", show_default=True, help="Field holding the text in jsonl/parquet files."
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    help="Teacher model (directory or .gguf file), or LABEL=PATH; repeat. Full-vocab KL and BLEU references.",
)
@click.option(
    "--teacher-data",
    multiple=True,
    help="Teacher cache precomputed on held-out text; repeat. KL over top-k plus a tail bucket.",
)
@click.option(
    "--tokenizer",
    default=None,
    help="Tokenizer directory or .gguf file (default: the first student's directory).",
)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per packed window (--dataset only).")
@click.option(
    "--max-tokens", type=int, default=None, help="Evaluate at most this many tokens (whole windows)."
)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward pass.")
@click.option(
    "--teacher-weighting",
    "weighting",
    type=click.Choice(WEIGHTINGS),
    default="entropy",
    show_default=True,
    help="Teacher weights of the fused target (per-position entropy, uniform, or --teacher-weights).",
)
@click.option(
    "--teacher-weights", "fixed_weights", type=FLOAT_LIST, default=None,
    help="Fixed weights in teacher order, e.g. 0.5,0.3,0.2 (with --teacher-weighting fixed; same option as train-student).",
)
@click.option(
    "--bleu-prompts",
    type=int,
    default=16,
    show_default=True,
    help="Held-out prompts continued greedily for BLEU (0: skip).",
)
@click.option("--prompt-tokens", type=int, default=32, show_default=True, help="Tokens per BLEU prompt.")
@click.option("--new-tokens", type=int, default=32, show_default=True, help="Tokens of each greedy continuation.")
@click.option("--output", default=None, help="Write the results as JSON to this file.")
@click.option("--bootstrap", default=2000, show_default=True,
              help="Paired-bootstrap replicates (over held-out windows) for the difference between the first "
                   "student and each other one: perplexity, NLL and KL to the fused target with 95% intervals "
                   "(0: skip).")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--device", type=DeviceParam(), default="auto", show_default=True, help=DEVICE_HELP)
def evaluate_cmd(
    students: tuple[str, ...],
    data: str | None,
    data_alias: str | None,
    text_field: str,
    teachers: tuple[str, ...],
    teacher_data: tuple[str, ...],
    tokenizer: str | None,
    seq_len: int,
    max_tokens: int | None,
    batch_size: int,
    weighting: str,
    fixed_weights: tuple[float, ...] | None,
    bleu_prompts: int,
    prompt_tokens: int,
    new_tokens: int,
    output: str | None,
    bootstrap: int,
    seed: int,
    device: str,
) -> None:
    """Evaluate students on held-out text: perplexity, KL to each teacher and to the fused target,
    top-1 agreement with the fused target, BLEU of greedy continuations."""
    if data is not None and data_alias is not None:
        raise ConfigError("give --dataset once (--data is its old spelling)")
    data = data if data is not None else data_alias
    weights = list(fixed_weights) if fixed_weights else None
    cfg = EvalConfig(
        students=list(students),
        data=data,
        text_field=text_field,
        teachers=list(teachers),
        teacher_data=list(teacher_data),
        tokenizer=tokenizer,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        weighting=weighting,
        fixed_weights=weights,
        bleu_prompts=bleu_prompts,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        output=output,
        bootstrap=bootstrap,
        seed=seed,
        device=device,
    )
    result = run_evaluate(cfg)
    click.echo(format_table(result))
    if result["comparisons"]:
        click.echo(format_comparisons(result))
    if output:
        click.echo(f"results written to {output}")
