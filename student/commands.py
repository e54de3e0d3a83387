"""`train-student` and `plot` commands (thin: options -> TrainConfig -> run_train)."""

from __future__ import annotations

import os

import click

from common.devices import DeviceParam
from common.errors import ConfigError
from common.params import FINITE_FLOAT, FLOAT_LIST, parse_float_list


def parse_floats(option: str, text: str | None) -> tuple[float, ...] | None:
    """'0.5,0.3,0.2' -> (0.5, 0.3, 0.2); None stays None; anything else (not a number, NaN, infinity) is a
    ConfigError naming `option`."""
    if text is None:
        return None
    try:
        return parse_float_list(text)
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from None


@click.command("train-student")
@click.option("--teacher-data", "teacher_data", multiple=True, required=True,
              help="A teacher cache directory from `precompute`; repeat for K teachers. They must share tokenizer, "
                   "seq_len, corpus, sequence ids and temperature; their top-k may differ (each teacher is compared "
                   "on its own top-k plus its own tail).")
@click.option("--output", required=True, help="Run directory (checkpoints/, metrics.jsonl, final/).")
@click.option("--student", default="tiny", show_default=True,
              help="Model directory (pretrained, e.g. from init-student, or config only), hub id, JSON config file "
                   "({\"model_type\": \"llama\", ...}) or preset (tiny, small). Its vocab must equal the teachers' "
                   "vocab_size.")
@click.option("--freeze-embeddings", is_flag=True,
              help="Do not train the input embeddings. With tied embeddings (one matrix for input and output) this "
                   "freezes the output head too.")
@click.option("--freeze-lm-head", is_flag=True,
              help="Do not train the output head. With tied embeddings this freezes the input embeddings too.")
@click.option("--tokenizer", default=None, help="Tokenizer directory saved beside the final student.")
@click.option("--loss", "loss_name", type=click.Choice(["kd", "dkd"]), default="kd", show_default=True,
              help="Distillation term: sparse KL to the fused target, or decoupled KD (baseline).")
@click.option("--lambda-kd", type=FINITE_FLOAT, default=0.5, show_default=True,
              help="L = lambda*KD + (1-lambda)*CE + gamma*feat; 0 = CE only.")
@click.option("--gamma-feat", type=FINITE_FLOAT, default=0.0, show_default=True,
              help="Weight of pooled-feature alignment (0: off).")
@click.option("--feat-weights", type=FLOAT_LIST, default=None, help="beta_k per teacher for the feature loss, e.g. 1,0.5 (default 1 each).")
@click.option("--teacher-pool-layer", type=int, default=None,
              help="Teacher pooled layer to align to (default: each teacher's highest stored layer); teachers "
                   "without it get no feature loss (with a warning).")
@click.option("--student-pool-layer", type=int, default=-1, show_default=True,
              help="Student decoder block whose output is mean-pooled (0-based, negative from the end).")
@click.option("--teacher-weighting", type=click.Choice(["entropy", "uniform", "fixed"]), default="entropy",
              show_default=True, help="Per-position teacher weights: 1/(H+eps) normalised, 1/K, or --teacher-weights.")
@click.option("--teacher-weights", type=FLOAT_LIST, default=None, help="Fixed weights in --teacher-data order, e.g. 0.5,0.3,0.2.")
@click.option("--temperature", type=FINITE_FLOAT, default=None,
              help="Must equal the caches' precompute temperature (the default); the KL is scaled by tau^2.")
@click.option("--dkd-alpha", type=FINITE_FLOAT, default=1.0, show_default=True, help="DKD target-class (TCKD) weight.")
@click.option("--dkd-beta", type=FINITE_FLOAT, default=8.0, show_default=True, help="DKD non-target (NCKD) weight.")
@click.option("--loss-chunk-size", type=int, default=None,
              help="Compute the student's logits, CE and KD in chunks of this many positions (never the full "
                   "[batch*seq, vocab] logits; --loss kd, not --fsdp). Default: unchunked.")
@click.option("--observed-correction/--no-observed-correction", default=True, show_default=True,
              help="Aligned caches (a teacher with another tokenizer): use the teacher's exact probability of the "
                   "observed next token where the cache has it, rescaling its other entries (student/observed.py).")
@click.option("--lr", type=FINITE_FLOAT, default=1e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--weight-decay", type=FINITE_FLOAT, default=0.01, show_default=True, help="AdamW weight decay.")
@click.option("--warmup-steps", type=int, default=10, show_default=True, help="Linear warmup steps before cosine decay.")
@click.option("--grad-clip", type=FINITE_FLOAT, default=1.0, show_default=True, help="Global grad-norm clip (0: off).")
@click.option("--max-steps", type=int, default=200, show_default=True, help="Optimizer steps (schedule length).")
@click.option("--stop-after", type=int, default=None,
              help="Stop with a checkpoint after this many steps (time-limited jobs); continue with --resume.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per micro-batch per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--eval-fraction", type=FINITE_FLOAT, default=0.05, show_default=True,
              help="Fraction of cached sequences held out (never trained on) for evaluation, at most 512 "
                   "sequences (evaluation stays a small share of step time; the log prints it).")
@click.option("--eval-sequences", type=int, default=None,
              help="Held-out sequence count (overrides --eval-fraction and its 512 cap; 0: no evaluation).")
@click.option("--eval-every", type=int, default=50, show_default=True,
              help="Evaluate held-out perplexity and KL to the fused target every N steps (0: only at the end).")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: only at the end).")
@click.option("--log-every", type=int, default=10, show_default=True, help="Write a metrics.jsonl line every N steps.")
@click.option("--resume", is_flag=True, help="Continue exactly from the latest checkpoint in --output.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of init, data order and RNGs.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed that picks the held-out sequences.")
@click.option("--num-workers", type=int, default=2, show_default=True, help="DataLoader worker processes (0: none).")
@click.option("--prefetch-factor", type=int, default=2, show_default=True, help="Batches each worker loads ahead.")
@click.option("--device", type=DeviceParam(), default="auto", show_default=True,
              help="auto = cuda when available (bf16 autocast; under torchrun cuda:LOCAL_RANK), else cpu; "
                   "cuda:N for one process on GPU N.")
@click.option("--verify", type=click.Choice(["full", "stamp", "off"]), default="stamp", show_default=True,
              help="How rank 0 checks the caches before step 1: sha256 of every shard (full), only of shards no "
                   "verified stamp covers (stamp; precompute, inspect and merge --verify write stamps), or none "
                   "(off). Sizes are always checked; --resume never re-hashes.")
@click.option("--fsdp", is_flag=True, help="Under torchrun, shard the student with FSDP2 fully_shard instead of DDP.")
def train_student_cmd(**kw) -> None:
    """Stage two: train a student from the cached targets of K teachers.

    \b
    Single process:  python cli.py train-student --teacher-data A --teacher-data B --output runs/s
    Multi-process:   torchrun --nproc-per-node 2 cli.py train-student ... (DDP; --fsdp to shard)

    The KD term per position is sum_k alpha_k KL_k: each teacher's top-k plus its own tail bucket against the
    student's view on the same partition; it uses all L positions, CE/DKD the L-1 that have a next token.
    """
    import logging

    from student.config import LossConfig, OptimConfig, TrainConfig
    from student.trainer import run_train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loss = LossConfig(
        loss=kw["loss_name"], lambda_kd=kw["lambda_kd"], gamma_feat=kw["gamma_feat"], temperature=kw["temperature"],
        teacher_weighting=kw["teacher_weighting"], teacher_weights=kw["teacher_weights"],
        feat_weights=kw["feat_weights"], teacher_pool_layer=kw["teacher_pool_layer"],
        student_pool_layer=kw["student_pool_layer"], dkd_alpha=kw["dkd_alpha"], dkd_beta=kw["dkd_beta"],
        chunk_size=kw["loss_chunk_size"], observed_correction=kw["observed_correction"])
    optim = OptimConfig(lr=kw["lr"], weight_decay=kw["weight_decay"], warmup_steps=kw["warmup_steps"],
                        grad_clip=kw["grad_clip"])
    cfg = TrainConfig(
        teacher_data=list(kw["teacher_data"]), output=kw["output"], student=kw["student"], tokenizer=kw["tokenizer"],
        freeze_embeddings=kw["freeze_embeddings"], freeze_lm_head=kw["freeze_lm_head"],
        loss=loss, optim=optim, max_steps=kw["max_steps"], stop_after=kw["stop_after"], batch_size=kw["batch_size"],
        grad_accum=kw["grad_accum"], eval_fraction=kw["eval_fraction"], eval_sequences=kw["eval_sequences"],
        eval_every=kw["eval_every"], save_every=kw["save_every"], log_every=kw["log_every"], resume=kw["resume"],
        seed=kw["seed"], split_seed=kw["split_seed"], num_workers=kw["num_workers"],
        prefetch_factor=kw["prefetch_factor"], device=kw["device"], fsdp=kw["fsdp"], verify=kw["verify"])
    result = run_train(cfg)
    if result and os.environ.get("RANK", "0") == "0":
        click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                            if not isinstance(v, dict)), err=True)


@click.command("plot")
@click.argument("run_dir")
@click.option("--output", default=None,
              help="Image path (default RUN_DIR/curves.png); .png is appended when it has no extension.")
@click.option("--out", "out_alias", default=None, hidden=True, help="Old spelling of --output.")
def plot_cmd(run_dir: str, output: str | None, out_alias: str | None) -> None:
    """Draw the training and held-out curves of RUN_DIR (its metrics.jsonl) to a PNG."""
    from student.plotting import plot_run

    if output is not None and out_alias is not None:
        raise ConfigError("give --output once (--out is its old spelling)")
    click.echo(plot_run(run_dir, output or out_alias))
