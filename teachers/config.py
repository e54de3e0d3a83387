"""Configuration of stage one (`precompute`): corpus, teacher, storage, and the run that ties them.

The CLI maps its options onto these dataclasses one to one; `tiny()` is a seconds-long CPU preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.corpus import CorpusConfig
from common.devices import check_device
from common.errors import ConfigError
from common.params import check_choice, check_finite, check_positive
from storage.formats import FORMATS
from storage.manifest import LOGPROB_DTYPES, MANTISSA_BITS, MAX_SAMPLES, TARGET_KINDS
from teachers.backend_options import BACKEND_OPTIONS, BackendOptions, options_for

BACKENDS = tuple(BACKEND_OPTIONS)
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_CHOICES = ("auto", "on", "off")
HEAD_KERNELS = ("auto", "torch", "triton")


@dataclass(kw_only=True)
class TeacherConfig:
    """The teacher model and the targets computed from it."""

    path: str
    """Local directory or hub id of the teacher's weights."""
    name: str | None = None
    """Label for the teacher (manifest, logs); defaults to the last component of `path`."""
    gguf_file: str | None = None
    """GGUF file name inside `path` when the weights are GGUF (dequantised on load)."""
    revision: str | None = None
    """Hub revision of the weights."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to the teacher's own."""
    backend: str = "hf"
    """`hf` (transformers; exact entropy and pooled states) or `vllm` (optional extra)."""
    dtype: str = "auto"
    """Compute dtype: `auto` (bfloat16 on GPU, float32 on CPU), `float32`, `bfloat16`, `float16`."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`."""
    batch_size: int = 8
    """Sequences per teacher forward."""
    batch_tokens: int | None = None
    """If set, sequences per forward = max(1, batch_tokens // seq_len), overriding `batch_size`."""
    top_k: int = 64
    """Top-k next-token log-probs stored per position (`targets` topk)."""
    targets: str = "topk"
    """`topk`: the top_k largest log-probs per position (biased: the tail is lumped); `sampled`: `samples`
    draws from the full softmax, stored as distinct ids and counts (an unbiased estimate; teachers/sampling.py)."""
    samples: int = 16
    """Draws per position when `targets` is `sampled` (1..65535)."""
    temperature: float = 1.0
    """Temperature tau: stored log-probs and entropy are those of softmax(logits / tau)."""
    head_chunk_size: int = 1024
    """Tokens per lm_head chunk in the targets head (peak memory ~ 2 x chunk x vocab x 4 bytes)."""
    compile_head: str = "auto"
    """`on`: logsumexp and entropy in the head through torch.compile (fused; compiles once per process, on
    CPU ~5 s with inductor's cache warm, ~17 s cold); `off`: eager; `auto`: on for CUDA devices when Triton is installed, off on CPU (where short runs do
    not repay the compile).
    Same results to float32 rounding."""
    head_kernel: str = "auto"
    """`torch`: the chunked head of teachers/head.py (lse/entropy compiled per `compile_head`); `triton`: the
    fused Triton head of teachers/fused_head.py, which never writes [chunk, vocab] logits (CUDA only); `auto`:
    triton on CUDA devices when Triton is installed, torch elsewhere. Same outputs (the fused head skips the
    bf16 rounding of the logits, so it is slightly closer to the float64 reference)."""
    pool_layers: list[int] = field(default_factory=lambda: [-1])
    """Decoder blocks whose outputs are mean-pooled per sequence (0-based, negative from the end); [] for none."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models that need it)."""
    backend_options: BackendOptions | dict[str, object] | None = None
    """Settings only `backend` has (`--backend-option KEY=VALUE`, e.g. vllm's `tensor_parallel_size=2`): after
    construction always the options object of `backend` (teachers/backend_options.py); a dict (the command
    line, a replayed config.json) or None (the defaults) is turned into it, refusing unknown keys."""
    align_tokenizer: str | None = None
    """The student's tokenizer S (directory or hub id; with `align_gguf_file`, the directory holding it) when
    the teacher has another tokenizer: packing uses S and the targets are written in S's token space
    (teachers/align.py). None: the teacher's own tokenizer and token space."""
    align_gguf_file: str | None = None
    """GGUF file inside `align_tokenizer` whose tokenizer is S."""

    def __post_init__(self) -> None:
        check_finite(self)
        if not self.path:
            raise ConfigError("teacher path must not be empty")
        if self.name is None:
            self.name = self.path.rstrip("/").split("/")[-1] or self.path
        check_choice("backend", self.backend, BACKENDS)
        self.backend_options = options_for(self.backend, self.backend_options)
        check_choice("dtype", self.dtype, DTYPES)
        check_device("device", self.device)
        check_positive("batch_size", self.batch_size)
        check_positive("batch_tokens", self.batch_tokens, optional=True)
        check_positive("top_k", self.top_k)
        check_choice("targets", self.targets, TARGET_KINDS)
        check_positive("samples", self.samples)
        if self.samples > MAX_SAMPLES:
            raise ConfigError(f"samples must be at most {MAX_SAMPLES} (counts are stored as uint16), got {self.samples}")
        if self.targets == "sampled" and self.backend != "hf":
            raise ConfigError(f"targets 'sampled' needs the full softmax, which the {self.backend} backend does not "
                              "give; use --backend hf")
        check_positive("head_chunk_size", self.head_chunk_size)
        check_choice("compile_head", self.compile_head, COMPILE_CHOICES)
        check_choice("head_kernel", self.head_kernel, HEAD_KERNELS)
        if self.targets == "sampled" and self.head_kernel == "triton":
            raise ConfigError("targets 'sampled' draws in the torch head; the fused Triton head computes top-k only "
                              "(use --head-kernel torch or auto)")
        if not (isinstance(self.temperature, (int, float)) and 0.01 <= self.temperature <= 100):
            # outside this range float32 softmax(logits / temperature) is one-hot or uniform, not a target
            raise ConfigError(f"temperature must be in [0.01, 100], got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if len(set(self.pool_layers)) != len(self.pool_layers):
            raise ConfigError(f"pool_layers has duplicates: {self.pool_layers}")
        if self.align_gguf_file is not None and self.align_tokenizer is None:
            raise ConfigError("--align-gguf-file needs --align-tokenizer (the directory holding the file)")
        if self.align_tokenizer is not None and self.backend != "hf":
            raise ConfigError(f"the {self.backend} backend cannot align tokenizers (--align-tokenizer); "
                              "use --backend hf")


@dataclass(kw_only=True)
class StorageConfig:
    """Where and how the shards are written."""

    output: str
    """Teacher directory (local path or fsspec URL) receiving shards and manifest."""
    format: str = "parquet"
    """Shard format: a name of storage/formats.py's registry (`FORMATS`)."""
    shard_size: int = 256
    """Sequences per shard file (the last shard may hold fewer)."""
    logprob_dtype: str = "float16"
    """Storage dtype of the top-k log-probs: `float16` or `float32`."""
    logprob_mantissa_bits: int | None = None
    """Mantissa bits kept per stored log-prob, rounded to nearest (1..10 for float16, 1..23 for float32).
    None or the maximum: the dtype's full precision. Fewer bits compress better at a measured fidelity cost
    (benchmarks/fidelity.py, RESULTS.md)."""

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("output must not be empty")
        check_choice("format", self.format, FORMATS)
        check_choice("logprob_dtype", self.logprob_dtype, LOGPROB_DTYPES)
        bits, full = self.logprob_mantissa_bits, MANTISSA_BITS[self.logprob_dtype]
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= full):
            raise ConfigError(f"logprob_mantissa_bits must be in 1..{full} for {self.logprob_dtype}, got {bits!r}")
        check_positive("shard_size", self.shard_size)

    @property
    def manifest_mantissa_bits(self) -> int | None:
        """The manifest's `logprob_mantissa_bits`: None when the dtype keeps its full precision."""
        bits = self.logprob_mantissa_bits
        return None if bits == MANTISSA_BITS[self.logprob_dtype] else bits


@dataclass(kw_only=True)
class PrecomputeConfig:
    """One stage-one run: one teacher over one corpus, possibly one slice of many nodes."""

    corpus: CorpusConfig
    """Documents to pack."""
    teacher: TeacherConfig
    """Teacher and targets."""
    storage: StorageConfig
    """Output shards."""
    seq_len: int = 2048
    """Tokens per packed sequence (L)."""
    num_slices: int | None = None
    """Number of node slices (None: from WORLD_SIZE / SLURM_NTASKS, else 1)."""
    slice_index: int | None = None
    """This node's slice (None: from RANK / SLURM_PROCID, else 0)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check_positive("seq_len", self.seq_len)
        if self.seq_len < 2:
            raise ConfigError("seq_len must be at least 2")
        check_positive("num_slices", self.num_slices, optional=True)
        if self.slice_index is not None and (not isinstance(self.slice_index, int) or self.slice_index < 0):
            raise ConfigError(f"slice_index must be a non-negative integer, got {self.slice_index!r}")
        if self.num_slices is not None and self.slice_index is not None and self.slice_index >= self.num_slices:
            raise ConfigError(f"slice_index {self.slice_index} must be < num_slices {self.num_slices}")

    @property
    def slots(self) -> int:
        """Id slots stored per position: top_k, or samples for sampled targets."""
        return self.teacher.samples if self.teacher.targets == "sampled" else self.teacher.top_k

    @property
    def batch_size(self) -> int:
        """Sequences per teacher forward after applying `batch_tokens`."""
        if self.teacher.batch_tokens is not None:
            return max(1, self.teacher.batch_tokens // self.seq_len)
        return self.teacher.batch_size


def tiny(teacher: str, dataset: str, output: str, **overrides: object) -> PrecomputeConfig:
    """A CPU preset that runs in seconds on a tiny teacher: seq_len 32, k 8, shards of 4 sequences.

    `overrides` may set any PrecomputeConfig field (e.g. `seq_len=64`, `num_slices=2`).
    """
    kwargs: dict[str, object] = dict(
        corpus=CorpusConfig(dataset=dataset),
        teacher=TeacherConfig(path=teacher, name="tiny", batch_size=4, top_k=8, head_chunk_size=64, device="cpu"),
        storage=StorageConfig(output=output, shard_size=4),
        seq_len=32,
        num_slices=1,
        slice_index=0,
        progress=False,
    )
    kwargs.update(overrides)
    return PrecomputeConfig(**kwargs)  # type: ignore[arg-type]
