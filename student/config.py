"""Stage-two configuration: LossConfig, OptimConfig, TrainConfig, and small presets; InitStudentConfig
(init-student, which cuts a student from a teacher) and PlotConfig (plot).

Presets are plain functions so a CPU run takes seconds and the paper-style comparisons (CE only,
single-teacher KD, uniform / entropy-weighted multi-teacher, + features, DKD) are one name each.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from common.devices import check_device
from common.errors import ConfigError
from common.params import check_finite, check_seed
from storage.stamps import VERIFY_MODES
from student.weighting import DEFAULT_SETTINGS, WeightSettings, check_settings

LOSSES = ("kd", "dkd")
MAX_WORKERS = 256
"""More DataLoader workers than this is refused as a typo (each is a process)."""
MAX_GRAD_ACCUM = 2**20
"""More micro-batches per optimizer step than this is refused as a typo (a million micro-batches per step;
counts past 2**63-1 would also fail inside itertools.islice after the run had started)."""
MAX_LR = 1e6
"""Larger learning rates are refused: AdamW's first step is lr / (1 - beta1) and overflows float32 near 1e37."""
MAX_SPOT_CHECK = 1_000_000
"""More spot-checked sequences than this is refused (each is read from every cache at join time; every batch
is checked anyway)."""
EVAL_SEQUENCES_CAP = 512
"""Most sequences `eval_fraction` holds out: evaluation stays a bounded share of step time on large caches
(10B tokens at 2048: 5% would be 244k sequences, about 2x the training work between two evaluations)."""


@dataclass(kw_only=True)
class LossConfig:
    """Total loss L = lambda_kd * (KD or DKD) + (1 - lambda_kd) * CE + gamma_feat * L_feat."""

    loss: str = "kd"
    """`kd` (sparse KL to the fused target) or `dkd` (decoupled KD on the fused target, a baseline)."""
    lambda_kd: float = 0.5
    """Weight of the distillation term; 0 gives CE-only training, 1 pure distillation."""
    gamma_feat: float = 0.0
    """Weight of the pooled-feature alignment term (0: off, no projections are built)."""
    temperature: float | None = None
    """Distillation temperature; None takes the caches' precompute temperature (a different value is refused)."""
    teacher_weighting: str = "min-ce-seq"
    """A scheme of student/weighting.py's REGISTRY: `entropy` (per position, alpha_k ∝ 1 / (H_k + eps)),
    `uniform`, `fixed` (teacher_weights), `confidence`, `tempered`, `min-ce`, `min-ce-seq`."""
    teacher_weights: tuple[float, ...] | None = DEFAULT_SETTINGS.teacher_weights
    """Fixed weights, one per teacher in --teacher-data order (normalised to sum to 1)."""
    entropy_eps: float = DEFAULT_SETTINGS.entropy_eps
    """eps in 1 / (H + eps), guarding teachers with near-zero entropy (nats)."""
    weight_beta: float = DEFAULT_SETTINGS.weight_beta
    """`tempered`: beta in alpha_k ∝ p_k(o)^beta."""
    weight_floor: float = DEFAULT_SETTINGS.weight_floor
    """`tempered`: share of the weight spread uniformly over the valid teachers."""
    feat_weights: tuple[float, ...] | None = None
    """beta_k per teacher for the feature loss (None: 1.0 each)."""
    teacher_pool_layer: int | None = None
    """Teacher pooled layer to align to; None: each teacher's highest stored layer."""
    student_pool_layer: int = -1
    """Student decoder block whose output is mean-pooled (0-based, negative from the end), like the teachers'."""
    dkd_alpha: float = 1.0
    """DKD weight of the target-class term (TCKD)."""
    dkd_beta: float = 8.0
    """DKD weight of the non-target-class term (NCKD)."""
    chunk_size: int | None = None
    """Compute the student's logits, CE and KD in chunks of this many positions from its final hidden states
    (student/loss/chunked.py), so the [B·L, V] logits never exist; None: the unchunked loss. `kd` only, not FSDP."""
    observed_correction: bool = True
    """Aligned caches only: where the cache holds the teacher's exact log-prob of the observed next token,
    that probability replaces the first-token value, the teacher's other entries are rescaled and its entropy
    (for alpha) is the corrected one (student/observed.py). No effect on plain caches."""

    def __post_init__(self) -> None:
        check_finite(self)
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.lambda_kd <= 1.0:
            raise ConfigError(f"--lambda-kd must be in [0, 1], got {self.lambda_kd}")
        if self.gamma_feat < 0:
            raise ConfigError(f"--gamma-feat must be >= 0, got {self.gamma_feat}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        check_settings(self.teacher_weighting, self.weight_settings())
        if self.feat_weights is not None and any(b < 0 for b in self.feat_weights):
            raise ConfigError(f"--feat-weights must be >= 0, got {self.feat_weights}")
        if self.dkd_alpha < 0 or self.dkd_beta < 0:
            raise ConfigError(f"--dkd-alpha/--dkd-beta must be >= 0, got {self.dkd_alpha}, {self.dkd_beta}")
        if self.chunk_size is not None:
            if self.chunk_size < 1:
                raise ConfigError(f"--loss-chunk-size must be >= 1, got {self.chunk_size}")
            if self.loss != "kd":
                raise ConfigError("--loss-chunk-size supports --loss kd only")

    def weight_settings(self) -> WeightSettings:
        """The teacher-weighting scheme's settings."""
        return WeightSettings(teacher_weights=self.teacher_weights, entropy_eps=self.entropy_eps,
                              weight_beta=self.weight_beta, weight_floor=self.weight_floor)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = 1e-3
    """Peak learning rate (student and projections)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (beta1, beta2), each in [0, 1)."""
    warmup_steps: int = 10
    """Linear warmup length in optimizer steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        check_finite(self)
        if not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"--lr must be in (0, {MAX_LR:g}], got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"--betas must be two values in [0, 1), got {self.betas}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `run_train` needs."""

    teacher_data: list[str]
    """Teacher cache directories (local or fsspec URLs), K >= 1."""
    output: str
    """Run directory: checkpoints/, metrics.jsonl, config.json, final/ (the student)."""
    student: str = "tiny"
    """A model directory (e.g. from `init-student`), a hub id, a JSON config file, or a preset name (see
    student.model.PRESETS)."""
    freeze_embeddings: bool = False
    """Do not train the input embeddings (with tied embeddings this also freezes the output head)."""
    freeze_lm_head: bool = False
    """Do not train the output head (with tied embeddings this also freezes the input embeddings)."""
    tokenizer: str | None = None
    """Tokenizer directory saved beside the final student."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and teacher weighting."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    max_steps: int = 200
    """Optimizer steps to train for (the schedule's length)."""
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many steps as if preempted; the schedule still targets max_steps."""
    batch_size: int = 8
    """Sequences per micro-batch per rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = batch_size * grad_accum * world size)."""
    eval_fraction: float = 0.05
    """Fraction of the cache's sequences held out for evaluation, at most `EVAL_SEQUENCES_CAP` (512) of them
    (ignored when eval_sequences is set)."""
    eval_sequences: int | None = None
    """Number of sequences held out for evaluation (overrides eval_fraction and its cap; 0 disables
    evaluation)."""
    eval_every: int = 50
    """Evaluate on the held-out slice every this many steps (and at the end; 0: only at the end)."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only the final checkpoint)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    resume: bool = False
    """Continue from the latest checkpoint in output/checkpoints."""
    seed: int = 0
    """Seed of model init, data order and every RNG."""
    split_seed: int = 0
    """Seed that picks the held-out sequences (kept apart so runs with different seeds share one split)."""
    num_workers: int = 2
    """DataLoader worker processes (0: load in the main process)."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead."""
    spot_check: int = 16
    """Sequences whose input_ids are compared across teachers at join time (each batch is checked too)."""
    device: str = "auto"
    """`auto` (cuda if available; under torchrun cuda:LOCAL_RANK), `cpu`, `cuda` or `cuda:N` (one process)."""
    verify: str = "stamp"
    """How rank 0 checks the caches' shards before step 1: `full` (sha256 of every shard), `stamp` (sha256
    only of shards no verified stamp covers; storage/stamps.py) or `off`; sizes are always checked. A
    `--resume` applies `full` as `stamp`: the first run's check is on record."""
    fsdp: bool = False
    """Shard the student with FSDP2 `fully_shard` instead of DDP (under torchrun)."""

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.teacher_data:
            raise ConfigError("at least one --teacher-data directory is required")
        for name in ("max_steps", "batch_size", "grad_accum", "prefetch_factor", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "num_workers", "spot_check"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.spot_check > MAX_SPOT_CHECK:
            raise ConfigError(f"--spot-check must be <= {MAX_SPOT_CHECK}, got {self.spot_check}")
        if self.grad_accum > MAX_GRAD_ACCUM:
            raise ConfigError(f"--grad-accum must be <= {MAX_GRAD_ACCUM}, got {self.grad_accum}")
        if self.num_workers > MAX_WORKERS:
            raise ConfigError(f"--num-workers must be <= {MAX_WORKERS}, got {self.num_workers}")
        for name in ("seed", "split_seed"):
            check_seed(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.stop_after is not None and not 1 <= self.stop_after <= self.max_steps:
            raise ConfigError(f"--stop-after must be in 1..{self.max_steps}, got {self.stop_after}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_sequences is not None and self.eval_sequences < 0:
            raise ConfigError(f"--eval-sequences must be >= 0, got {self.eval_sequences}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        check_device("--device", self.device)
        if self.fsdp and self.loss.chunk_size is not None:
            raise ConfigError("--loss-chunk-size is not supported with --fsdp (use DDP)")
        k = len(self.teacher_data)
        check_settings(self.loss.teacher_weighting, self.loss.weight_settings(), k)
        for name, values in (("feat-weights", self.loss.feat_weights),):
            if values is not None and len(values) != k:
                raise ConfigError(f"--{name} has {len(values)} values for {k} teachers")


# ---- presets -----------------------------------------------------------------------------------
def ce_only() -> LossConfig:
    """No distillation: next-token cross-entropy only."""
    return LossConfig(lambda_kd=0.0)


def kd_uniform() -> LossConfig:
    """Sparse KD to the uniformly weighted fused target (single-teacher KD when K = 1)."""
    return LossConfig(lambda_kd=0.5, teacher_weighting="uniform")


def kd_entropy() -> LossConfig:
    """Sparse KD to the entropy-weighted fused target (the method)."""
    return LossConfig(lambda_kd=0.5, teacher_weighting="entropy")


def kd_entropy_feat() -> LossConfig:
    """Entropy-weighted KD plus pooled-feature alignment."""
    return LossConfig(lambda_kd=0.5, teacher_weighting="entropy", gamma_feat=0.1)


def dkd() -> LossConfig:
    """Decoupled KD on the entropy-weighted fused target (baseline)."""
    return LossConfig(loss="dkd", lambda_kd=0.5, teacher_weighting="entropy")


LOSS_PRESETS: dict[str, Callable[[], LossConfig]] = {
    "ce": ce_only, "kd-uniform": kd_uniform, "kd-entropy": kd_entropy,
    "kd-entropy-feat": kd_entropy_feat, "dkd": dkd,
}


def tiny(teacher_data: list[str], output: str, **overrides) -> TrainConfig:
    """A CPU run of seconds: the `tiny` student, small batches, no workers."""
    base = TrainConfig(teacher_data=teacher_data, output=output, student="tiny", batch_size=4,
                       max_steps=20, eval_every=10, log_every=5, num_workers=0,
                       optim=OptimConfig(lr=3e-3, warmup_steps=2))
    return replace(base, **overrides)


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


@dataclass(kw_only=True)
class PlotConfig:
    """Which run `plot` draws, and where to."""

    run_dir: str
    """The run directory whose metrics.jsonl is drawn."""
    output: str | None = None
    """Image path (None: RUN_DIR/curves.png); `.png` is appended when it has no extension."""
    overwrite: bool = False
    """Replace a figure already at `output` (never a file of another kind)."""
