"""vLLM backend: the output mapping on vLLM-shaped outputs, the entropy bound, and (GPU only) real vLLM.

The stand-in classes below mirror vLLM's own definitions field for field:
- `Logprob`, `FlatLogprobs`, `append_logprobs_for_next_position`, `create_prompt_logprobs`:
  vllm/logprobs.py
- `CompletionOutput`, `RequestOutput`: vllm/outputs.py
- how one position's entries are built (actual token first, then the top-k; ranks = (rank of actual,
  1..k); rank counts log-probs >= the actual one): `Sampler.gather_logprobs` in vllm/v1/sample/sampler.py
as of vLLM main after PR #28914 (flat_logprobs moved into SamplingParams; the v0.12 series).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.packing import PackedBatch
from teachers.backend_options import HFOptions, VllmOptions
from teachers.errors import TeacherLoadError
from teachers.vllm_backend import VllmBackend, entropy_bounds, map_request_output


# ---- stand-ins for vLLM's classes (see module docstring for the source files) ---------------------------
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, logprobs_one_position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        if logprobs_one_position:
            for token_id, logprob in logprobs_one_position.items():
                self.token_ids.append(token_id)
                self.logprobs.append(logprob.logprob)
                self.ranks.append(logprob.rank)
                self.decoded_tokens.append(logprob.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def append_fast(self, token_ids, logprobs, ranks, decoded_tokens) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, logprob, rank, decoded_token in zip(token_ids, logprobs, ranks, decoded_tokens, strict=False):
            self.token_ids.append(token_id)
            self.logprobs.append(logprob)
            self.ranks.append(rank)
            self.decoded_tokens.append(decoded_token)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index: int) -> dict[int, Logprob]:
        return {
            self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i], self.decoded_tokens[i])
            for i in range(self.start_indices[index], self.end_indices[index])
        }


def create_prompt_logprobs(flat_logprobs: bool):
    logprobs = FlatLogprobs() if flat_logprobs else []
    logprobs.append(None)  # logprob of the first prompt token is None
    return logprobs


def append_logprobs_for_next_position(request_logprobs, token_ids, logprobs, decoded_tokens, rank, num_logprobs):
    # ranks and decoded_tokens may be longer iterators (itertools.repeat), as in vLLM: zip is not strict
    topk_ranks = range(1, num_logprobs + 1)
    ranks = itertools.chain((rank,), topk_ranks)
    if isinstance(request_logprobs, FlatLogprobs):
        request_logprobs.append_fast(token_ids, logprobs, ranks, decoded_tokens)
    else:
        request_logprobs.append({
            token_id: Logprob(logprob=logprob, rank=rank, decoded_token=token)
            for token_id, logprob, rank, token in zip(token_ids, logprobs, ranks, decoded_tokens, strict=False)
        })


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: object
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(self, request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished, **kwargs):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished


# ---- a vLLM-shaped engine run over given logits -----------------------------------------------------------
def _gather(row_logprobs: np.ndarray, token: int, k: int):
    """Sampler.gather_logprobs for one row: ids [actual, top-k], logprobs alike, rank of actual (count >=)."""
    top = np.argsort(-row_logprobs, kind="stable")[:k]
    rank = int((row_logprobs >= row_logprobs[token]).sum())
    ids = [token] + top.tolist()
    lps = [float(np.float32(row_logprobs[token]))] + [float(np.float32(v)) for v in row_logprobs[top]]
    return ids, lps, rank


def fake_request_output(prompt: list[int], logits: np.ndarray, k: int, *, flat: bool, sampled: int | None = None,
                        request_id: str = "0") -> RequestOutput:
    """What vLLM returns for `prompt` when the model's logits after each position are `logits` [L, V]."""
    logprobs = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
    plp = create_prompt_logprobs(flat)
    for j in range(1, len(prompt)):
        ids, lps, rank = _gather(logprobs[j - 1], prompt[j], k)
        append_logprobs_for_next_position(plp, ids, lps, itertools.repeat(None), rank, k)
    token = int(np.argmax(logprobs[-1])) if sampled is None else sampled
    slp = FlatLogprobs() if flat else []
    ids, lps, rank = _gather(logprobs[-1], token, k)
    append_logprobs_for_next_position(slp, ids, lps, itertools.repeat(None), rank, k)
    out = CompletionOutput(index=0, text="", token_ids=[token], cumulative_logprob=lps[0], logprobs=slp,
                           finish_reason="length")
    return RequestOutput(request_id, None, list(prompt), plp, [out], True)


def _peaky_logits(rng: np.random.Generator, length: int, vocab: int, scale: float = 4.0) -> np.ndarray:
    return rng.standard_normal((length, vocab)) * scale


# ---- mapping --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_mapping_matches_dense_reference(flat: bool) -> None:
    rng = np.random.default_rng(0)
    vocab, k, length = 50, 5, 16
    logits = _peaky_logits(rng, length, vocab)
    prompt = rng.integers(0, vocab, size=length).tolist()
    ids, lps = map_request_output(fake_request_output(prompt, logits, k, flat=flat), k, vocab)

    dense = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)  # [L, V]
    ref_lps, ref_ids = torch.topk(dense, k, dim=-1)
    assert ids.shape == (length, k) and ids.dtype == np.int32 and lps.dtype == np.float32
    torch.testing.assert_close(torch.as_tensor(ids, dtype=torch.int64), ref_ids)
    torch.testing.assert_close(torch.as_tensor(lps, dtype=torch.float64), ref_lps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flat", [False, True])
def test_observed_logprobs_are_the_prompt_tokens_entries(flat: bool) -> None:
    """Each prompt token's own log-prob, whether it is in the top-k or the extra (k+1)-th entry; NaN last."""
    from teachers.vllm_backend import observed_logprobs

    rng = np.random.default_rng(2)
    vocab, k, length = 40, 3, 12
    logits = _peaky_logits(rng, length, vocab)
    prompt = rng.integers(0, vocab, size=length).tolist()
    got = observed_logprobs(fake_request_output(prompt, logits, k, flat=flat))
    dense = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)  # [L, V]
    want = dense[:-1].gather(-1, torch.as_tensor(prompt[1:])[:, None])[:, 0]
    assert got.shape == (length,) and np.isnan(got[-1])
    torch.testing.assert_close(torch.as_tensor(got[:-1], dtype=torch.float64), want, atol=1e-6, rtol=0)


def test_k_plus_one_entry_drops_the_actual_token() -> None:
    vocab, k = 20, 3
    logits = np.zeros((2, vocab))
    logits[0, [4, 5, 6]] = [5.0, 4.0, 3.0]  # top-3 after token 0; the actual next token (9) is not among them
    logits[1, 7] = 6.0
    out = fake_request_output([1, 9], logits, k, flat=False)
    assert len(out.prompt_logprobs[1]) == k + 1 and out.prompt_logprobs[1][9].rank > k  # precondition
    ids, lps = map_request_output(out, k, vocab)
    assert ids[0].tolist() == [4, 5, 6]
    assert np.all(np.diff(lps[0]) <= 0)


def test_flat_duplicate_of_actual_token_counts_once() -> None:
    vocab, k = 20, 3
    logits = np.zeros((2, vocab))
    logits[0, [4, 5, 6]] = [5.0, 4.0, 3.0]
    out = fake_request_output([1, 5], logits, k, flat=True)  # actual token 5 is in the top-3
    start, end = out.prompt_logprobs.start_indices[1], out.prompt_logprobs.end_indices[1]
    assert out.prompt_logprobs.token_ids[start:end] == [5, 4, 5, 6]  # precondition: leading duplicate
    ids, _ = map_request_output(out, k, vocab)
    assert ids[0].tolist() == [4, 5, 6]


@pytest.mark.parametrize("flat", [False, True])
def test_first_prompt_entry_is_empty_and_checked(flat: bool) -> None:
    rng = np.random.default_rng(1)
    out = fake_request_output([1, 2, 3], _peaky_logits(rng, 3, 10), 2, flat=flat)
    assert not out.prompt_logprobs[0]  # None in the list form, {} from FlatLogprobs
    map_request_output(out, 2, 10)
    if not flat:
        out.prompt_logprobs[0] = {3: Logprob(-0.1, 1)}
        with pytest.raises(RuntimeError, match=r"prompt_logprobs\[0\]"):
            map_request_output(out, 2, 10)


@pytest.mark.parametrize("flat", [False, True])
def test_last_position_comes_from_the_sampled_step(flat: bool) -> None:
    vocab, k = 12, 2
    logits = np.zeros((3, vocab))
    logits[2, [10, 11]] = [9.0, 8.0]  # only the distribution after the last prompt token prefers 10, 11
    out = fake_request_output([0, 1, 2], logits, k, flat=flat, sampled=3)  # a sampled token outside the top-k
    ids, lps = map_request_output(out, k, vocab)
    assert ids[2].tolist() == [10, 11]
    ref = torch.log_softmax(torch.as_tensor(logits[2]), dim=-1)[[10, 11]]
    torch.testing.assert_close(torch.as_tensor(lps[2], dtype=torch.float64), ref, atol=1e-6, rtol=0)
    out.outputs[0].logprobs = None
    with pytest.raises(RuntimeError, match="sampled step"):
        map_request_output(out, k, vocab)


def test_fewer_entries_than_k_is_an_error() -> None:
    rng = np.random.default_rng(2)
    out = fake_request_output([1, 2, 3], _peaky_logits(rng, 3, 10), 2, flat=False)
    with pytest.raises(RuntimeError, match="max_logprobs"):
        map_request_output(out, 4, 10)


# ---- entropy estimate -----------------------------------------------------------------------------------
def test_entropy_bounds_hold_against_dense_float64_reference() -> None:
    rng = np.random.default_rng(3)
    vocab, k = 1000, 8
    logits = np.concatenate([rng.standard_normal((200, vocab)) * s for s in (0.5, 2.0, 5.0, 12.0)])
    logits[:50] -= 4.0 * np.log1p(np.arange(vocab))  # Zipf-like rows
    dense = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    true_h = -(dense.exp() * dense).sum(-1).numpy()
    topk = torch.topk(dense, k, dim=-1).values.numpy()
    lower, upper = entropy_bounds(topk, vocab)
    assert np.all(lower <= true_h + 1e-9) and np.all(true_h <= upper + 1e-9)
    assert np.all(lower >= -(np.exp(topk) * topk).sum(-1) - 1e-12)  # never below the top-k part alone
    # from fp32 log-probs (what vLLM returns) the bound still holds up to fp32 rounding
    lower32, upper32 = entropy_bounds(topk.astype(np.float32), vocab)
    assert np.all(lower32 <= true_h + 1e-4) and np.all(true_h <= upper32 + 1e-4)


def test_entropy_bounds_are_tight_at_their_extremes() -> None:
    vocab, k = 10, 2
    packed = np.array([0.5, 0.2, 0.2, 0.1] + [0.0] * 6)  # tail packed at p_min = 0.2: lower bound is exact
    uniform = np.array([0.6, 0.2] + [0.025] * 8)  # uniform tail: upper bound is exact
    for p, which in ((packed, 0), (uniform, 1)):
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.log(p)
            true_h = -np.sum(np.where(p > 0, p * lp, 0.0))
        bounds = entropy_bounds(lp[None, :k], vocab)
        assert bounds[which][0] == pytest.approx(true_h, abs=1e-12)


# ---- backend over a stand-in engine ---------------------------------------------------------------------
class DenseEngine:
    """Returns vLLM-shaped outputs computed from a transformers model's logits (float64 reference)."""

    version = "stand-in"
    logprobs_mode = "raw_logprobs"

    def __init__(self, model, flat: bool) -> None:
        self.model, self.flat = model, flat

    def generate_logprobs(self, prompts: list[list[int]], k: int) -> list[RequestOutput]:
        with torch.no_grad():
            logits = self.model(torch.tensor(prompts)).logits.double().numpy()  # [B, L, V]
        return [fake_request_output(p, logits[i], k, flat=self.flat, request_id=str(i)) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers import make_tiny_teacher

    path = make_tiny_teacher(tmp_path_factory.mktemp("vllm") / "teacher", 96, seed=3, hidden_size=32)
    return str(path), AutoModelForCausalLM.from_pretrained(path).eval(), AutoConfig.from_pretrained(path)


def _teacher(path: str, **kw):
    from teachers.config import TeacherConfig

    return TeacherConfig(path=path, name="t", backend="vllm", top_k=kw.pop("top_k", 6), **kw)


@pytest.mark.parametrize("flat", [False, True])
def test_backend_compute_against_dense_model(tiny_model, flat: bool) -> None:
    path, model, config = tiny_model
    backend = VllmBackend(_teacher(path), 10, engine=DenseEngine(model, flat), model_config=config)
    rng = np.random.default_rng(4)
    batch = PackedBatch(seq_ids=np.array([7, 8, 9]), input_ids=rng.integers(0, 96, (3, 10)).astype(np.int32))
    out = backend.compute(batch)

    with torch.no_grad():
        dense = torch.log_softmax(model(torch.as_tensor(batch.input_ids, dtype=torch.long)).logits.double(), -1)
    ref_lps, ref_ids = torch.topk(dense, 6, dim=-1)
    torch.testing.assert_close(torch.as_tensor(out.topk_ids, dtype=torch.int64), ref_ids)
    torch.testing.assert_close(torch.as_tensor(out.topk_logprobs, dtype=torch.float64), ref_lps, atol=1e-5, rtol=0)
    # observed_logprob: the prompt token's own entry, NaN at the last position
    nxt = torch.as_tensor(batch.input_ids[:, 1:], dtype=torch.long)
    assert backend.observed_logprob and out.observed_logprob.dtype == np.float32
    assert np.isnan(out.observed_logprob[:, -1]).all()
    torch.testing.assert_close(torch.as_tensor(out.observed_logprob[:, :-1], dtype=torch.float64),
                               dense[:, :-1].gather(-1, nxt[..., None])[..., 0], atol=1e-5, rtol=0)
    true_h = -(dense.exp() * dense).sum(-1).numpy()
    upper = entropy_bounds(out.topk_logprobs, 96)[1]
    assert out.entropy is not None and np.all(out.entropy <= true_h + 1e-4) and np.all(true_h <= upper + 1e-4)
    assert backend.entropy_kind == "estimate" and backend.pooled_dims == {} and out.pooled == {}
    assert backend.info().backend == "vllm" and backend.vocab_size == 96
    assert "LOWER BOUND" in backend.notes["entropy"] and backend.notes["vllm_logprobs_mode"] == "raw_logprobs"


def test_backend_entropy_absent_and_pooled_source(tiny_model) -> None:
    path, model, config = tiny_model

    class MeanEmbeddings:  # a stand-in for the transformers pass that supplies pooled states
        pooled_dims = {0: 32}

        def pooled(self, input_ids):
            emb = model.get_input_embeddings()(torch.as_tensor(input_ids, dtype=torch.long))
            return {0: emb.mean(1).detach().numpy()}

    opts = VllmOptions(entropy="absent", hidden_from="hf")
    backend = VllmBackend(_teacher(path), 5, opts, engine=DenseEngine(model, True), model_config=config,
                          pooled_from=MeanEmbeddings())
    out = backend.compute(PackedBatch(seq_ids=np.array([0]), input_ids=np.arange(5, dtype=np.int32)[None]))
    assert out.entropy is None and backend.entropy_kind == "absent"
    assert out.pooled[0].shape == (1, 32) and backend.pooled_dims == {0: 32}


def test_backend_refuses_what_it_cannot_compute(tiny_model) -> None:
    path, model, config = tiny_model
    engine = DenseEngine(model, True)
    with pytest.raises(ConfigError, match="temperature"):
        VllmBackend(_teacher(path, temperature=2.0), 5, engine=engine, model_config=config)
    with pytest.raises(ConfigError, match="hidden_from=hf"):
        VllmBackend(_teacher(path), 5, VllmOptions(hidden_from="hf"), engine=engine, model_config=config)
    with pytest.raises(ConfigError, match="entropy"):
        VllmOptions(entropy="exact")
    with pytest.raises(TeacherLoadError, match="GGUF"):
        VllmBackend(_teacher(path, gguf_file="x.gguf"), 5, engine=engine, model_config=config)
    backend = VllmBackend(_teacher(path), 5, engine=engine, model_config=config)
    with pytest.raises(TeacherLoadError, match="outside the teacher's vocab"):
        backend.compute(PackedBatch(seq_ids=np.array([0]), input_ids=np.full((1, 5), 96, dtype=np.int32)))


def test_options_are_typed_per_backend() -> None:
    assert _teacher("x").backend_options == VllmOptions()  # options not given keep the defaults
    from teachers.config import TeacherConfig

    assert TeacherConfig(path="x").backend_options == HFOptions()
    opts = _teacher("x", backend_options={"tensor_parallel_size": 8, "entropy": "absent"}).backend_options
    assert (opts.tensor_parallel_size, opts.entropy, opts.hidden_from) == (8, "absent", "none")
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        _teacher("x", backend_options={"tensor_parallel_size": 0})
    with pytest.raises(ConfigError, match=r"vllm backend options: field tensor_parallel_size must be an integer, got \"2\""):
        _teacher("x", backend_options={"tensor_parallel_size": "2"})
    with pytest.raises(ConfigError, match="field enforce_eager must be true or false, got 1"):
        _teacher("x", backend_options={"enforce_eager": 1})
    with pytest.raises(ConfigError, match="VllmOptions .vllm backend. but the backend is 'hf'"):
        TeacherConfig(path="x", backend_options=VllmOptions())


def test_options_come_from_backend_option_flags() -> None:
    """`--backend-option KEY=VALUE` lands in TeacherConfig.backend_options and must reach the engine."""
    from teachers.commands import _options

    parsed = _options(None, None, ("tensor_parallel_size=4", "hidden_from=hf", "enforce_eager=true"))
    opts = _teacher("x", backend_options=parsed).backend_options
    assert (opts.tensor_parallel_size, opts.hidden_from, opts.enforce_eager) == (4, "hf", True)
    with pytest.raises(ConfigError, match="unknown vllm backend option 'tensor_parallel'"):
        _teacher("x", backend_options={"tensor_parallel": 2})


def test_cli_refuses_a_backend_option_in_one_line() -> None:
    from tests.helpers import one_error_line, run_cli

    base = ("precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o")
    one_error_line(run_cli(*base, "--backend-option", "hidden_from=hf"), "the hf backend takes no backend options")
    one_error_line(run_cli(*base, "--backend", "vllm", "--backend-option", "tensor_paralel_size=2"),
                   "unknown vllm backend option 'tensor_paralel_size'", "known: tensor_parallel_size")
    one_error_line(run_cli(*base, "--backend", "vllm", "--backend-option", "hidden_from=yes"),
                   "hidden_from is 'yes', expected one of none, hf")


class EngineAtTheVllmBoundary(DenseEngine):
    """Stands in for `VllmEngine` (the only class that imports vllm), taking the arguments it is built with."""

    built: list[dict] = []

    def __init__(self, **kwargs) -> None:
        from transformers import AutoModelForCausalLM

        EngineAtTheVllmBoundary.built.append(kwargs)
        super().__init__(AutoModelForCausalLM.from_pretrained(kwargs["model"]).eval(), flat=True)


def test_vllm_with_hidden_states_from_hf_constructs_and_computes(tiny_model, monkeypatch) -> None:
    """`--backend vllm --backend-option hidden_from=hf` (README): the factory builds the vLLM backend and a
    transformers backend of the same teacher for the pooled states; only the vLLM engine is a stand-in."""
    import teachers.vllm_backend
    from teachers.backends import create_backend
    from teachers.hf_backend import HFBackend

    path, model, _ = tiny_model
    monkeypatch.setattr(teachers.vllm_backend, "VllmEngine", EngineAtTheVllmBoundary)
    EngineAtTheVllmBoundary.built.clear()
    cfg = _teacher(path, device="cpu", pool_layers=[0, -1],
                   backend_options={"hidden_from": "hf", "tensor_parallel_size": 2})
    backend = create_backend(cfg, seq_len=8)
    assert isinstance(backend, VllmBackend) and isinstance(backend.pooled_from, HFBackend)
    assert backend.pooled_from.cfg.backend == "hf" and backend.pooled_from.cfg.backend_options == HFOptions()
    assert EngineAtTheVllmBoundary.built[0]["options"] == cfg.backend_options
    assert backend.pooled_dims == {0: 32, 1: 32} and backend.notes["vllm_tensor_parallel_size"] == 2
    assert "transformers second pass" in backend.notes["pooled"]

    ids = np.random.default_rng(2).integers(0, 96, (2, 8)).astype(np.int32)
    out = backend.compute(PackedBatch(seq_ids=np.array([0, 1]), input_ids=ids))
    with torch.no_grad():  # float64 reference: the mean over positions of the blocks' outputs
        states = model.double()(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
        model.float()
    for layer in (0, 1):
        torch.testing.assert_close(torch.as_tensor(out.pooled[layer], dtype=torch.float64),
                                   states[layer + 1].mean(1), atol=1e-5, rtol=0)


# ---- real vLLM (GPU machines with the [vllm] extra) -----------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
def test_real_vllm_matches_transformers(tmp_path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (optional extra [vllm])")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path / "tok", sample_texts(100), vocab_size=256)
    path = str(make_tiny_teacher(tmp_path / "teacher", 256, seed=5, tokenizer_dir=tok))
    backend = VllmBackend(_teacher(path, top_k=8, dtype="float32"), 32, VllmOptions(gpu_memory_utilization=0.3,
                                                                                   enforce_eager=True))
    rng = np.random.default_rng(6)
    batch = PackedBatch(seq_ids=np.arange(4), input_ids=rng.integers(2, 256, (4, 32)).astype(np.int32))
    out = backend.compute(batch)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        dense = torch.log_softmax(model(torch.as_tensor(batch.input_ids, dtype=torch.long)).logits.double(), -1)
    ref_lps = torch.topk(dense, 8, dim=-1).values
    # ids may swap at near-ties between kernels; the log-prob values at each rank must agree closely
    torch.testing.assert_close(torch.as_tensor(out.topk_logprobs, dtype=torch.float64), ref_lps, atol=2e-3, rtol=0)
    got = torch.gather(dense, -1, torch.as_tensor(out.topk_ids, dtype=torch.long))
    torch.testing.assert_close(got, torch.as_tensor(out.topk_logprobs, dtype=torch.float64), atol=2e-3, rtol=0)
