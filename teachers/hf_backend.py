"""transformers backend: any `AutoModelForCausalLM` (local directory, hub id, or GGUF file).

Runs the model's backbone (`model.base_model`) for the final hidden states, never the full logits, and
feeds them with the output embedding weight to the chunked targets head. Pooled states of layers other
than the last come from forward hooks on those decoder blocks only (see teachers/backends.py for the layer
convention). Before the first batch the backend checks, on a short prefix, that the model's own logits
equal `lm_head(final hidden)` after the logit transforms it knows (bias, logit scale, soft-capping), and
refuses a model that applies anything else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import SafetensorError

from common.devices import resolve_device, resolve_dtype
from common.errors import ConfigError
from common.packing import PackedBatch
from common.positions import max_positions
from storage.manifest import TeacherInfo
from storage.records import TeacherTargets
from teachers.backend_options import HFOptions
from teachers.backends import resolve_layers
from teachers.config import TeacherConfig
from teachers.errors import TeacherLoadError
from teachers.fused_head import interpret_requested
from teachers.head import targets_head

_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError,
    RuntimeError,  # torch.load of a damaged .bin ("PytorchStreamReader failed reading zip archive")
)
"""What `from_pretrained` raises for unusable weight files: missing or truncated files, a pickle the
weights-only unpickler refuses, a damaged safetensors header."""
_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers", "transformer.h", "encoder.layers")
_CHECK_TOKENS = 32


def decoder_layers(backbone: Any) -> Any:
    """The backbone's list of decoder blocks (an nn.ModuleList); TeacherLoadError when not found."""
    for path in _LAYER_PATHS:
        obj = backbone
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "__len__") and len(obj) > 0:
            return obj
    raise TeacherLoadError(f"cannot find the decoder blocks of {type(backbone).__name__} (looked for "
                           f"{', '.join(_LAYER_PATHS)})")


class HFBackend:
    """TeacherBackend over a transformers causal LM."""

    def __init__(self, cfg: TeacherConfig) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        if not isinstance(cfg.backend_options, HFOptions):  # TeacherConfig gives each backend its own class
            raise ConfigError(f"the hf backend takes no backend options, got {cfg.backend_options}")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        # Model code from the hub runs only with --trust-remote-code; `.bin` weights go through torch's
        # weights-only unpickler (tensors and plain containers; anything else is refused, never executed).
        kwargs: dict[str, Any] = dict(revision=cfg.revision, dtype=getattr(torch, self.dtype),
                                      trust_remote_code=cfg.trust_remote_code, weights_only=True)
        if cfg.gguf_file:
            kwargs["gguf_file"] = cfg.gguf_file
        if self.device.startswith("cuda"):
            kwargs["device_map"] = self.device
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
        except _LOAD_ERRORS as e:  # missing, truncated or refused weights: the user's files, one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TeacherLoadError(f"cannot load teacher {cfg.path!r}: {type(e).__name__}: {first}") from None
        self.model = model.eval().to(self.device)
        self.backbone = model.base_model
        head = model.get_output_embeddings()
        if self.backbone is model or head is None or getattr(head, "weight", None) is None:
            raise TeacherLoadError(f"{type(model).__name__} has no separate backbone and lm_head; the hf "
                                   "backend needs both")
        self.weight = head.weight.detach()  # [V, H]
        self.bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        scale = getattr(text_config, "logit_scale", None)  # Cohere: logits * logit_scale
        if getattr(text_config, "logits_scaling", None):  # Granite: logits / logits_scaling
            scale = 1.0 / float(text_config.logits_scaling)
        self.logit_scale = float(scale) if scale is not None else None
        layers = decoder_layers(self.backbone)
        self.num_layers = len(layers)
        self.pooled_layers = resolve_layers(list(cfg.pool_layers), self.num_layers)
        self.hidden_size = int(self.weight.shape[1])
        self.vocab_size = int(self.weight.shape[0])
        self.max_positions = max_positions(config)
        """Positions the model was trained on (None: its config declares none); windows must fit them."""
        self.entropy_kind = "exact"
        self.observed_logprob = True  # targets carry log p(next token) (manifest field observed_logprob)
        self.pooled_dims = {layer: self.hidden_size for layer in self.pooled_layers}
        self._captured: dict[int, Any] = {}
        self._capture_full = False
        self._hooks = [layers[i].register_forward_hook(self._hook(i)) for i in self.pooled_layers
                       if i != self.num_layers - 1]  # the last layer is the backbone's output
        self._checked = False
        self.sample_key: int | None = None
        """Key of the sampled targets' draws (teachers.sampling.sample_key); set by run_precompute."""
        self.profile = False
        """When True, `timings` accumulates seconds in the backbone and in the head (synchronising CUDA)."""
        self.timings = {"backbone_s": 0.0, "head_s": 0.0, "tokens": 0}
        self.num_params = sum(p.numel() for p in model.parameters())
        # auto: compiled on CUDA where inductor can emit its GPU kernels (Triton importable), eager elsewhere
        self.compile_head = cfg.compile_head == "on" or (
            cfg.compile_head == "auto" and self.weight.is_cuda and importlib.util.find_spec("triton") is not None)
        triton_ok = importlib.util.find_spec("triton") is not None
        if cfg.head_kernel == "triton" and not (triton_ok and (self.weight.is_cuda or interpret_requested())):
            raise TeacherLoadError(f"--head-kernel triton needs a CUDA device (or TRITON_INTERPRET=1, Triton's CPU "
                                   f"interpreter, for tests) and the triton package (device {self.device}, triton "
                                   f"{'installed' if triton_ok else 'not installed'})")
        # auto stays on the torch head until the fused kernel has been measured on a GPU
        # (benchmarks/gpu_suite.py): it is tested only under Triton's CPU interpreter so far
        self.head_kernel = "triton" if cfg.head_kernel == "triton" else "torch"
        self.notes: dict[str, Any] = {
            "transformers": transformers.__version__, "torch": torch.__version__, "device": self.device,
            "head_chunk_size": cfg.head_chunk_size, "model_class": type(model).__name__,
            "head_kernel": self.head_kernel,
            "head_lse_entropy": "fused kernel" if self.head_kernel == "triton" else (
                "torch.compile" if self.compile_head else "eager"),
            "pooled_layer_meaning": "mean over the sequence of transformers output_hidden_states[i + 1]",
            "logit_transforms": {"bias": self.bias is not None, "logit_scale": self.logit_scale,
                                 "softcap": self.softcap},
        }

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output  # [B, L, H]
            # the aligned backend pools over each sequence's own (unpadded) length itself
            self._captured[layer] = h if self._capture_full else h.float().mean(dim=1)
        return hook

    def info(self) -> TeacherInfo:
        return TeacherInfo(name=self.cfg.name or self.cfg.path, path=self.cfg.path, revision=self.cfg.revision,
                           gguf_file=self.cfg.gguf_file, dtype=self.dtype, backend="hf",
                           num_params=self.num_params, num_layers=self.num_layers, hidden_size=self.hidden_size)

    def final_hidden(self, input_ids: Any) -> Any:
        """[B, L, H] final hidden states (after the final norm) for [B, L] int64 ids."""
        return self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state

    def compute(self, batch: PackedBatch) -> TeacherTargets:
        import torch

        top = int(batch.input_ids.max(initial=0))
        if top >= self.vocab_size:
            raise TeacherLoadError(f"token id {top} is outside the teacher's vocab ({self.vocab_size}); "
                                   "the tokenizer does not belong to this teacher")
        k, b, seq_len = self.cfg.top_k, len(batch), batch.input_ids.shape[1]
        ids = torch.from_numpy(np.ascontiguousarray(batch.input_ids)).to(self.model.device, torch.long)
        with torch.inference_mode():
            if not self._checked:
                self._self_check(ids[:1, :_CHECK_TOKENS])
            self._captured.clear()
            t0 = self._clock()
            hidden = self.final_hidden(ids)  # [B, L, H] model dtype
            t1 = self._clock()
            flat = hidden.reshape(b * seq_len, -1).to(self.weight.device)
            next_ids = _next_ids(ids)  # [B * L]
            if self.cfg.targets == "sampled":
                return self._sampled(batch, flat, next_ids, pooled_from=hidden, t0=t0, t1=t1)
            top_ids, top_lp, entropy, observed = self._head(flat, k, next_ids=next_ids)
            if self.profile:
                self.timings["backbone_s"] += t1 - t0
                self.timings["head_s"] += self._clock() - t1
                self.timings["tokens"] += b * seq_len
            pooled = self._pooled_states(hidden)
        return TeacherTargets(
            seq_ids=np.asarray(batch.seq_ids, dtype=np.int64),
            input_ids=np.asarray(batch.input_ids, dtype=np.int32),
            topk_ids=top_ids.reshape(b, seq_len, k).cpu().numpy(),
            topk_logprobs=top_lp.reshape(b, seq_len, k).cpu().numpy(),
            entropy=entropy.reshape(b, seq_len).cpu().numpy(),
            pooled=pooled,
            observed_logprob=_observed_column(observed, b, seq_len),
        )

    def _pooled_states(self, hidden: Any) -> dict[int, np.ndarray]:
        """{layer: [B, d] float32} from the final hidden states [B, L, H] and the hooks' captures."""
        return {layer: (hidden.float().mean(dim=1) if layer == self.num_layers - 1 else self._captured[layer])
                .cpu().numpy() for layer in self.pooled_layers}

    def _sampled(self, batch: PackedBatch, flat: Any, next_ids: Any, *, pooled_from: Any, t0: float, t1: float
                 ) -> TeacherTargets:
        """Sampled targets of one batch (inside compute's inference mode); flat [B * L, H] final hidden states,
        next_ids [B * L] the observed next tokens."""
        import torch

        from teachers.sampling import draw_uniforms

        if self.sample_key is None:
            raise RuntimeError("sampled targets need backend.sample_key (run_precompute sets it)")
        b, seq_len, n = len(batch), batch.input_ids.shape[1], self.cfg.samples
        uniforms = torch.from_numpy(draw_uniforms(self.sample_key, batch.seq_ids, seq_len, n))
        ids, counts, entropy, observed = self._sampled_head(flat, uniforms, next_ids)
        if self.profile:
            self.timings["backbone_s"] += t1 - t0
            self.timings["head_s"] += self._clock() - t1
            self.timings["tokens"] += b * seq_len
        return TeacherTargets(
            seq_ids=np.asarray(batch.seq_ids, dtype=np.int64),
            input_ids=np.asarray(batch.input_ids, dtype=np.int32),
            topk_ids=None, topk_logprobs=None,
            entropy=entropy.reshape(b, seq_len).cpu().numpy(),
            pooled=self._pooled_states(pooled_from),
            sample_ids=ids.reshape(b, seq_len, n).cpu().numpy(),
            sample_counts=counts.reshape(b, seq_len, n).cpu().numpy().astype(np.uint16),
            observed_logprob=_observed_column(observed, b, seq_len),
        )

    def _clock(self) -> float:
        import time

        import torch

        if self.profile and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def pooled(self, input_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Only the pooled states ({layer: [B, d] float32}) for [B, L] ids; for backends without hidden states."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.model.device, torch.long)
        with torch.inference_mode():
            self._captured.clear()
            hidden = self.final_hidden(ids)
            return {layer: (hidden.float().mean(dim=1) if layer == self.num_layers - 1 else self._captured[layer])
                    .cpu().numpy() for layer in self.pooled_layers}

    @contextlib.contextmanager
    def _compile_failures(self) -> Iterator[None]:
        """A torch.compile failure of the head (with --compile-head on) becomes one line naming the way out."""
        import torch._dynamo.exc
        import torch._inductor.exc

        try:
            yield
        except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as e:
            if not self.compile_head:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TeacherLoadError(f"torch.compile of the targets head failed on {self.device} "
                                   f"({type(e).__name__}: {first}); rerun with --compile-head off") from e

    def _sampled_head(self, hidden: Any, uniforms: Any, next_ids: Any) -> tuple[Any, Any, Any, Any]:
        """sampling.sampled_head with the run's temperature, chunking and logit transforms (torch head only)."""
        from teachers.sampling import sampled_head

        with self._compile_failures():
            return sampled_head(hidden, self.weight, uniforms=uniforms, temperature=self.cfg.temperature,
                                chunk_size=self.cfg.head_chunk_size, bias=self.bias, logit_scale=self.logit_scale,
                                softcap=self.softcap, compile=self.compile_head, next_ids=next_ids)

    def _head(self, hidden: Any, k: int, temperature: float | None = None, next_ids: Any = None
              ) -> tuple[Any, ...]:
        """targets_head with the run's settings: (ids, logprobs, entropy), plus log p(next_ids) when given."""
        temperature = self.cfg.temperature if temperature is None else temperature
        if self.head_kernel == "triton":
            import triton

            try:
                return targets_head(hidden, self.weight, k=k, temperature=temperature,
                                    chunk_size=self.cfg.head_chunk_size, bias=self.bias,
                                    logit_scale=self.logit_scale, softcap=self.softcap, kernel="triton",
                                    next_ids=next_ids)
            except triton.TritonError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise TeacherLoadError(f"the fused Triton head failed on {self.device} ({type(e).__name__}: "
                                       f"{first}); rerun with --head-kernel torch") from e
        with self._compile_failures():
            return targets_head(hidden, self.weight, k=k, temperature=temperature,
                                chunk_size=self.cfg.head_chunk_size, bias=self.bias, logit_scale=self.logit_scale,
                                softcap=self.softcap, compile=self.compile_head, next_ids=next_ids)

    def _self_check(self, ids: Any) -> None:
        """Refuse a model whose logits are not lm_head(final hidden) with the known transforms."""
        import torch

        self._checked = True
        k = min(8, self.vocab_size)
        logits = self.model(input_ids=ids, use_cache=False).logits[0].float()  # [n, V]
        ref = torch.log_softmax(logits, dim=-1)
        h = self.final_hidden(ids)[0].to(self.weight.device)
        # through the head this run uses (torch or fused), so a wrong kernel is refused before any shard
        top_ids, top_lp, _ = (self._head(h, k, temperature=1.0) if self.head_kernel == "triton" else
                              targets_head(h, self.weight, k=k, temperature=1.0, chunk_size=self.cfg.head_chunk_size,
                                           bias=self.bias, logit_scale=self.logit_scale, softcap=self.softcap))
        ref_lp = ref.to(top_lp.device).gather(-1, top_ids.long())
        err = float((ref_lp - top_lp).abs().max())
        tol = 1e-3 if self.dtype == "float32" else 0.1
        if not err <= tol:
            raise TeacherLoadError(
                f"{type(self.model).__name__}: logits are not lm_head(final hidden state) with the transforms "
                f"this backend knows (max |log p difference| {err:.3g} > {tol}); refusing to store wrong targets")
        self._captured.clear()


def _next_ids(ids: Any) -> Any:
    """[B * L] int64 observed next tokens of windows ids [B, L]; each window's last row takes its own first
    token as a placeholder (no next token inside the window; `_observed_column` writes NaN there)."""
    import torch

    return torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)


def _observed_column(observed: Any, b: int, seq_len: int) -> np.ndarray:
    """The `observed_logprob` column [B, L] float32 from log p(next) [B * L]: NaN at each window's last position
    (as aligned caches store it)."""
    out = observed.reshape(b, seq_len).float().cpu().numpy().astype(np.float32)
    out[:, -1] = np.nan
    return out


def create_backend(cfg: TeacherConfig, *, seq_len: int) -> HFBackend:
    """Entry point used by teachers.backends.create_backend (seq_len is not needed by this backend)."""
    return HFBackend(cfg)
