"""`precompute` command: options map one to one onto teachers.config, then run_precompute(cfg).

The options are generated from `PRECOMPUTE_OPTIONS` (common/config_cli.py): each maps onto one
PrecomputeConfig field and takes its default from the dataclass. A finished slice records its resolved
config as `config-slice-IIIII-of-NNNNN.json` in the output; `precompute --config FILE` replays it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from common.config_cli import Opt, build_config, config_options, corpus_source_options
from common.corpus import CORPUS_FORMATS
from common.devices import DeviceParam
from common.params import FINITE_FLOAT, non_finite
from teachers.backend_options import options_help
from teachers.config import (
    BACKENDS,
    COMPILE_CHOICES,
    DTYPES,
    FORMATS,
    HEAD_KERNELS,
    LOGPROB_DTYPES,
    TARGET_KINDS,
    PrecomputeConfig,
)


def _layers(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    if value.strip().lower() in ("", "none"):
        return []
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers (or 'none'), got {value!r}") from None


def _options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)  # numbers, true/false, null
        except json.JSONDecodeError:
            out[key.strip()] = raw
        if non_finite(out[key.strip()]) is not None:  # json.loads reads NaN and Infinity
            raise click.BadParameter(f"{item!r}: {raw} is not a finite number")
    return out


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (what schedulers send before they kill a preempted job) into SystemExit(143), so the run
    stops like on Ctrl-C: queued shards are finished and recorded, no manifest is written, the slice's lock
    is removed. Without this, Python dies at once and leaves the lock behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LayerList(click.ParamType):
    """Comma-separated integers, or 'none' / '' for none; a list (the dataclass default) passes as it is."""

    name = "layers"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, (list, tuple)):
            return [int(x) for x in value]
        try:
            return _layers(ctx, param, str(value))  # type: ignore[arg-type]
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


# One row per PrecomputeConfig field: the defaults come from the dataclasses (teachers/config.py).
PRECOMPUTE_OPTIONS: tuple[Opt, ...] = (
    Opt(field="teacher.path", flag="--teacher", help="Teacher weights: local directory or hub id. Required (or --config)."),
    Opt(field="teacher.name", flag="--teacher-name",
        help="Label for the teacher in the manifest (default: last part of --teacher)."),
    Opt(field="teacher.gguf_file", flag="--gguf-file", help="GGUF file inside --teacher to load (dequantised)."),
    Opt(field="teacher.revision", flag="--revision", help="Hub revision of the teacher weights."),
    Opt(field="teacher.tokenizer", flag="--tokenizer", help="Tokenizer directory or hub id (default: the teacher's)."),
    Opt(field="teacher.align_tokenizer", flag="--align-tokenizer",
        help="The student's tokenizer S (directory, hub id, or the directory of --align-gguf-file) when the "
             "teacher has its own: packing uses S and targets are written in S's token space, with a "
             "per-position validity mask (hf backend only)."),
    Opt(field="teacher.align_gguf_file", flag="--align-gguf-file",
        help="GGUF file inside --align-tokenizer whose tokenizer is S."),
    Opt(field="teacher.backend", flag="--backend", type=click.Choice(BACKENDS),
        help="hf: transformers (exact entropy, pooled states); vllm: optional extra, top-k log-probs only."),
    Opt(field="teacher.dtype", flag="--dtype", type=click.Choice(DTYPES),
        help="Teacher compute dtype; auto = bfloat16 on GPU, float32 on CPU."),
    Opt(field="teacher.device", flag="--device", type=DeviceParam(),
        help="auto (cuda:LOCAL_RANK, or cuda:SLURM_LOCALID under srun, if CUDA is available, else cpu), cpu, "
             "cuda or cuda:N."),
    Opt(field="teacher.trust_remote_code", flag="--trust-remote-code", help="Allow model code from the hub."),
    Opt(field="teacher.backend_options", flag="--backend-option", multiple=True, callback=_options,
        metavar="KEY=VALUE",
        help="Setting of the chosen --backend, repeatable; an unknown key or a value of the wrong type is "
             f"refused. {options_help()}."),
    *corpus_source_options(
        prefix="corpus.",
        dataset_help="Hub dataset id (streamed), or local .jsonl/.jsonl.gz/.parquet/.txt file(s): path, glob, "
                     "directory, or comma-separated list. A .txt file gives one document per paragraph. Required "
                     "(or --config).",
        revision_help="Hub dataset revision (recorded in the fingerprint)."),
    Opt(field="corpus.max_documents", flag="--max-documents", type=int,
        help="Use at most this many documents in all (each corpus partition reads its share)."),
    Opt(field="corpus.max_tokens", flag="--max-tokens", type=int,
        help="Use at most this many packed tokens in all (each corpus partition packs its share)."),
    Opt(field="corpus.partition_bytes", flag="--partition-bytes", type=int,
        help="Cut local uncompressed .jsonl/.json files into partitions of this many bytes (others: one per "
             "file; hub datasets: one per data file). Slices read only their partitions. Part of the corpus "
             "fingerprint: caches to be joined need the same value."),
    Opt(field="corpus.corpus_format", flag="--corpus-format", type=click.Choice(CORPUS_FORMATS),
        help="text: each row is a document; chat: each row's --messages-field is a conversation ({role, content} "
             "messages), rendered with the chat template; the losses then use only the positions whose next token "
             "belongs to an assistant reply (column loss_mask)."),
    Opt(field="corpus.messages_field", flag="--messages-field", help="Field holding a conversation's messages "
        "(--corpus-format chat)."),
    Opt(field="corpus.chat_template", flag="--chat-template",
        help="Jinja chat template file (--corpus-format chat; default: the tokenizer's own, for an aligned teacher "
             "the student tokenizer's)."),
    Opt(field="corpus.truncate_conversations", flag="--truncate-conversations/--refuse-long-conversations",
        help="A conversation longer than --seq-len is cut to the window, or (default) refused and counted as "
             "too_long in the manifest's packing notes."),
    Opt(field="seq_len", flag="--seq-len", type=int, help="Tokens per packed sequence."),
    Opt(field="teacher.top_k", flag="--top-k", type=int, help="Top-k log-probs stored per token."),
    Opt(field="teacher.targets", flag="--targets", type=click.Choice(TARGET_KINDS),
        help="topk: the --top-k largest log-probs per token (the tail is lumped, a biased target); sampled: "
             "--samples draws from the teacher's full softmax, stored as distinct ids and counts (count / N is an "
             "unbiased estimate; seeded per corpus, teacher, sequence and position, so re-runs, slices and "
             "resumes are byte-identical). hf backend only."),
    Opt(field="teacher.samples", flag="--samples", type=int, help="Draws per token with --targets sampled (1..65535)."),
    Opt(field="teacher.temperature", flag="--temperature", type=FINITE_FLOAT,
        help="Store log-probs and entropy of softmax(logits / temperature)."),
    Opt(field="teacher.pool_layers", flag="--pool-layers", type=LayerList(),
        help="Decoder blocks to mean-pool per sequence: comma list, negative from the end, 'none' for none. "
             "Layer i = transformers output_hidden_states[i+1] (last: after the final norm)."),
    Opt(field="teacher.batch_size", flag="--batch-size", type=int, help="Sequences per teacher forward."),
    Opt(field="teacher.batch_tokens", flag="--batch-tokens", type=int,
        help="Tokens per teacher forward; overrides --batch-size with batch-tokens // seq-len."),
    Opt(field="teacher.head_chunk_size", flag="--head-chunk-size", type=int,
        help="Tokens per lm_head chunk (peak head memory ~ 2 x chunk x vocab x 4 bytes)."),
    Opt(field="teacher.compile_head", flag="--compile-head", type=click.Choice(COMPILE_CHOICES),
        help="Compute the head's logsumexp and entropy with torch.compile (fused kernels; the first batch "
             "compiles, ~15-20 s on CPU). auto = on for CUDA, off on CPU. Same results to float32 rounding."),
    Opt(field="teacher.head_kernel", flag="--head-kernel", type=click.Choice(HEAD_KERNELS),
        help="Targets head: torch (chunked, this option's fallback) or triton (fused kernel that never writes "
             "[chunk, vocab] logits; CUDA only; tested under Triton's CPU interpreter, not yet run on a GPU). "
             "auto = torch until the GPU suite has validated the kernel."),
    Opt(field="storage.output", flag="--output",
        help="Output teacher directory (local path or fsspec URL). Required (or --config)."),
    Opt(field="storage.format", flag="--format", dest="fmt", type=click.Choice(FORMATS), help="Shard format."),
    Opt(field="storage.shard_size", flag="--shard-size", type=int, help="Sequences per shard file."),
    Opt(field="storage.logprob_dtype", flag="--logprob-dtype", type=click.Choice(LOGPROB_DTYPES),
        help="Storage dtype of the top-k log-probs."),
    Opt(field="storage.logprob_mantissa_bits", flag="--logprob-bits", type=click.IntRange(1, 23),
        help="Round each stored log-prob to this many mantissa bits (float16 has 10, float32 23). Default: all "
             "of them (exact). Fewer bits make files smaller at a small fidelity cost; with float16 on SmolLM2 "
             "at k=64: 8 bits -9% bytes (relative error <= 0.2%, top-k KL 3e-6), 7 bits -15% (0.4%, 1e-5). See "
             "benchmarks/RESULTS.md."),
    Opt(field="num_slices", flag="--num-slices", type=int, hidden_aliases=("--num-shards",),
        help="Number of node slices: the nodes' parts of the run, each reading its own corpus partitions and "
             "writing the shard files in them (default: WORLD_SIZE or SLURM_NTASKS, else 1)."),
    Opt(field="slice_index", flag="--slice-index", type=int, hidden_aliases=("--shard-index",),
        help="This node's slice, 0-based (default: RANK or SLURM_PROCID, else 0)."),
    Opt(field="progress", flag="--progress/--no-progress", help="Show a progress bar."),
)
PRECOMPUTE_INTERNAL: tuple[str, ...] = ()
"""PrecomputeConfig fields deliberately without an option (none: every field can be set)."""


def config_file_name(slice_index: int, num_slices: int) -> str:
    """The config a precompute slice records beside its shards (`precompute --config` replays it)."""
    return f"config-slice-{slice_index:05d}-of-{num_slices:05d}.json"


@click.command("precompute")
@config_options(PrecomputeConfig, PRECOMPUTE_OPTIONS,
                config_help="Replay a run: a config-slice-IIIII-of-NNNNN.json that precompute wrote in its "
                            "--output (the resolved settings of that slice). Options given beside it override "
                            "its fields (e.g. --output to compute a copy elsewhere).")
@click.pass_context
def precompute_cmd(ctx: click.Context, **o: object) -> None:
    """Stage one: run a teacher over a corpus and cache its top-k log-probs, entropy and pooled states.

    Re-running the same command resumes: completed shards are verified and skipped.
    """
    import dataclasses

    from storage import fs as sfs
    from teachers.precompute import run_precompute

    cfg = build_config(PrecomputeConfig, PRECOMPUTE_OPTIONS, ctx, o)
    with _sigterm_as_exit():
        manifest = run_precompute(cfg)
    # the settings this slice ran with, its slice resolved: `precompute --config FILE` computes the same shards
    resolved = dataclasses.replace(cfg, num_slices=manifest.num_slices, slice_index=manifest.slice_index)
    fs, root = sfs.resolve(cfg.storage.output)
    sfs.atomic_write_json(fs, sfs.join(root, config_file_name(manifest.slice_index, manifest.num_slices)),
                          dataclasses.asdict(resolved))
    run = manifest.notes["this_run"]
    click.echo(f"{manifest.teacher.name}: slice {manifest.slice_index}/{manifest.num_slices}, "
               f"{len(manifest.shards)} shards, {manifest.num_sequences} sequences, "
               f"{manifest.total_bytes / 1e6:.1f} MB -> {cfg.storage.output}; "
               f"teacher {run['teacher_seconds']:.1f} s, writer wait {run['writer_wait_s']:.2f} s")
