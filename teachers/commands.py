"""`precompute` command: options map one to one onto teachers.config, then run_precompute(cfg)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from common.devices import DeviceParam
from common.errors import ConfigError
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


@click.command("precompute")
@click.option("--teacher", required=True, help="Teacher weights: local directory or hub id.")
@click.option("--teacher-name", default=None, help="Label for the teacher in the manifest (default: last part of --teacher).")
@click.option("--gguf-file", default=None, help="GGUF file inside --teacher to load (dequantised).")
@click.option("--revision", default=None, help="Hub revision of the teacher weights.")
@click.option("--tokenizer", default=None, help="Tokenizer directory or hub id (default: the teacher's).")
@click.option("--align-tokenizer", default=None,
              help="The student's tokenizer S (directory, hub id, or the directory of --align-gguf-file) when the "
                   "teacher has its own: packing uses S and targets are written in S's token space, with a "
                   "per-position validity mask (hf backend only).")
@click.option("--align-gguf-file", default=None,
              help="GGUF file inside --align-tokenizer whose tokenizer is S.")
@click.option("--backend", type=click.Choice(BACKENDS), default="hf", show_default=True,
              help="hf: transformers (exact entropy, pooled states); vllm: optional extra, top-k log-probs only.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Teacher compute dtype; auto = bfloat16 on GPU, float32 on CPU.")
@click.option("--device", type=DeviceParam(), default="auto", show_default=True,
              help="auto (cuda:LOCAL_RANK, or cuda:SLURM_LOCALID under srun, if CUDA is available, else cpu), "
                   "cpu, cuda or cuda:N.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the hub.")
@click.option("--backend-option", "backend_options", multiple=True, callback=_options, metavar="KEY=VALUE",
              help="Setting of the chosen --backend, repeatable; an unknown key or a value of the wrong type is "
                   f"refused. {options_help()}.")
@click.option("--dataset", required=True,
              help="Hub dataset id (streamed), or local .jsonl/.jsonl.gz/.parquet/.txt file(s): path, glob, "
                   "directory, or comma-separated list. A .txt file gives one document per paragraph.")
@click.option("--dataset-config", default=None, help="Hub dataset configuration (e.g. en for allenai/c4).")
@click.option("--split", default="train", show_default=True, help="Hub dataset split.")
@click.option("--dataset-revision", default=None, help="Hub dataset revision (recorded in the fingerprint).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the document text.")
@click.option("--max-documents", type=int, default=None,
              help="Use at most this many documents in all (each corpus partition reads its share).")
@click.option("--max-tokens", type=int, default=None,
              help="Use at most this many packed tokens in all (each corpus partition packs its share).")
@click.option("--partition-bytes", type=int, default=64 << 20, show_default=True,
              help="Cut local uncompressed .jsonl/.json files into partitions of this many bytes (others: one "
                   "per file; hub datasets: one per data file). Slices read only their partitions. Part of "
                   "the corpus fingerprint: caches to be joined need the same value.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per packed sequence.")
@click.option("--top-k", type=int, default=64, show_default=True, help="Top-k log-probs stored per token.")
@click.option("--targets", type=click.Choice(TARGET_KINDS), default="topk", show_default=True,
              help="topk: the --top-k largest log-probs per token (the tail is lumped, a biased target); sampled: "
                   "--samples draws from the teacher's full softmax, stored as distinct ids and counts (count / N "
                   "is an unbiased estimate; seeded per corpus, teacher, sequence and position, so re-runs, "
                   "slices and resumes are byte-identical). hf backend only.")
@click.option("--samples", type=int, default=16, show_default=True,
              help="Draws per token with --targets sampled (1..65535).")
@click.option("--temperature", type=FINITE_FLOAT, default=1.0, show_default=True,
              help="Store log-probs and entropy of softmax(logits / temperature).")
@click.option("--pool-layers", default="-1", show_default=True, callback=_layers,
              help="Decoder blocks to mean-pool per sequence: comma list, negative from the end, 'none' for "
                   "none. Layer i = transformers output_hidden_states[i+1] (last: after the final norm).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per teacher forward.")
@click.option("--batch-tokens", type=int, default=None,
              help="Tokens per teacher forward; overrides --batch-size with batch-tokens // seq-len.")
@click.option("--head-chunk-size", type=int, default=1024, show_default=True,
              help="Tokens per lm_head chunk (peak head memory ~ 2 x chunk x vocab x 4 bytes).")
@click.option("--compile-head", type=click.Choice(COMPILE_CHOICES), default="auto", show_default=True,
              help="Compute the head's logsumexp and entropy with torch.compile (fused kernels; the first batch "
                   "compiles, ~15-20 s on CPU). auto = on for CUDA, off on CPU. Same results to float32 rounding.")
@click.option("--head-kernel", type=click.Choice(HEAD_KERNELS), default="auto", show_default=True,
              help="Targets head: torch (chunked, this option's fallback) or triton (fused kernel that never "
                   "writes [chunk, vocab] logits; CUDA only; tested under Triton's CPU interpreter, not yet run on a GPU). auto = torch until the "
                   "GPU suite has validated the kernel.")
@click.option("--output", required=True, help="Output teacher directory (local path or fsspec URL).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="parquet", show_default=True,
              help="Shard format.")
@click.option("--shard-size", type=int, default=256, show_default=True, help="Sequences per shard file.")
@click.option("--logprob-dtype", type=click.Choice(LOGPROB_DTYPES), default="float16", show_default=True,
              help="Storage dtype of the top-k log-probs.")
@click.option("--logprob-bits", type=click.IntRange(1, 23), default=None,
              help="Round each stored log-prob to this many mantissa bits (float16 has 10, float32 23). "
                   "Default: all of them (exact). Fewer bits make files smaller at a small fidelity cost; "
                   "with float16 on SmolLM2 at k=64: 8 bits -9% bytes (relative error <= 0.2%, top-k KL "
                   "3e-6), 7 bits -15% (0.4%, 1e-5). See benchmarks/RESULTS.md.")
@click.option("--num-slices", type=int, default=None,
              help="Number of node slices: the nodes' parts of the run, each reading its own corpus partitions and "
                   "writing the shard files in them (default: WORLD_SIZE or SLURM_NTASKS, else 1).")
@click.option("--slice-index", type=int, default=None,
              help="This node's slice, 0-based (default: RANK or SLURM_PROCID, else 0).")
@click.option("--num-shards", "num_slices_alias", type=int, default=None, hidden=True,
              help="Old spelling of --num-slices.")
@click.option("--shard-index", "slice_index_alias", type=int, default=None, hidden=True,
              help="Old spelling of --slice-index.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def precompute_cmd(**o: object) -> None:
    """Stage one: run a teacher over a corpus and cache its top-k log-probs, entropy and pooled states.

    Re-running the same command resumes: completed shards are verified and skipped.
    """
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    for new, old in (("num_slices", "--num-shards"), ("slice_index", "--shard-index")):
        if o[f"{new}_alias"] is not None:
            if o[new] is not None:
                raise ConfigError(f"give --{new.replace('_', '-')} once ({old} is its old spelling)")
            o[new] = o[f"{new}_alias"]
    cfg = PrecomputeConfig(
        corpus=CorpusConfig(dataset=o["dataset"], dataset_config=o["dataset_config"], split=o["split"],
                            revision=o["dataset_revision"], text_field=o["text_field"],
                            max_documents=o["max_documents"], max_tokens=o["max_tokens"],
                            partition_bytes=o["partition_bytes"]),
        teacher=TeacherConfig(path=o["teacher"], name=o["teacher_name"], gguf_file=o["gguf_file"],
                              revision=o["revision"], tokenizer=o["tokenizer"], backend=o["backend"],
                              dtype=o["dtype"], device=o["device"], batch_size=o["batch_size"],
                              batch_tokens=o["batch_tokens"], top_k=o["top_k"], targets=o["targets"],
                              samples=o["samples"], temperature=o["temperature"],
                              head_chunk_size=o["head_chunk_size"], compile_head=o["compile_head"],
                              head_kernel=o["head_kernel"], pool_layers=o["pool_layers"],
                              trust_remote_code=o["trust_remote_code"], backend_options=o["backend_options"],
                              align_tokenizer=o["align_tokenizer"], align_gguf_file=o["align_gguf_file"]),
        storage=StorageConfig(output=o["output"], format=o["fmt"], shard_size=o["shard_size"],
                              logprob_dtype=o["logprob_dtype"], logprob_mantissa_bits=o["logprob_bits"]),
        seq_len=o["seq_len"], num_slices=o["num_slices"], slice_index=o["slice_index"], progress=o["progress"],
    )
    with _sigterm_as_exit():
        manifest = run_precompute(cfg)
    run = manifest.notes["this_run"]
    click.echo(f"{manifest.teacher.name}: slice {manifest.slice_index}/{manifest.num_slices}, "
               f"{len(manifest.shards)} shards, {manifest.num_sequences} sequences, "
               f"{manifest.total_bytes / 1e6:.1f} MB -> {cfg.storage.output}; "
               f"teacher {run['teacher_seconds']:.1f} s, writer wait {run['writer_wait_s']:.2f} s")
