"""The `evaluate` click command: options named after `EvalConfig`'s fields, defaults taken from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from common.devices import DEVICE_HELP, DeviceParam
from common.errors import ConfigError
from common.params import FINITE_FLOAT, FLOAT_LIST
from student.evaluation.config import DEFAULT_SEQ_LEN, DTYPES, EvalConfig
from student.evaluation.report import format_comparisons, format_table
from student.evaluation.run import run_evaluate
from student.weighting import NAMES as WEIGHTINGS
from student.weighting import choices_help, setting_help

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}


def _opt(*decls: str, field: str | None = None, **kw: Any) -> Any:
    """A click option whose default (shown in --help) is EvalConfig's, so the default lives in one place."""
    name = field or decls[0].lstrip("-").replace("-", "_")
    if name in _DEFAULTS and "default" not in kw:
        kw["default"] = _DEFAULTS[name]
        kw.setdefault("show_default", _DEFAULTS[name] is not None)
    return click.option(*decls, *([field] if field else []), **kw)


def _alias(flag: str, name: str, new: str) -> Any:
    return click.option(flag, name, default=None, hidden=True, help=f"Old spelling of {new}.")


@click.command("evaluate")
@_opt("--student", field="students", multiple=True, required=True,
      help="Student model directory or hub id, or LABEL=DIR; repeat to compare several students in one table.")
@_opt("--dataset", field="data",
      help="Held-out text: hub dataset id (streamed, e.g. allenai/c4) or local jsonl, jsonl.gz, parquet, txt "
           "file(s), packed with the student's tokenizer as precompute packs.")
@_alias("--data", "data_alias", "--dataset")
@_opt("--dataset-config", help="Hub dataset configuration (e.g. en for allenai/c4).")
@_opt("--split", help="Hub dataset split (held-out text: validation by default).")
@_opt("--dataset-revision", help="Hub dataset revision.")
@_opt("--text-field", help="Field holding the text in jsonl/parquet files and hub datasets.")
@_opt("--corpus-format", type=click.Choice(["text", "chat"]),
      help="--dataset holds text documents or chat conversations (rows of {role, content} messages, rendered "
           "with the student tokenizer's chat template); with chat every figure averages over the assistant "
           "replies only.")
@_opt("--messages-field", help="Field holding a conversation's messages (--corpus-format chat).")
@_opt("--chat-template", help="Jinja chat template file for --corpus-format chat (default: the tokenizer's own).")
@_opt("--teacher", field="teachers", multiple=True,
      help="Teacher model directory or hub id, or LABEL=DIR, with the student's tokenizer; repeat. Scored alone "
           "before the students (one model resident at a time), on the --dataset windows or on those of the "
           "--teacher-data caches (joining them in the fused target, after the caches). DIR/FILE.gguf is "
           "accepted as the older spelling of DIR --gguf-file FILE.")
@_opt("--gguf-file", field="gguf_files", multiple=True,
      help="GGUF file inside a --teacher directory (dequantised), as in precompute; with several teachers "
           "LABEL=FILE. Repeat for several GGUF teachers.")
@_opt("--teacher-data", multiple=True,
      help="Teacher cache precomputed on held-out text; repeat. Joined as train-student joins them; KL over "
           "top-k plus a tail bucket. An aligned cache (a teacher with another tokenizer) also gives that "
           "teacher's perplexity over the positions where its next-token log-prob is exact.")
@_opt("--observed-correction/--no-observed-correction", field="observed_correction",
      help="Aligned caches: put the exact log-prob of the observed next token into their target, as "
           "train-student does.")
@_opt("--verify", type=click.Choice(["full", "stamp", "off"]),
      help="Check of the caches' shards on open, as in train-student.")
@_opt("--tokenizer", help="Tokenizer directory or .gguf file (default: the first student's directory).")
@_opt("--seq-len", type=int,
      help=f"Tokens per packed window (--dataset only). Default: {DEFAULT_SEQ_LEN} (precompute's default), lowered "
           "to the smallest max_position_embeddings of the models; with --teacher-data the caches' seq_len.")
@_opt("--max-tokens", type=int, help="Evaluate at most this many tokens (whole windows).")
@_opt("--batch-size", type=int, help="Windows per forward pass.")
@_opt("--top-k", type=int,
      help="Log-probs kept per position of each live --teacher (with its exact entropy) for the students' pass, "
           "as precompute's --top-k. The KL is over top-k plus a tail bucket; at the vocab size it is the full KL.")
@_opt("--teacher-weighting", field="teacher_weighting", type=click.Choice(WEIGHTINGS), help=choices_help())
@_alias("--weighting", "weighting_alias", "--teacher-weighting")
@_opt("--teacher-weights", field="teacher_weights", type=FLOAT_LIST,
      help=setting_help("teacher_weights") + " Teacher order: --teacher-data caches, then --teacher models.")
@_opt("--entropy-eps", field="entropy_eps", type=FINITE_FLOAT, help=setting_help("entropy_eps"))
@_opt("--weight-beta", field="weight_beta", type=FINITE_FLOAT, help=setting_help("weight_beta"))
@_opt("--weight-floor", field="weight_floor", type=FINITE_FLOAT, help=setting_help("weight_floor"))
@_opt("--bleu-prompts", type=int, help="Held-out prompts continued greedily for BLEU (0: skip).")
@_opt("--prompt-tokens", type=int, help="Tokens per BLEU prompt.")
@_opt("--new-tokens", type=int, help="Tokens of each greedy continuation.")
@_opt("--output", help="Write the results as JSON to this file.")
@_opt("--overwrite", is_flag=True,
      help="Replace the evaluation report already at --output (never a file of another kind, nor an input).")
@_opt("--bootstrap", type=int,
      help="Paired-bootstrap replicates (over held-out windows) for the difference between the first student and "
           "each other one: perplexity, NLL and KL to the fused target with 95% intervals (0: skip).")
@_opt("--seed", type=int, help="Seed of the bootstrap.")
@_opt("--device", type=DeviceParam(), help=DEVICE_HELP)
@_opt("--dtype", type=click.Choice(DTYPES),
      help="Weights and activations of every model: auto is bfloat16 on CUDA and float32 on CPU. Metrics are "
           "computed from float32 logits either way.")
def evaluate_cmd(data_alias: str | None, weighting_alias: str | None, **options: Any) -> None:
    """Evaluate students on held-out text: perplexity, KL to each teacher and to the fused target,
    top-1 agreement with the fused target, BLEU of greedy continuations. Models are loaded one at a time."""
    ctx = click.get_current_context()
    for name, old, flag, old_flag in (("data", data_alias, "--dataset", "--data"),
                                      ("teacher_weighting", weighting_alias, "--teacher-weighting", "--weighting")):
        if old is not None:
            if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
                raise ConfigError(f"give {flag} once ({old_flag} is its old spelling)")
            options[name] = old
    lists = ("students", "teachers", "gguf_files", "teacher_data")
    cfg = EvalConfig(**{k: list(v) if k in lists or (k == "teacher_weights" and v) else v
                        for k, v in options.items()})
    result = run_evaluate(cfg)
    click.echo(format_table(result))
    if result["comparisons"]:
        click.echo(format_comparisons(result))
    if cfg.output:
        click.echo(f"results written to {cfg.output}")
