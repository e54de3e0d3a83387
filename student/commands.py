"""`init-student`, `train-student` and `plot` commands (thin: options -> config -> one run function).

Their options are generated from `INIT_STUDENT_OPTIONS`, `TRAIN_OPTIONS` and `PLOT_OPTIONS`
(common/config_cli.py): each maps onto one InitStudentConfig, TrainConfig or PlotConfig field and takes its
default from the dataclass; `--config DIR/init_student.json` and `--config RUN/config.json` replay a run (plot
writes no config, so it has no `--config`).
"""

from __future__ import annotations

import os

import click

from common.config_cli import Opt, build_config, config_options, corpus_source_options
from common.devices import DeviceParam
from common.errors import ConfigError
from common.params import FINITE_FLOAT, FLOAT_LIST, parse_float_list
from storage.stamps import VERIFY_MODES
from student.config import LOSSES, InitStudentConfig, PlotConfig, TrainConfig
from student.weighting import weighting_options


def parse_floats(option: str, text: str | None) -> tuple[float, ...] | None:
    """'0.5,0.3,0.2' -> (0.5, 0.3, 0.2); None stays None; anything else (not a number, NaN, infinity) is a
    ConfigError naming `option`."""
    if text is None:
        return None
    try:
        return parse_float_list(text)
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from None


# One row per InitStudentConfig field: the defaults come from the dataclass (student/config.py).
INIT_STUDENT_OPTIONS: tuple[Opt, ...] = (
    Opt(field="teacher", flag="--from",
        help="Teacher to cut: a hub id, a local model directory, or a directory holding --gguf-file. Required "
             "(or --config)."),
    Opt(field="gguf_file", flag="--gguf-file", help="GGUF file name inside --from (de-quantised to float32)."),
    Opt(field="revision", flag="--revision", help="Hub revision of the teacher."),
    Opt(field="keep_layers", flag="--keep-layers",
        help="Blocks to keep: explicit blocks/ranges, 0-based and inclusive (0-5,24-29), or a count N: the N "
             "blocks of highest ShortGPT Block Influence (1 - cos between a block's input and output, averaged "
             "over the calibration tokens; one forward pass, no gradients; drops the blocks that change their "
             "input least). Required (or --config)."),
    Opt(field="output", flag="--output",
        help="Directory for the student (save_pretrained + tokenizer + init_student.json). Required (or --config)."),
    *corpus_source_options(
        dataset_help="Calibration corpus, as precompute --dataset (needed for a count; with a list, scores are "
                     "recorded too).",
        fields={"revision": None}, text_field_help="Column holding the document text."),
    Opt(field="calibration_tokens", flag="--calibration-tokens", type=int,
        help="Tokens of the calibration slice (the first ones of the packed corpus)."),
    Opt(field="seq_len", flag="--seq-len", type=int, help="Calibration window length."),
    Opt(field="batch_size", flag="--batch-size", type=int, help="Calibration windows per forward."),
    Opt(field="trust_remote_code", flag="--trust-remote-code", help="Allow custom model code from the hub."),
    Opt(field="overwrite", flag="--overwrite",
        help="Replace the model directory already at --output (never the teacher or another kind of output)."),
)
INIT_STUDENT_INTERNAL: tuple[str, ...] = ()
"""InitStudentConfig fields deliberately without an option (none: every field can be set)."""


@click.command("init-student")
@config_options(InitStudentConfig, INIT_STUDENT_OPTIONS,
                config_help="Replay a cut: the init_student.json it wrote in its --output (its config member), or "
                            "a file of InitStudentConfig fields. Options given beside it override its fields (e.g. "
                            "--output).")
@click.pass_context
def init_student_cmd(ctx: click.Context, **kw: object) -> None:
    """Cut a student from a teacher by dropping decoder blocks (depth pruning).

    \b
    python cli.py init-student --from TEACHER --keep-layers 0-5,24-29 --output DIR
    python cli.py init-student --from TEACHER --keep-layers 12 --dataset data/corpus/train.jsonl --output DIR

    DIR loads with AutoModelForCausalLM and as train-student --student DIR.
    """
    import logging

    from student.pruning import CARD_CONFIG, run_init_student

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = build_config(InitStudentConfig, INIT_STUDENT_OPTIONS, ctx, kw, member=CARD_CONFIG)
    card = run_init_student(cfg)
    scores = card["scores"]
    click.echo(f"kept {len(card['kept_blocks'])} of {card['teacher_blocks']} blocks {card['kept_blocks']}; "
               f"{card['parameters_student']:,} parameters (teacher {card['parameters_teacher']:,}) -> {cfg.output}")
    if scores is not None:
        click.echo("block influence: " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)))


# One row per TrainConfig field: the defaults come from the dataclasses (student/config.py).
TRAIN_OPTIONS: tuple[Opt, ...] = (
    Opt(field="teacher_data", flag="--teacher-data", multiple=True,
        help="A teacher cache directory from `precompute`; repeat for K teachers. They must share tokenizer, "
             "seq_len, corpus, sequence ids and temperature; their top-k may differ (each teacher is compared on "
             "its own top-k plus its own tail). Required (or --config)."),
    Opt(field="output", flag="--output", help="Run directory (checkpoints/, metrics.jsonl, config.json, final/). "
                                              "Required (or --config)."),
    Opt(field="student", flag="--student",
        help="Model directory (pretrained, e.g. from init-student, or config only), hub id, JSON config file "
             "({\"model_type\": \"llama\", ...}) or preset (tiny, small). Its vocab must equal the teachers' "
             "vocab_size."),
    Opt(field="freeze_embeddings", flag="--freeze-embeddings",
        help="Do not train the input embeddings. With tied embeddings (one matrix for input and output) this "
             "freezes the output head too."),
    Opt(field="freeze_lm_head", flag="--freeze-lm-head",
        help="Do not train the output head. With tied embeddings this freezes the input embeddings too."),
    Opt(field="tokenizer", flag="--tokenizer", help="Tokenizer directory saved beside the final student."),
    Opt(field="loss.loss", flag="--loss", dest="loss_name", type=click.Choice(LOSSES),
        help="Distillation term: sparse KL to the fused target, or decoupled KD (baseline)."),
    Opt(field="loss.lambda_kd", flag="--lambda-kd", type=FINITE_FLOAT,
        help="L = lambda*KD + (1-lambda)*CE + gamma*feat; 0 = CE only."),
    Opt(field="loss.gamma_feat", flag="--gamma-feat", type=FINITE_FLOAT,
        help="Weight of pooled-feature alignment (0: off)."),
    Opt(field="loss.feat_weights", flag="--feat-weights", type=FLOAT_LIST,
        help="beta_k per teacher for the feature loss, e.g. 1,0.5 (default 1 each)."),
    Opt(field="loss.teacher_pool_layer", flag="--teacher-pool-layer", type=int,
        help="Teacher pooled layer to align to (default: each teacher's highest stored layer); teachers without "
             "it get no feature loss (with a warning)."),
    Opt(field="loss.student_pool_layer", flag="--student-pool-layer", type=int,
        help="Student decoder block whose output is mean-pooled (0-based, negative from the end)."),
    *weighting_options(prefix="loss."),
    Opt(field="loss.temperature", flag="--temperature", type=FINITE_FLOAT,
        help="Must equal the caches' precompute temperature (the default); the KL is scaled by tau^2."),
    Opt(field="loss.dkd_alpha", flag="--dkd-alpha", type=FINITE_FLOAT, help="DKD target-class (TCKD) weight."),
    Opt(field="loss.dkd_beta", flag="--dkd-beta", type=FINITE_FLOAT, help="DKD non-target (NCKD) weight."),
    Opt(field="loss.chunk_size", flag="--loss-chunk-size", type=int,
        help="Compute the student's logits, CE and KD in chunks of this many positions (never the full "
             "[batch*seq, vocab] logits; --loss kd, not --fsdp). Default: unchunked."),
    Opt(field="loss.observed_correction", flag="--observed-correction/--no-observed-correction",
        help="Aligned caches (a teacher with another tokenizer): use the teacher's exact probability of the "
             "observed next token where the cache has it, rescaling its other entries (student/observed.py)."),
    Opt(field="optim.lr", flag="--lr", type=FINITE_FLOAT, help="Peak AdamW learning rate."),
    Opt(field="optim.weight_decay", flag="--weight-decay", type=FINITE_FLOAT, help="AdamW weight decay."),
    Opt(field="optim.betas", flag="--betas", type=FLOAT_LIST, help="AdamW betas: two values in [0, 1), e.g. 0.9,0.95."),
    Opt(field="optim.warmup_steps", flag="--warmup-steps", type=int, help="Linear warmup steps before cosine decay."),
    Opt(field="optim.min_lr_ratio", flag="--min-lr-ratio", type=FINITE_FLOAT,
        help="Final learning rate of the cosine decay, as a fraction of --lr (0..1)."),
    Opt(field="optim.grad_clip", flag="--grad-clip", type=FINITE_FLOAT, help="Global grad-norm clip (0: off)."),
    Opt(field="max_steps", flag="--max-steps", type=int, help="Optimizer steps (schedule length)."),
    Opt(field="stop_after", flag="--stop-after", type=int,
        help="Stop with a checkpoint after this many steps (time-limited jobs); continue with --resume."),
    Opt(field="batch_size", flag="--batch-size", type=int, help="Sequences per micro-batch per process."),
    Opt(field="grad_accum", flag="--grad-accum", type=int, help="Micro-batches per optimizer step (at most 2**20)."),
    Opt(field="eval_fraction", flag="--eval-fraction", type=FINITE_FLOAT,
        help="Fraction of cached sequences held out (never trained on) for evaluation, at most 512 sequences "
             "(evaluation stays a small share of step time; the log prints it)."),
    Opt(field="eval_sequences", flag="--eval-sequences", type=int,
        help="Held-out sequence count (overrides --eval-fraction and its 512 cap; 0: no evaluation)."),
    Opt(field="eval_every", flag="--eval-every", type=int,
        help="Evaluate held-out perplexity and KL to the fused target every N steps (0: only at the end)."),
    Opt(field="save_every", flag="--save-every", type=int, help="Checkpoint every N steps (0: only at the end)."),
    Opt(field="log_every", flag="--log-every", type=int, help="Write a metrics.jsonl line every N steps."),
    Opt(field="resume", flag="--resume", help="Continue exactly from the latest checkpoint in --output."),
    Opt(field="seed", flag="--seed", type=int, help="Seed of init, data order and RNGs."),
    Opt(field="split_seed", flag="--split-seed", type=int, help="Seed that picks the held-out sequences."),
    Opt(field="num_workers", flag="--num-workers", type=int, help="DataLoader worker processes (0: none)."),
    Opt(field="prefetch_factor", flag="--prefetch-factor", type=int, help="Batches each worker loads ahead."),
    Opt(field="spot_check", flag="--spot-check", type=int,
        help="Sequences whose input_ids are compared across teachers when they are joined (every batch is "
             "checked too; 0: only the batches)."),
    Opt(field="device", flag="--device", type=DeviceParam(),
        help="auto = cuda when available (bf16 autocast; under torchrun cuda:LOCAL_RANK), else cpu; cuda:N for "
             "one process on GPU N."),
    Opt(field="verify", flag="--verify", type=click.Choice(VERIFY_MODES),
        help="How rank 0 checks the caches before step 1: sha256 of every shard (full), only of shards no "
             "verified stamp covers (stamp; precompute, inspect and merge --verify write stamps), or none (off). "
             "Sizes are always checked; --resume never re-hashes."),
    Opt(field="fsdp", flag="--fsdp", help="Under torchrun, shard the student with FSDP2 fully_shard instead of DDP."),
)
TRAIN_INTERNAL: tuple[str, ...] = ()
"""TrainConfig fields deliberately without an option (none: every field can be set)."""


@click.command("train-student")
@config_options(TrainConfig, TRAIN_OPTIONS,
                config_help="Replay a run: the config.json a train-student run wrote in its --output. Options given "
                            "beside it override its fields (e.g. --output to train a copy elsewhere).")
@click.pass_context
def train_student_cmd(ctx: click.Context, **kw: object) -> None:
    """Stage two: train a student from the cached targets of K teachers.

    \b
    Single process:  python cli.py train-student --teacher-data A --teacher-data B --output runs/s
    Multi-process:   torchrun --nproc-per-node 2 cli.py train-student ... (DDP; --fsdp to shard)

    The KD term per position is sum_k alpha_k KL_k: each teacher's top-k plus its own tail bucket against the
    student's view on the same partition; it uses all L positions, CE/DKD the L-1 that have a next token.
    """
    import logging

    from student.trainer import run_train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = build_config(TrainConfig, TRAIN_OPTIONS, ctx, kw)
    result = run_train(cfg)
    if result and os.environ.get("RANK", "0") == "0":
        click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                            if not isinstance(v, dict)), err=True)


PLOT_OPTIONS: tuple[Opt, ...] = (
    Opt(field="run_dir", flag="RUN_DIR", argument=True, help="Run directory whose metrics.jsonl is drawn."),
    Opt(field="output", flag="--output", hidden_aliases=("--out",),
        help="Image path (default RUN_DIR/curves.png); .png is appended when it has no extension."),
    Opt(field="overwrite", flag="--overwrite",
        help="Replace the figure already at --output (never a file of another kind)."),
)


@click.command("plot")
@config_options(PlotConfig, PLOT_OPTIONS, config_help=None)
@click.pass_context
def plot_cmd(ctx: click.Context, **kw: object) -> None:
    """Draw the training and held-out curves of RUN_DIR (its metrics.jsonl) to a PNG."""
    from student.plotting import plot_run

    cfg = build_config(PlotConfig, PLOT_OPTIONS, ctx, kw)
    click.echo(plot_run(cfg.run_dir, cfg.output, overwrite=cfg.overwrite))
