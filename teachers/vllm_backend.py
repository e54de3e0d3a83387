"""vLLM teacher backend (optional extra `[vllm]`): top-k log-probs through `prompt_logprobs`.

Packed token ids go in as `TokensPrompt(prompt_token_ids=ids)` with
`SamplingParams(max_tokens=1, prompt_logprobs=k, logprobs=k, detokenize=False)`. For a window of L tokens:

    position t = 0 .. L-2  <-  RequestOutput.prompt_logprobs[t + 1]   (entry 0 is None: nothing predicts token 0)
    position L-1           <-  RequestOutput.outputs[0].logprobs[0]   (the one sampled step, same forward)

Each entry holds the k best tokens plus the actual next token (prompt token, or the sampled one), so it has
k or k+1 distinct ids; `FlatLogprobs` keeps the actual token as a leading duplicate. The mapping keeps
exactly the k highest log-probs (ties: vLLM rank, then id), which drops that extra token.

What vLLM cannot give is recorded, never faked:
- entropy: vLLM returns none. `entropy="estimate"` stores a lower bound computed from the top-k plus the
  tail mass (see `entropy_bounds`); `entropy="absent"` stores nothing.
- pooled hidden states: not available from the logprobs engine. `hidden_from="hf"` takes them from a second
  transformers pass (a `PooledSource`); otherwise none are stored.
- temperature: vLLM's logprobs are those of the raw logits (temperature 1), so only tau = 1 is accepted.

The actual next token's own entry gives `observed_logprob` (`observed_logprobs`): position t's is the prompt
token t+1's log-prob in `prompt_logprobs[t + 1]`, NaN at L-1 (as every cache stores it).

Values are fp32 log_softmax over the model's vocab (vllm/v1/sample/sampler.py `compute_logprobs`; prompt
positions in vllm/v1/worker/gpu_model_runner.py use the same function on the unprocessed logits).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol

import numpy as np

from common.errors import ConfigError
from storage.manifest import TeacherInfo
from storage.records import TeacherTargets
from teachers.backend_options import HFOptions, VllmOptions
from teachers.errors import TeacherLoadError

LOGPROBS_MODE = "raw_logprobs"

ENTROPY_NOTE = (
    "entropy_kind=estimate: stored value is a LOWER BOUND on the full-vocab entropy, "
    "H_lo = -sum_topk p_i log p_i + H_tail_min, where H_tail_min packs the tail mass m = 1 - sum_topk p_i "
    "into tokens of probability p_k (the smallest top-k probability): n = floor(m / p_k) tokens at p_k plus "
    "one at m - n p_k (the most concentrated tail consistent with the top-k). The true entropy lies in "
    "[H_lo, H_topk + m log((V - k) / m)], V = vocab_size, the upper end being a uniform tail."
)
logger = logging.getLogger(__name__)
_LOGPROB_SLACK = 1e-3  # fp32 log_softmax of a near-certain token can come out a hair above 0


# ---- pure mapping: vLLM outputs -> top-k arrays ------------------------------------------------------------

def _flatten_positions(entries: Any, first: int, stop: int, where: str) -> tuple[np.ndarray, ...]:
    """Positions `first..stop-1` of a `PromptLogprobs`/`SampleLogprobs` as flat arrays plus per-position counts.

    Accepts both forms vLLM returns: `FlatLogprobs` (start_indices/end_indices over flat token_ids, logprobs,
    ranks) and `list[dict[int, Logprob] | None]`. Returns (ids int64 [n], logprobs float64 [n],
    ranks float64 [n] (inf where None), counts int64 [P]).
    """
    if hasattr(entries, "start_indices"):  # FlatLogprobs: no Python object per (position, rank)
        starts = np.asarray(entries.start_indices[first:stop], dtype=np.int64)
        counts = np.asarray(entries.end_indices[first:stop], dtype=np.int64) - starts
        total = int(counts.sum())
        idx = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
        ids = np.asarray(entries.token_ids, dtype=np.int64)[idx] if total else np.zeros(0, np.int64)
        lps = np.asarray(entries.logprobs, dtype=np.float64)[idx] if total else np.zeros(0)
        ranks = np.asarray(entries.ranks, dtype=np.float64)[idx] if total else np.zeros(0)  # None -> nan
    else:
        ids_l: list[int] = []
        lps_l: list[float] = []
        ranks_l: list[float] = []
        counts_l: list[int] = []
        for pos in range(first, stop):
            entry = entries[pos]
            if entry is None:
                raise RuntimeError(f"{where}: position {pos} has no log-probs")
            counts_l.append(len(entry))
            for token, lp in entry.items():
                ids_l.append(token)
                lps_l.append(lp.logprob)
                ranks_l.append(np.nan if lp.rank is None else lp.rank)
        ids = np.asarray(ids_l, dtype=np.int64)
        lps = np.asarray(lps_l, dtype=np.float64)
        ranks = np.asarray(ranks_l, dtype=np.float64)
        counts = np.asarray(counts_l, dtype=np.int64)
    return ids, lps, np.where(np.isnan(ranks), np.inf, ranks), counts


def select_topk(ids: np.ndarray, lps: np.ndarray, ranks: np.ndarray, counts: np.ndarray, k: int,
                where: str = "vLLM output") -> tuple[np.ndarray, np.ndarray]:
    """Per position, the k highest log-probs among its entries: ([P, k] int32, [P, k] float32).

    Entries of one position are `counts[p]` consecutive items of the flat arrays. Duplicate ids (FlatLogprobs
    repeats the actual token when it is in the top-k) count once; the actual token, when it is outside the
    top-k, has the lowest log-prob and is dropped. Ties are broken by vLLM's rank, then by token id.
    """
    num_pos = int(counts.shape[0])
    if num_pos == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    if np.isnan(lps).any():
        raise RuntimeError(f"{where}: NaN log-prob")
    width = max(int(counts.max()), k)
    col = np.arange(width)
    valid = col[None, :] < counts[:, None]  # [P, C]
    idx = np.where(valid, (np.cumsum(counts) - counts)[:, None] + col[None, :], 0)
    if ids.size == 0:
        ids, lps, ranks = np.zeros(1, np.int64), np.zeros(1), np.zeros(1)
    pid, plp, prk = ids[idx], lps[idx], ranks[idx]

    def reorder(order: np.ndarray) -> None:
        nonlocal pid, plp, prk, valid
        pid, plp, prk, valid = (np.take_along_axis(a, order, axis=1) for a in (pid, plp, prk, valid))

    # 1) the same id twice in a position: keep one (the higher log-prob)
    reorder(np.lexsort((-plp, pid, ~valid), axis=1))
    dup = np.zeros_like(valid)
    dup[:, 1:] = valid[:, 1:] & valid[:, :-1] & (pid[:, 1:] == pid[:, :-1])
    valid = valid & ~dup
    # 2) best first: valid, then log-prob descending, then rank, then id
    reorder(np.lexsort((pid, prk, -plp, ~valid), axis=1))
    have = valid.sum(axis=1)
    if (have < k).any():
        p = int(np.argmax(have < k))
        raise RuntimeError(f"{where}: position {p} has {int(have[p])} distinct log-probs, expected at least "
                           f"k={k} (the engine's max_logprobs must be >= k)")
    return pid[:, :k].astype(np.int32), plp[:, :k].astype(np.float32)


def map_request_output(output: Any, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One `vllm.RequestOutput` for a window of L tokens -> (topk_ids [L, k] int32, topk_logprobs [L, k] float32).

    Row t is the distribution of the token after position t: `prompt_logprobs[t + 1]` for t < L - 1 and
    the sampled step's `outputs[0].logprobs[0]` for t = L - 1. Rows are sorted by descending log-prob.
    """
    prompt = output.prompt_token_ids
    plp = output.prompt_logprobs
    where = f"vLLM request {getattr(output, 'request_id', '?')}"
    if plp is None:
        raise RuntimeError(f"{where}: no prompt_logprobs (request made without prompt_logprobs=k)")
    if len(plp) != len(prompt):
        raise RuntimeError(f"{where}: {len(plp)} prompt_logprobs entries for {len(prompt)} prompt tokens")
    if len(prompt) > 0 and plp[0]:  # None (list form) or {} (FlatLogprobs) for the first token
        raise RuntimeError(f"{where}: prompt_logprobs[0] is not empty")
    if not output.outputs or output.outputs[0].logprobs is None or len(output.outputs[0].logprobs) < 1:
        raise RuntimeError(f"{where}: no logprobs for the sampled step (request made without logprobs=k)")
    p_ids, p_lps, p_rks, p_cnt = _flatten_positions(plp, 1, len(plp), where)
    s_ids, s_lps, s_rks, s_cnt = _flatten_positions(output.outputs[0].logprobs, 0, 1, where)
    ids, lps = select_topk(np.concatenate([p_ids, s_ids]), np.concatenate([p_lps, s_lps]),
                           np.concatenate([p_rks, s_rks]), np.concatenate([p_cnt, s_cnt]), k, where)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise RuntimeError(f"{where}: token id outside the vocab [0, {vocab_size})")
    if lps.size and lps.max() > _LOGPROB_SLACK:
        raise RuntimeError(f"{where}: log-prob {float(lps.max())} > 0; not a log-probability (logprobs_mode?)")
    return ids, lps


def observed_logprobs(output: Any) -> np.ndarray:
    """[L] float32 log-probs of each prompt token t+1 at position t (the `observed_logprob` column) from one
    `vllm.RequestOutput`; NaN at position L-1 (its next token lies outside the window) and wherever the entry
    lacks the prompt token (vLLM always includes it)."""
    prompt = np.asarray(output.prompt_token_ids, dtype=np.int64)
    out = np.full(len(prompt), np.nan, dtype=np.float32)
    if len(prompt) < 2:
        return out
    where = f"vLLM request {getattr(output, 'request_id', '?')}"
    ids, lps, _, counts = _flatten_positions(output.prompt_logprobs, 1, len(prompt), where)
    row = np.repeat(np.arange(len(prompt) - 1), counts)  # [n] position t of each flattened entry
    hit = np.flatnonzero(ids == prompt[1:][row])
    first = hit[np.unique(row[hit], return_index=True)[1]]  # FlatLogprobs may repeat the token: its first entry
    out[row[first]] = lps[first]
    return out


def entropy_bounds(topk_logprobs: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the full-vocab entropy (nats) from top-k log-probs [..., k]: (lower, upper), float64.

    Tail mass m = 1 - sum p_i over the V - k other tokens, each at most p_min (the smallest top-k p).
    lower: tail packed into floor(m / p_min) tokens at p_min plus the remainder (minimum entropy under that
    cap; at least -m log m). upper: tail spread uniformly, m log((V - k) / m).
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    k = lp.shape[-1]
    p = np.exp(lp)
    h_top = -np.where(p > 0, p * lp, 0.0).sum(axis=-1)
    m = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    n_tail = vocab_size - k
    if n_tail <= 0:
        return h_top, h_top.copy()
    p_min = p.min(axis=-1)
    cap = np.where(p_min > 0, p_min, m)  # a zero in the top-k means a zero tail; -m log m stays a bound
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(m > 0, np.minimum(np.floor(m / np.where(cap > 0, cap, 1.0)), n_tail), 0.0)
        r = np.clip(m - n * cap, 0.0, None)
        tail_lo = -np.where(n > 0, n * cap * np.log(np.where(cap > 0, cap, 1.0)), 0.0) \
            - np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
        tail_hi = np.where(m > 0, m * np.log(n_tail / np.where(m > 0, m, 1.0)), 0.0)
    return h_top + tail_lo, h_top + tail_hi


class PooledSource(Protocol):
    """Where pooled hidden states come from when the logits come from vLLM (e.g. a transformers pass)."""

    pooled_dims: dict[int, int]
    """layer -> hidden size."""

    def pooled(self, input_ids: np.ndarray) -> dict[int, np.ndarray]:
        """[B, L] int32 -> {layer: [B, d] float32} mean-pooled hidden states."""
        ...


class LogprobEngine(Protocol):
    """The part of vLLM the backend needs: one `RequestOutput` per prompt, in prompt order."""

    def generate_logprobs(self, prompts: list[list[int]], k: int) -> list[Any]: ...


class VllmEngine:
    """Thin wrapper over `vllm.LLM` (imported here only). One engine per process; TP workers are vLLM's."""

    def __init__(self, *, model: str, revision: str | None, dtype: str, seq_len: int, top_k: int,
                 options: VllmOptions, tokenizer: str | None = None, trust_remote_code: bool = False) -> None:
        import vllm
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        supported = {f.name for f in dataclasses.fields(EngineArgs)}
        kwargs: dict[str, Any] = dict(
            model=model, tokenizer=tokenizer or model, revision=revision, dtype=dtype, seed=options.seed,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=seq_len + 1,  # L prompt tokens + the one sampled step
            max_logprobs=max(top_k, 1),  # a larger request is an error in vLLM, never a silent truncation
            enforce_eager=options.enforce_eager,
            enable_prefix_caching=False,  # prompt-logprob requests cannot use it anyway
            trust_remote_code=trust_remote_code,
        )
        if options.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        # Older releases (< 0.10) have no logprobs_mode; their V1 sampler already returned raw log-probs.
        if "logprobs_mode" in supported:
            kwargs["logprobs_mode"] = LOGPROBS_MODE
            self.logprobs_mode = LOGPROBS_MODE
        else:
            self.logprobs_mode = "default (raw log-probs; this vLLM has no logprobs_mode)"
        self.version = str(getattr(vllm, "__version__", "unknown"))
        try:
            self.llm = LLM(**kwargs)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TeacherLoadError(f"vLLM cannot load teacher {model!r}: {first}") from None

    def generate_logprobs(self, prompts: list[list[int]], k: int) -> list[Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params: dict[str, Any] = dict(
            max_tokens=1, logprobs=k, prompt_logprobs=k, detokenize=False,
            # temperature 1, no top-k/top-p/penalties: processed and raw log-probs coincide for the sampled step
            temperature=1.0, top_p=1.0,
        )
        if hasattr(SamplingParams(), "flat_logprobs"):
            params["flat_logprobs"] = True  # flat lists instead of one Logprob object per (position, rank)
        sp = SamplingParams(**params)
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)


class VllmBackend:
    """`TeacherBackend` over vLLM: `info()`, `vocab_size`, `entropy_kind`, `pooled_dims`, `notes`, `compute()`."""

    def __init__(self, teacher: Any, seq_len: int, options: VllmOptions | None = None, *,
                 engine: LogprobEngine | None = None, pooled_from: PooledSource | None = None,
                 vocab_size: int | None = None, model_config: Any = None) -> None:
        """`teacher` is a `teachers.config.TeacherConfig`. `engine`, `vocab_size` and `model_config` are
        built from it when not given (tests pass stand-ins); `pooled_from` is required for `hidden_from=hf`."""
        self.options = options or VllmOptions()
        if teacher.temperature != 1.0:
            raise ConfigError(
                f"the vllm backend returns log-probs at temperature 1 only, got temperature {teacher.temperature}; "
                "use --backend hf for another temperature"
            )
        if teacher.gguf_file:
            raise TeacherLoadError("the vllm backend does not load GGUF weights here; use --backend hf")
        if self.options.hidden_from == "hf" and pooled_from is None:
            raise ConfigError("hidden_from=hf needs a transformers pass for the pooled states (pooled_from)")
        if self.options.hidden_from == "none" and pooled_from is not None:
            raise ConfigError("pooled_from given but hidden_from is 'none'")
        self.teacher = teacher
        self.seq_len = seq_len
        self.top_k = int(teacher.top_k)
        self.pooled_from = pooled_from
        if model_config is None:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(
                teacher.path, revision=teacher.revision, trust_remote_code=teacher.trust_remote_code
            )
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        self._model_config = text_config
        self.vocab_size = int(vocab_size if vocab_size is not None else text_config.vocab_size)
        if self.top_k > self.vocab_size:
            raise ConfigError(f"top_k {self.top_k} exceeds the teacher's vocab size {self.vocab_size}")
        self.dtype = "bfloat16" if teacher.dtype == "auto" else teacher.dtype  # the project's auto on GPU
        if engine is None:
            engine = VllmEngine(model=teacher.path, revision=teacher.revision, dtype=self.dtype, seq_len=seq_len,
                                top_k=self.top_k, options=self.options, tokenizer=teacher.tokenizer,
                                trust_remote_code=teacher.trust_remote_code)
        self.engine = engine
        self.entropy_kind = "estimate" if self.options.entropy == "estimate" else "absent"
        self.observed_logprob = True  # the prompt tokens' own entries (observed_logprobs)
        self.pooled_dims: dict[int, int] = dict(pooled_from.pooled_dims) if pooled_from is not None else {}

    @property
    def notes(self) -> dict[str, Any]:
        """Facts for the manifest's `notes`: vLLM version, logprobs mode, how entropy and pooling were made."""
        notes: dict[str, Any] = {
            "vllm_version": getattr(self.engine, "version", "unknown"),
            "vllm_logprobs_mode": getattr(self.engine, "logprobs_mode", "unknown"),
            "vllm_logprobs": (
                "fp32 log_softmax of the unprocessed logits over the full vocab, before temperature, penalties "
                "and logits processors (prompt positions and the final sampled step alike); "
                "last position taken from the sampled step's logprobs"
            ),
            "vllm_tensor_parallel_size": self.options.tensor_parallel_size,
            "pooled": "transformers second pass (hidden_from=hf)" if self.pooled_from is not None
            else "absent: vLLM's logprobs engine gives no hidden states (pool_layers ignored; "
            "--backend-option hidden_from=hf computes them with transformers)",
        }
        notes["entropy"] = ENTROPY_NOTE if self.entropy_kind == "estimate" else "absent: vLLM gives no entropy"
        return notes

    def info(self) -> TeacherInfo:
        cfg = self._model_config
        return TeacherInfo(
            name=self.teacher.name, path=self.teacher.path, revision=self.teacher.revision,
            dtype=self.dtype, backend="vllm",
            num_layers=getattr(cfg, "num_hidden_layers", None), hidden_size=getattr(cfg, "hidden_size", None),
        )

    def compute(self, batch: Any) -> TeacherTargets:
        """`batch` is a `PackedBatch` (`seq_ids [B] int64`, `input_ids [B, L] int32`)."""
        input_ids = np.ascontiguousarray(batch.input_ids, dtype=np.int32)  # [B, L]
        top = int(input_ids.max(initial=0))
        if top >= self.vocab_size:
            raise TeacherLoadError(f"token id {top} is outside the teacher's vocab ({self.vocab_size}); "
                                   "the tokenizer does not belong to this teacher")
        prompts = [row.tolist() for row in input_ids]
        outputs = self.engine.generate_logprobs(prompts, self.top_k)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        ids, lps, ents, observed = [], [], [], []
        for row, out in zip(prompts, outputs, strict=True):
            if list(out.prompt_token_ids) != row:  # outputs must come back in prompt order
                raise RuntimeError("vLLM output does not match its prompt (order or tokenisation changed)")
            topk_ids, topk_lps = map_request_output(out, self.top_k, self.vocab_size)
            ids.append(topk_ids)
            lps.append(topk_lps)
            observed.append(observed_logprobs(out))
            if self.entropy_kind == "estimate":
                ents.append(entropy_bounds(topk_lps, self.vocab_size)[0].astype(np.float32))
        pooled = self.pooled_from.pooled(input_ids) if self.pooled_from is not None else {}
        targets = TeacherTargets(
            seq_ids=np.asarray(batch.seq_ids, dtype=np.int64),
            input_ids=input_ids,
            topk_ids=np.stack(ids),
            topk_logprobs=np.stack(lps),
            entropy=np.stack(ents) if ents else None,
            pooled={layer: np.asarray(a, dtype=np.float32) for layer, a in pooled.items()},
            observed_logprob=np.stack(observed),
        )
        targets.validate()
        return targets


def create_backend(cfg: Any, *, seq_len: int) -> VllmBackend:
    """Entry point used by teachers.backends.create_backend. With `hidden_from=hf` the pooled states come
    from a transformers copy of the teacher (teachers.hf_backend), loaded next to the vLLM engine."""
    options = cfg.backend_options
    if not isinstance(options, VllmOptions):  # TeacherConfig gives each backend its own options class
        raise ConfigError(f"the vllm backend needs VllmOptions, got {type(options).__name__}")
    pooled_from = None
    if options.hidden_from == "hf":
        from teachers.hf_backend import HFBackend

        # the same teacher on the transformers backend, which has options of its own (none)
        pooled_from = HFBackend(dataclasses.replace(cfg, backend="hf", backend_options=HFOptions()))
    elif cfg.pool_layers:
        logger.warning("vllm backend: pool_layers %s ignored (no hidden states without --backend-option hidden_from=hf)",
                       list(cfg.pool_layers))
    return VllmBackend(cfg, seq_len, options, pooled_from=pooled_from)
