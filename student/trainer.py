"""Stage two: train a student from K teachers' cached targets.

    run_train(cfg)  ==  Trainer(cfg): setup() -> train() -> close()

The trainer orchestrates; what it runs is built and kept elsewhere, each part testable alone:
`Parallelism` (student/parallel.py) decides once how the run spans processes (one process, DDP, or FSDP2
with `fsdp`; only rank 0 writes files, layout: student/rundir.py); student/builders.py builds the caches,
the loss, the data, the model and the optimizer from the config; the objective is `DistillLoss`
(student/loss/objective.py) on typed `DistillBatch`es (student/batch.py); checkpoints are written and chosen
by `CheckpointManager` (student/checkpoint.py) from the stateful parts it is handed; metrics.jsonl by
`MetricsWriter` (student/metrics_log.py); held-out figures by `Validator` (student/validation.py).
`compute_loss(batch)` and `train_step(batches)` are the public steps benchmarks and tests drive.

A non-finite loss or gradient norm stops training before the optimizer step, and a checkpoint or final
model with a non-finite weight is never written (student/divergence.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator

import torch

from common.errors import ConfigError, UserError
from student import builders
from student import data as sdata
from student import model as smodel
from student.batch import DistillBatch, FailedBatch
from student.builders import DistillModule
from student.checkpoint import CheckpointError, CheckpointManager, seed_everything, set_rng_state
from student.config import TrainConfig
from student.divergence import DivergedError, check_metrics, check_step, check_weights
from student.loss.objective import LossTerms
from student.metrics_log import MetricsWriter
from student.parallel import Parallelism
from student.rundir import CONFIG_FILE, FINAL_DIR, claim_output, writing
from student.targets import OBSERVED_SOURCES
from student.validation import Validator

__all__ = ["CheckpointError", "DistillModule", "DivergedError", "StepResult", "Trainer", "run_train"]

log = logging.getLogger("student")


@dataclasses.dataclass(kw_only=True)
class StepResult:
    """One optimizer step's outcome (tensors on the training device)."""

    terms: dict[str, torch.Tensor]
    """`LossTerms` fields averaged over the step's micro-batches (alpha: [K])."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate the step used."""


def run_train(cfg: TrainConfig) -> dict[str, float]:
    """Train per `cfg`; returns the last evaluation (eval_kl, eval_ppl, ...) or the last train metrics."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.step = 0
        self.epoch, self.micro_in_epoch = 0, 0

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Decide the parallelism, claim the run directory, then build every part from the config (in the order
        of student/builders.py) and resume from the newest checkpoint when asked."""
        cfg = self.cfg
        self.parallel = p = Parallelism.from_config(cfg)
        self.rank, self.device, self.autocast = p.rank, p.device, p.autocast()
        # rank 0 checks, creates and locks the run directory before any cache is opened or model built
        self.run_lock = p.on_rank0(lambda: claim_output(cfg), catch=UserError, elsewhere=ConfigError)
        self.teachers = builders.open_caches(cfg, p)
        m0 = self.teachers[0].manifest
        self.names = _unique_names([t.manifest.teacher.name for t in self.teachers])
        masked = sdata.loss_mask_column(m0) is not None
        self.positions_note = {"positions": sdata.LOSS_MASK_POSITIONS} if masked else {}
        """Conversations: every metrics line says its CE, KD, KL and perplexity average over the loss mask."""
        if masked:
            log.info("the caches hold conversations: CE, KD, KL and perplexity are averaged over %s",
                     sdata.LOSS_MASK_POSITIONS)
        self.loss_fn, pool_layers = builders.build_loss(cfg, self.teachers)
        self.use_feat = any(x is not None for x in pool_layers)
        self.observed_counts: torch.Tensor | None = None  # [K, 3] int64 over the training batches of this run
        self.data = d = builders.build_data(cfg, self.teachers, pool_layers, p)
        self.train_set, self.sampler, self.train_loader = d.train_set, d.sampler, d.train_loader
        self.eval_set, self.eval_loader = d.eval_set, d.eval_loader
        self.validator = Validator(d.eval_loader, sequences=d.eval_set.positions.size, temperature=m0.temperature,
                                   parallel=p)
        self.tokenizer = builders.final_tokenizer(cfg.tokenizer, m0)
        self.special_ids = builders.special_ids(self.tokenizer)
        self.module = builders.build_model(cfg, self.teachers, pool_layers, self.special_ids, p.device)
        self.model = p.wrap(self.module)
        self.optimizer, self.scheduler = builders.build_optimizer(self.model, cfg)
        parts = {**p.state_parts(self.model, self.module, self.optimizer), "scheduler": self.scheduler}
        self.checkpoints = CheckpointManager(cfg.output, rank=p.rank, world_size=p.world, parts=parts)
        self.metrics = MetricsWriter(cfg.output, rank=p.rank)
        self._maybe_resume()
        if p.rank == 0:
            path = os.path.join(cfg.output, CONFIG_FILE)
            with writing(path), open(path, "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        self.metrics.start(resumed_at=self.step if self.resumed else None)  # a fresh run starts a fresh log
        if not self.resumed:  # a resumed run restores every RNG from the checkpoint instead
            seed_everything(cfg.seed + p.rank)

    def _maybe_resume(self) -> None:
        found = self.checkpoints.resume(dataclasses.asdict(self.cfg), requested=self.cfg.resume,
                                        output=self.cfg.output)
        self.resumed = found is not None
        if found is None:
            return
        self.checkpoints.restore(found)  # model, optimizer, schedule
        state = found.state
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        set_rng_state(state["rng"][self.rank])
        log.info("resumed from %s (step %d, epoch %d, micro-batch %d)", found.path, self.step, self.epoch,
                 self.micro_in_epoch)

    # ---- train ---------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[DistillBatch | FailedBatch]:
        """Endless stream of training micro-batches, starting at the saved data position."""
        while True:
            self.sampler.set_epoch(self.epoch, self.micro_in_epoch)
            for batch in self.train_loader:
                self.micro_in_epoch += 1  # counts consumed micro-batches: a checkpoint resumes after them
                yield batch
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0

    def compute_loss(self, batch: DistillBatch | FailedBatch, *, train: bool) -> LossTerms:
        """The objective's terms for one micro-batch (forward only; `train` enables the KD gradient, DKD and
        the feature term). MismatchError when the teachers' tokens differ in this batch; a `FailedBatch` (a
        loader worker could not read its data) raises the worker's error."""
        batch.check()
        b = batch.to(self.device)
        want_feat = self.use_feat and self.loss_fn.gamma_feat > 0 and train
        if self.loss_fn.chunked:
            with self.autocast:
                (ce, kd), pooled = self.model(b.input_ids, want_feat, b.fused, self.loss_fn, b.loss_mask)
        else:
            with self.autocast:
                logits, pooled = self.model(b.input_ids, want_feat)  # [B, L, V]
            ce, kd = self.loss_fn.logit_terms(logits, b.input_ids, b.fused, train=train, loss_mask=b.loss_mask)
        if want_feat:
            feat = self.loss_fn.feature(pooled, b.pooled, self.module.projection_list())
        else:
            feat = torch.zeros((), device=self.device)
        return self.loss_fn.combine(ce, kd, feat, b.fused)

    def train_step(self, batches: Iterable[DistillBatch | FailedBatch]) -> StepResult:
        """One optimizer step over the next `grad_accum` micro-batches of `batches`: forward, backward (DDP
        synchronises on the last), gradient clipping, finite checks, AdamW and the schedule. `self.step` counts
        it. DivergedError, before the optimizer step, when the loss or the gradient norm is not finite."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        self.model.train()
        micro = -1
        for micro, batch in enumerate(itertools.islice(batches, cfg.grad_accum)):
            with self.parallel.no_sync(self.model, sync=micro == cfg.grad_accum - 1):
                terms = self.compute_loss(batch, train=True)
                (terms.loss / cfg.grad_accum).backward()
            if batch.observed_counts is not None:
                prev = self.observed_counts
                self.observed_counts = batch.observed_counts if prev is None else prev + batch.observed_counts
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach() / cfg.grad_accum
        if micro != cfg.grad_accum - 1:
            raise ValueError(f"train_step needs {cfg.grad_accum} micro-batches (grad_accum), got {micro + 1}")
        # the norm is measured even without clipping (max_norm=inf scales by exactly 1) to catch inf/NaN
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        check_step(sums["loss"], grad_norm, parallel=self.parallel, step=self.step + 1,
                   last_checkpoint=lambda: (self.checkpoints.names() or [None])[-1])
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(terms=sums, grad_norm=grad_norm, lr=lr)

    def train(self) -> dict[str, float]:
        """Optimizer steps up to `max_steps` (or `stop_after`), logging, evaluating and checkpointing on their
        schedules; a finished run ends with a held-out evaluation, a checkpoint and the final student."""
        from tqdm import tqdm

        cfg = self.cfg
        stop = cfg.stop_after if cfg.stop_after is not None else cfg.max_steps
        stream = self._micro_batches()
        bar = self.bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                              disable=self.rank != 0, dynamic_ncols=True)
        last: dict[str, float] = {}
        if self.step >= cfg.max_steps:  # resumed a finished run: its final evaluation is already logged
            log.info("the run in %s is already finished (step %d of %d); nothing to train", cfg.output,
                     self.step, cfg.max_steps)
            bar.close()
            if not any(os.path.isfile(os.path.join(cfg.output, FINAL_DIR, f)) for f in smodel.WEIGHT_FILES):
                self._save_final()  # killed between the last checkpoint and the final save
            return self.metrics.last()
        self.validator.mark = time.perf_counter()
        if self.step == 0 and cfg.eval_every and self.eval_set.positions.size:
            last = self._log_eval()
        t_log, steps_since_log = time.perf_counter(), 0
        while self.step < stop:
            result = self.train_step(stream)
            steps_since_log += 1
            if self.step % cfg.log_every == 0 or self.step == stop:
                last = self._log_train(result, self.data.tokens_per_step * steps_since_log
                                       / max(time.perf_counter() - t_log, 1e-9))
                t_log, steps_since_log = time.perf_counter(), 0
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                last = self._log_eval()
                t_log = time.perf_counter()  # evaluation time is not training throughput
            if self.step < stop and cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
                t_log = time.perf_counter()
        bar.close()
        _log_observed_sources(self.observed_counts, self.names, cfg.loss.teacher_weighting, self.parallel)
        if self.step >= cfg.max_steps:
            if self.eval_set.positions.size:
                last = self._log_eval()
            self.save_checkpoint()
            self._save_final()
        else:
            self.save_checkpoint()  # stopped early (--stop-after): resume later
        return last

    def _log_train(self, result: StepResult, tps: float) -> dict:
        """Write the train record of this step (terms averaged over ranks) at `tps` tokens per second."""
        sums = result.terms
        vals = self.parallel.all_mean(torch.stack([sums[k].float() for k in ("loss", "kd", "ce", "feat")]))
        alpha = self.parallel.all_mean(sums["alpha"].float())
        rec = {"step": self.step, "split": "train", "epoch": self.epoch, "lr": result.lr,
               **dict(zip(("loss", "kd", "ce", "feat"), vals.tolist(), strict=True)),
               "grad_norm": float(result.grad_norm),
               "alpha": dict(zip(self.names, alpha.tolist(), strict=True)), "tokens_per_s": tps}
        self._write_metrics(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", kd=f"{rec['kd']:.3f}", ce=f"{rec['ce']:.3f}",
                             tok_s=f"{tps:.0f}")
        return rec

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity (CE on positions 0..L-2) and KL to the fused target (all L positions)."""
        self.model.eval()
        return self.validator.run(self.compute_loss)

    def _log_eval(self) -> dict[str, float]:
        """Evaluate, and record its time against the time spent since the previous evaluation (training,
        logging, checkpoints): `eval_seconds` and `eval_share` in metrics.jsonl and the log."""
        res = self.validator.timed(self.evaluate, self.step)
        self._write_metrics(res)
        return res

    def _write_metrics(self, rec: dict) -> None:
        check_metrics(rec, step=self.step)
        rec.update(self.positions_note)  # conversations: the line (and the summary printed) names its positions
        self.metrics.write(rec)

    # ---- checkpoints and the final student -------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Checkpoint this step (every rank calls it; rank 0 writes; student/checkpoint.py): refused with
        DivergedError when a weight is not finite."""
        state = self.checkpoints.gather()
        check_weights(state["model"], parallel=self.parallel, step=self.step)
        return self.checkpoints.save(self.step, {**state, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                                                 "config": dataclasses.asdict(self.cfg)})

    def _save_final(self) -> None:
        """Write final/ (rank 0): the student without the projections, with the tokenizer."""
        model_sd = self.checkpoints.parts["model"].state_dict()  # full, also when sharded
        check_weights(model_sd, parallel=self.parallel, step=self.step)
        if self.rank == 0:
            student = self.module.student
            if self.parallel.sharded:  # rebuild an unsharded copy from the full state dict
                m0 = self.teachers[0].manifest
                student = smodel.build_student(self.cfg.student, vocab_size=m0.vocab_size, seq_len=m0.seq_len,
                                               seed=self.cfg.seed, special_ids=self.special_ids)
                student.load_state_dict({k[len("student."):]: v for k, v in model_sd.items()
                                         if k.startswith("student.")})
            with writing(os.path.join(self.cfg.output, FINAL_DIR)):
                smodel.save_student(student, os.path.join(self.cfg.output, FINAL_DIR), self.tokenizer)
        self.parallel.barrier()

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:  # ends the bar's line before an error message
            self.bar.close()
        for t in getattr(self, "teachers", []):
            t.close()
        if getattr(self, "run_lock", None) is not None:  # after the last write of this run
            self.run_lock.release()
        if getattr(self, "parallel", None) is not None:
            self.parallel.close()

def _unique_names(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _log_observed_sources(counts: torch.Tensor | None, names: list[str], weighting: str,
                          parallel: Parallelism) -> None:
    """Log, per teacher, how many training positions' log p(o) was exact, listed or bounded (student/targets.py;
    the observed-token weightings only), summed over ranks."""
    if counts is None:
        return
    counts = parallel.all_reduce(counts.clone().to(parallel.device))
    if parallel.rank != 0:
        return
    for name, row in zip(names, counts.cpu().tolist(), strict=True):
        total = max(sum(row), 1)
        log.info("teacher %r: log p(o) for --teacher-weighting %s at %d training positions: %s",
                 name, weighting, sum(row),
                 ", ".join(f"{n} {c} ({100.0 * c / total:.1f}%)" for n, c in zip(OBSERVED_SOURCES, row, strict=True)))
