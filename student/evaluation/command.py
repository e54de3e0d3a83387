"""The `evaluate` click command: options generated from `EVAL_OPTIONS` (common/config_cli.py), one row per
`EvalConfig` field, each taking its default from the dataclass. The JSON report keeps the config under
`config`, so `evaluate --config REPORT.json` replays the evaluation (or takes a file of `EvalConfig` fields).
"""

from __future__ import annotations

from typing import Any

import click

from common.config_cli import Opt, build_config, config_options, corpus_source_options
from common.devices import DEVICE_HELP, DeviceParam
from storage.stamps import VERIFY_MODES
from student.evaluation.config import DEFAULT_SEQ_LEN, DTYPES, EvalConfig
from student.evaluation.report import REPORT_CONFIG, format_comparisons, format_table
from student.evaluation.run import run_evaluate
from student.weighting import weighting_options

# One row per EvalConfig field: the defaults come from the dataclass (student/evaluation/config.py).
EVAL_OPTIONS: tuple[Opt, ...] = (
    Opt(field="students", flag="--student", multiple=True,
        help="Student model directory or hub id, or LABEL=DIR; repeat to compare several students in one table. "
             "Required (or --config)."),
    *corpus_source_options(
        dataset_help="Held-out text: hub dataset id (streamed, e.g. allenai/c4) or local jsonl, jsonl.gz, parquet, "
                     "txt file(s), packed with the student's tokenizer as precompute packs.",
        fields={"dataset": "data", "revision": "dataset_revision"}, dataset_aliases=("--data",),
        split_help="Hub dataset split (held-out text: validation by default).",
        text_field_help="Field holding the text in jsonl/parquet files and hub datasets."),
    Opt(field="corpus_format", flag="--corpus-format", type=click.Choice(["text", "chat"]),
        help="--dataset holds text documents or chat conversations (rows of {role, content} messages, rendered "
             "with the student tokenizer's chat template); with chat every figure averages over the assistant "
             "replies only."),
    Opt(field="messages_field", flag="--messages-field",
        help="Field holding a conversation's messages (--corpus-format chat)."),
    Opt(field="chat_template", flag="--chat-template",
        help="Jinja chat template file for --corpus-format chat (default: the tokenizer's own)."),
    Opt(field="teachers", flag="--teacher", multiple=True,
        help="Teacher model directory or hub id, or LABEL=DIR, with the student's tokenizer; repeat. Scored alone "
             "before the students (one model resident at a time), on the --dataset windows or on those of the "
             "--teacher-data caches (joining them in the fused target, after the caches). DIR/FILE.gguf is "
             "accepted as the older spelling of DIR --gguf-file FILE."),
    Opt(field="gguf_files", flag="--gguf-file", multiple=True,
        help="GGUF file inside a --teacher directory (dequantised), as in precompute; with several teachers "
             "LABEL=FILE. Repeat for several GGUF teachers."),
    Opt(field="teacher_data", flag="--teacher-data", multiple=True,
        help="Teacher cache precomputed on held-out text; repeat. Joined as train-student joins them; KL over "
             "top-k plus a tail bucket. An aligned cache (a teacher with another tokenizer) also gives that "
             "teacher's perplexity over the positions where its next-token log-prob is exact."),
    Opt(field="observed_correction", flag="--observed-correction/--no-observed-correction",
        help="Aligned caches: put the exact log-prob of the observed next token into their target, as "
             "train-student does."),
    Opt(field="verify", flag="--verify", type=click.Choice(VERIFY_MODES),
        help="Check of the caches' shards on open, as in train-student."),
    Opt(field="tokenizer", flag="--tokenizer",
        help="Tokenizer directory or .gguf file (default: the first student's directory)."),
    Opt(field="seq_len", flag="--seq-len", type=int,
        help=f"Tokens per packed window (--dataset only). Default: {DEFAULT_SEQ_LEN} (precompute's default), "
             "lowered to the smallest max_position_embeddings of the models; with --teacher-data the caches' "
             "seq_len."),
    Opt(field="max_tokens", flag="--max-tokens", type=int, help="Evaluate at most this many tokens (whole windows)."),
    Opt(field="batch_size", flag="--batch-size", type=int, help="Windows per forward pass."),
    Opt(field="top_k", flag="--top-k", type=int,
        help="Log-probs kept per position of each live --teacher (with its exact entropy) for the students' pass, "
             "as precompute's --top-k. The KL is over top-k plus a tail bucket; at the vocab size it is the full "
             "KL."),
    *weighting_options(weighting_aliases=("--weighting",),
                       weights_note="Teacher order: --teacher-data caches, then --teacher models."),
    Opt(field="bleu_prompts", flag="--bleu-prompts", type=int,
        help="Held-out prompts continued greedily for BLEU (0: skip)."),
    Opt(field="prompt_tokens", flag="--prompt-tokens", type=int, help="Tokens per BLEU prompt."),
    Opt(field="new_tokens", flag="--new-tokens", type=int, help="Tokens of each greedy continuation."),
    Opt(field="output", flag="--output", help="Write the results as JSON to this file."),
    Opt(field="overwrite", flag="--overwrite",
        help="Replace the evaluation report already at --output (never a file of another kind, nor an input)."),
    Opt(field="bootstrap", flag="--bootstrap", type=int,
        help="Paired-bootstrap replicates (over held-out windows) for the difference between the first student "
             "and each other one: perplexity, NLL and KL to the fused target with 95% intervals (0: skip)."),
    Opt(field="seed", flag="--seed", type=int, help="Seed of the bootstrap."),
    Opt(field="device", flag="--device", type=DeviceParam(), help=DEVICE_HELP),
    Opt(field="dtype", flag="--dtype", type=click.Choice(DTYPES),
        help="Weights and activations of every model: auto is bfloat16 on CUDA and float32 on CPU. Metrics are "
             "computed from float32 logits either way."),
)
EVAL_INTERNAL: tuple[str, ...] = ()
"""EvalConfig fields deliberately without an option (none: every field can be set)."""


@click.command("evaluate")
@config_options(EvalConfig, EVAL_OPTIONS,
                config_help="Replay an evaluation: the JSON report it wrote with --output (its config member), or a "
                            "file of EvalConfig fields. Options given beside it override its fields (e.g. --output).")
@click.pass_context
def evaluate_cmd(ctx: click.Context, **options: Any) -> None:
    """Evaluate students on held-out text: perplexity, KL to each teacher and to the fused target,
    top-1 agreement with the fused target, BLEU of greedy continuations. Models are loaded one at a time."""
    cfg = build_config(EvalConfig, EVAL_OPTIONS, ctx, options, member=REPORT_CONFIG)
    result = run_evaluate(cfg)
    click.echo(format_table(result))
    if result["comparisons"]:
        click.echo(format_comparisons(result))
    if cfg.output:
        click.echo(f"results written to {cfg.output}")
