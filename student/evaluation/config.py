"""`EvalConfig`: what `evaluate` scores, on which held-out sequences, against which teachers."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.devices import check_device
from common.errors import ConfigError
from common.params import check_finite, check_seed
from student.weighting import DEFAULT_SETTINGS, Weighting, WeightSettings, check_settings

DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_SEQ_LEN = 2048
"""Window length for `--dataset` when `--seq-len` is not given: precompute's default, lowered to the
smallest `max_position_embeddings` of the models (said on stderr)."""


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate, on which held-out sequences, against which teachers."""

    students: list[str]
    """Student models (directory or hub id), each optionally `LABEL=PATH`."""
    data: str | None = None
    """Held-out text: hub dataset id or local file(s) (jsonl, jsonl.gz, parquet, txt); exclusive with
    `teacher_data`."""
    dataset_config: str | None = None
    """Hub dataset configuration (e.g. `en` for allenai/c4); hub datasets only."""
    split: str = "validation"
    """Hub dataset split; hub datasets only (held-out text, so `validation` by default)."""
    dataset_revision: str | None = None
    """Hub dataset revision; hub datasets only."""
    text_field: str = "text"
    """Field holding the document text in jsonl/parquet files and hub datasets."""
    corpus_format: str = "text"
    """`data` holds `text` documents or `chat` conversations (common/chat.py): rendered with the student
    tokenizer's chat template (or `chat_template`), every figure over the assistant positions only."""
    messages_field: str = "messages"
    """Field holding a conversation's messages (`corpus_format` chat)."""
    chat_template: str | None = None
    """Jinja chat template file for `corpus_format` chat (None: the tokenizer's own)."""
    teachers: list[str] = field(default_factory=list)
    """Teacher models (directory or hub id; the old `DIR/FILE.gguf` form is accepted), each optionally
    `LABEL=PATH`, sharing the student's tokenizer; scored on the `data` windows, or on the caches' windows
    beside the `teacher_data` caches (whose teachers come first in the fused target's teacher order)."""
    gguf_files: list[str] = field(default_factory=list)
    """GGUF files inside teacher directories, each `LABEL=FILE`, or a bare `FILE` with exactly one teacher."""
    teacher_data: list[str] = field(default_factory=list)
    """Teacher caches precomputed on held-out text; their `input_ids` are the evaluation sequences."""
    observed_correction: bool = True
    """Aligned caches: use the exact log-prob of the observed next token (`observed_logprob`) in the target,
    as train-student does by default (student/observed.py)."""
    verify: str = "stamp"
    """How the caches' shards are checked on open: full, stamp or off (storage/stamps.py)."""
    tokenizer: str | None = None
    """Tokenizer directory or `.gguf` file; defaults to the first student's directory."""
    seq_len: int | None = None
    """Tokens per packed window (`data` only; caches carry their own). None: DEFAULT_SEQ_LEN, lowered to the
    smallest `max_position_embeddings` of the models."""
    max_tokens: int | None = None
    """Evaluate at most this many tokens (whole windows; None: all)."""
    batch_size: int = 4
    """Windows per forward pass."""
    top_k: int = 64
    """Log-probs kept per position of a live teacher (with its exact entropy) between its pass and the
    students' (each model is resident alone). At top_k >= vocab the KL is the full-vocab KL."""
    teacher_weighting: str = "min-ce-seq"
    """Teacher weighting of the fused target, a scheme of student/weighting.py's REGISTRY (as training's
    `LossConfig`)."""
    teacher_weights: list[float] | None = None
    """One weight per teacher for `fixed` weighting."""
    entropy_eps: float = DEFAULT_SETTINGS.entropy_eps
    """`entropy`: eps in 1 / (H + eps) (nats), as train-student's."""
    weight_beta: float = DEFAULT_SETTINGS.weight_beta
    """`tempered`: beta in alpha_k ∝ p_k(o)^beta, as train-student's."""
    weight_floor: float = DEFAULT_SETTINGS.weight_floor
    """`tempered`: share of the weight spread uniformly over the valid teachers, as train-student's."""
    bleu_prompts: int = 16
    """Held-out prompts continued greedily for BLEU (0: no BLEU)."""
    prompt_tokens: int = 32
    """Tokens of each prompt (the start of an evenly spaced held-out window)."""
    new_tokens: int = 32
    """Greedy continuation length."""
    output: str | None = None
    """Write the results as JSON to this file."""
    overwrite: bool = False
    """Replace an evaluation report already at `output` (never a file of another kind, nor an input)."""
    bootstrap: int = 2000
    """Paired-bootstrap replicates for the first student against each other one (0: none)."""
    seed: int = 0
    """Seed of the bootstrap."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu`, `cuda` or `cuda:N`."""
    dtype: str = "auto"
    """Weights and activations of every model: `auto` (bfloat16 on CUDA, float32 on CPU), `float32` or
    `bfloat16`. Metrics are computed from the logits in float32 either way."""

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.students:
            raise ConfigError("give at least one --student")
        if (self.data is None) == (not self.teacher_data):
            raise ConfigError(
                "give held-out text with --dataset or held-out caches with --teacher-data (exactly one)"
            )
        if self.teacher_data and (self.corpus_format != "text" or self.chat_template is not None):
            raise ConfigError("--corpus-format and --chat-template describe --dataset; caches of conversations carry "
                              "their own loss mask")
        if self.corpus_format not in ("text", "chat"):
            raise ConfigError(f"--corpus-format is {self.corpus_format!r}, expected text or chat")
        if self.gguf_files and not self.teachers:
            raise ConfigError("--gguf-file names a file inside a --teacher directory; give --teacher")
        self.weighting()  # the scheme's checks, with the number of teachers
        check_device("--device", self.device)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype is {self.dtype!r}, expected one of {', '.join(DTYPES)}")
        if self.verify not in ("full", "stamp", "off"):
            raise ConfigError(f"--verify is {self.verify!r}, expected full, stamp or off")
        for name in ("batch_size", "prompt_tokens", "new_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError("seq_len must be at least 2")
        if not 0 <= self.bootstrap <= 1_000_000:
            raise ConfigError(f"bootstrap must be in 0..1000000, got {self.bootstrap}")
        check_seed("--seed", self.seed)  # checked even with one student (no bootstrap), as training checks its seed
        if self.bleu_prompts < 0:
            raise ConfigError("bleu_prompts must be >= 0")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError("max_tokens must be at least 2")

    def weight_settings(self) -> WeightSettings:
        """The teacher-weighting scheme's settings."""
        return WeightSettings(teacher_weights=None if self.teacher_weights is None else tuple(self.teacher_weights),
                              entropy_eps=self.entropy_eps, weight_beta=self.weight_beta,
                              weight_floor=self.weight_floor)

    def weighting(self) -> Weighting:
        """The checked teacher-weighting scheme (ConfigError in one line)."""
        return check_settings(self.teacher_weighting, self.weight_settings(),
                              len(self.teachers) + len(self.teacher_data))
