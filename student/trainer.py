"""Stage two: train a student from K teachers' cached targets.

    run_train(cfg)  ==  Trainer(cfg): setup() -> train() -> close()

One process per device; under torchrun the student is wrapped in DDP (gloo on CPU, nccl on GPU) or, with
`fsdp`, sharded with FSDP2 `fully_shard`. Only rank 0 writes files (layout: student/rundir.py).

The trainer orchestrates; its components are testable alone: the objective is `DistillLoss`
(student/loss/objective.py) on typed `DistillBatch`es (student/batch.py), checkpoints are written and chosen
by `CheckpointManager` (student/checkpoint.py), metrics.jsonl by `MetricsWriter` (student/metrics_log.py).
`compute_loss(batch)` and `train_step(batches)` are the public steps benchmarks and tests drive.

A non-finite loss or gradient norm stops training before the optimizer step, and a checkpoint or final
model with a non-finite weight is never written.
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
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from common.errors import ConfigError, UserError
from common.params import non_finite
from storage.errors import MismatchError, ShardCorruptError, StorageError
from storage.manifest import Manifest
from student import data as sdata
from student import model as smodel
from student.batch import DistillBatch, FailedBatch
from student.checkpoint import CheckpointError, CheckpointManager, seed_everything, set_rng_state
from student.config import EVAL_SEQUENCES_CAP, TrainConfig
from student.loss.objective import DistillLoss, LossTerms
from student.fusion import FusedTargets
from student.metrics_log import MetricsWriter
from student.rundir import CONFIG_FILE, FINAL_DIR, claim_output, writing
from student.targets import OBSERVED_SOURCES

__all__ = ["CheckpointError", "DistillModule", "DivergedError", "StepResult", "Trainer", "run_train"]

log = logging.getLogger("student")


class DivergedError(UserError):
    """Training produced a non-finite loss, gradient norm or weight; nothing non-finite was saved."""


@dataclasses.dataclass(kw_only=True)
class StepResult:
    """One optimizer step's outcome (tensors on the training device)."""

    terms: dict[str, torch.Tensor]
    """`LossTerms` fields averaged over the step's micro-batches (alpha: [K])."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate the step used."""


class DistillModule(torch.nn.Module):
    """The student plus one projection W_k per teacher with features (dropped after training)."""

    def __init__(self, student: torch.nn.Module, proj_dims: list[int | None], pool_layer: int) -> None:
        super().__init__()
        self.student = student
        self.pool_layer = pool_layer
        width = smodel.hidden_width(student)
        self.projections = torch.nn.ModuleList(
            [torch.nn.Linear(width, d) if d is not None else torch.nn.Identity() for d in proj_dims])
        self.has_proj = [d is not None for d in proj_dims]

    def forward(self, input_ids: torch.Tensor, want_pooled: bool, fused: FusedTargets | None = None,
                loss: DistillLoss | None = None, loss_mask: torch.Tensor | None = None) -> tuple[Any, torch.Tensor | None]:
        """(logits [B, L, V], pooled [B, d_S] or None); with a chunked `loss` (and `fused`): ((CE, KD) computed
        in chunks from the final hidden states, pooled). The chunked terms are computed inside forward so DDP
        sees every use of the parameters."""
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i
        index = self.pool_layer + 1 if self.pool_layer >= 0 else self.pool_layer
        if loss is None or not loss.chunked:
            out = self.student(input_ids=input_ids, output_hidden_states=want_pooled, use_cache=False)
            pooled = out.hidden_states[index].float().mean(dim=1) if want_pooled else None  # [B, d_S]
            return out.logits, pooled
        assert fused is not None, "the chunked loss needs the fused targets"
        out = self.student.base_model(input_ids=input_ids, output_hidden_states=want_pooled, use_cache=False)
        pooled = out.hidden_states[index].float().mean(dim=1) if want_pooled else None
        weight = self.student.get_output_embeddings().weight
        return loss.chunked_terms(out.last_hidden_state, weight, input_ids, fused, loss_mask), pooled


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
        cfg, lc = self.cfg, self.cfg.loss
        self._setup_distributed()
        self._claim_output()
        self.teachers = sdata.join_teachers(cfg.teacher_data, spot_check=cfg.spot_check, seed=cfg.seed,
                                            verify=False)
        self._verify_caches()
        m0 = self.teachers[0].manifest
        self.names = _unique_names([t.manifest.teacher.name for t in self.teachers])
        masked = sdata.loss_mask_column(self.teachers[0].manifest) is not None
        self.positions_note = {"positions": sdata.LOSS_MASK_POSITIONS} if masked else {}
        """Conversations: every metrics line says its CE, KD, KL and perplexity average over the loss mask."""
        if masked:
            log.info("the caches hold conversations: CE, KD, KL and perplexity are averaged over %s",
                     sdata.LOSS_MASK_POSITIONS)
        self.temperature = m0.temperature
        if lc.temperature is not None and not math.isclose(lc.temperature, m0.temperature):
            raise ConfigError(f"--temperature {lc.temperature} differs from the caches' precompute temperature "
                              f"{m0.temperature}; top-k log-probs cannot be re-tempered exactly")
        sdata.check_weighting(self.teachers, lc.teacher_weighting, lc.weight_settings())
        sdata.check_loss(self.teachers, lc.loss)
        self.pool_layers = sdata.feature_layers(self.teachers, lc.teacher_pool_layer, lc.gamma_feat > 0)
        self.use_feat = any(x is not None for x in self.pool_layers)
        self.loss_fn = DistillLoss.from_config(lc, temperature=self.temperature, num_teachers=len(self.teachers))

        train_pos, eval_pos = sdata.split_positions(len(self.teachers[0]), eval_fraction=cfg.eval_fraction,
                                                    eval_sequences=cfg.eval_sequences, split_seed=cfg.split_seed,
                                                    cap=EVAL_SEQUENCES_CAP)
        ds_kw = dict(weighting=lc.teacher_weighting, settings=lc.weight_settings(), pooled_layers=self.pool_layers,
                     observed_correction=lc.observed_correction)
        self.observed_counts: torch.Tensor | None = None  # [K, 3] int64 over the training batches of this run
        self.train_set = sdata.DistillDataset(self.teachers, train_pos, **ds_kw)
        self.sampler = sdata.EpochBatchSampler(len(train_pos), cfg.batch_size, rank=self.rank,
                                               world_size=self.world, seed=cfg.seed)
        dropped = len(train_pos) - self.sampler.batches_per_epoch * cfg.batch_size * self.world
        if dropped and self.rank == 0:
            log.info("%d of %d training sequences do not fill a last global micro-batch; each epoch's shuffle "
                     "leaves a different %d out", dropped, len(train_pos), dropped)
        if len(eval_pos) % self.world and self.rank == 0:  # every rank must run the same number of batches
            log.info("held-out slice cut from %d to %d sequences (a multiple of %d ranks)", len(eval_pos),
                     len(eval_pos) // self.world * self.world, self.world)
        eval_pos = eval_pos[: len(eval_pos) // self.world * self.world][self.rank :: self.world]
        self.eval_set = sdata.DistillDataset(self.teachers, eval_pos, **ds_kw)
        self.train_loader = self._loader(self.train_set, self.sampler, persistent=True)
        eval_batches = [list(range(i, min(i + cfg.batch_size, len(eval_pos))))
                        for i in range(0, len(eval_pos), cfg.batch_size)]
        self.eval_loader = self._loader(self.eval_set, eval_batches, persistent=False)
        self.tokens_per_step = cfg.batch_size * m0.seq_len * cfg.grad_accum * self.world

        self.tokenizer = _final_tokenizer(cfg.tokenizer, m0)
        self.special_ids = ({} if self.tokenizer is None else
                            {"bos_token_id": self.tokenizer.bos_token_id, "eos_token_id": self.tokenizer.eos_token_id,
                             "pad_token_id": self.tokenizer.pad_token_id})
        student = smodel.build_student(cfg.student, vocab_size=m0.vocab_size, seq_len=m0.seq_len,
                                       seed=cfg.seed, special_ids=self.special_ids)
        if cfg.freeze_embeddings or cfg.freeze_lm_head:
            frozen = smodel.freeze(student, embeddings=cfg.freeze_embeddings, lm_head=cfg.freeze_lm_head)
            log.info("frozen: %s", ", ".join(frozen))
        proj_dims = [None if layer is None else t.manifest.pooled_dims[layer]
                     for t, layer in zip(self.teachers, self.pool_layers, strict=True)]
        blocks = smodel.num_layers(student)
        if self.use_feat and not -blocks <= lc.student_pool_layer < blocks:
            raise ConfigError(f"--student-pool-layer {lc.student_pool_layer} is outside the student's {blocks} "
                              f"blocks (use {-blocks}..{blocks - 1})")
        self.module = DistillModule(student, proj_dims, lc.student_pool_layer).to(self.device)
        if lc.chunk_size is not None:
            from student.loss.chunked import check_plain_head

            check_plain_head(student, m0.vocab_size)
        self.model = self._wrap(self.module)
        self.optimizer = _adamw(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg))
        self.checkpoints = CheckpointManager(cfg.output, rank=self.rank, world_size=self.world)
        self.metrics = MetricsWriter(cfg.output, rank=self.rank)
        self._maybe_resume()
        if self.rank == 0:
            path = os.path.join(cfg.output, CONFIG_FILE)
            with writing(path), open(path, "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        self.metrics.start(resumed_at=self.step if self.resumed else None)  # a fresh run starts a fresh log
        if not self.resumed:  # a resumed run restores every RNG from the checkpoint instead
            seed_everything(cfg.seed + self.rank)

    def _setup_distributed(self) -> None:
        cfg = self.cfg
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device} was requested but CUDA is not available")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = self.world > 1
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device.startswith("cuda:"):
            if self.world > 1:
                raise ConfigError(f"--device {cfg.device} under torchrun: each rank uses cuda:LOCAL_RANK; pass "
                                  "--device cuda (or auto)")
            local = int(cfg.device.split(":", 1)[1])
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        if cfg.fsdp and not self.distributed:
            log.warning("--fsdp without torchrun (WORLD_SIZE=1): training unsharded")
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext())

    def _loader(self, dataset: sdata.DistillDataset, batches, *, persistent: bool) -> DataLoader:
        cfg = self.cfg
        workers = cfg.num_workers
        return DataLoader(dataset, batch_sampler=batches, collate_fn=sdata.collate, num_workers=workers,
                          pin_memory=self.device.type == "cuda",
                          prefetch_factor=cfg.prefetch_factor if workers else None,
                          persistent_workers=persistent and workers > 0)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return module
        if self.cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in smodel.decoder_layers(module.student):
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

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
            projs = [p if has else None for p, has in zip(self.module.projections, self.module.has_proj, strict=True)]
            feat = self.loss_fn.feature(pooled, b.pooled, projs)
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
            sync = micro == cfg.grad_accum - 1
            ctx = self.model.no_sync() if (self.distributed and not cfg.fsdp and not sync) else nullcontext()
            with ctx:
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
        self._check_finite(sums["loss"], grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(terms=sums, grad_norm=grad_norm, lr=lr)

    def train(self) -> dict[str, float]:
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
            return self._last_logged()
        self._eval_mark = time.perf_counter()
        if self.step == 0 and cfg.eval_every and self.eval_set.positions.size:
            last = self._log_eval()
        t_log, steps_since_log = time.perf_counter(), 0
        while self.step < stop:
            result = self.train_step(stream)
            sums, grad_norm, lr = result.terms, result.grad_norm, result.lr
            steps_since_log += 1
            if self.step % cfg.log_every == 0 or self.step == stop:
                tps = self.tokens_per_step * steps_since_log / max(time.perf_counter() - t_log, 1e-9)
                vals = self._all_mean(torch.stack([sums[k].float() for k in ("loss", "kd", "ce", "feat")]))
                alpha = self._all_mean(sums["alpha"].float())
                last = {"step": self.step, "split": "train", "epoch": self.epoch, "lr": lr,
                        **dict(zip(("loss", "kd", "ce", "feat"), vals.tolist(), strict=True)),
                        "grad_norm": float(grad_norm),
                        "alpha": dict(zip(self.names, alpha.tolist(), strict=True)), "tokens_per_s": tps}
                self._write_metrics(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", kd=f"{last['kd']:.3f}", ce=f"{last['ce']:.3f}",
                                tok_s=f"{tps:.0f}")
                t_log, steps_since_log = time.perf_counter(), 0
            bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                last = self._log_eval()
                t_log = time.perf_counter()  # evaluation time is not training throughput
            if self.step < stop and cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
                t_log = time.perf_counter()
        bar.close()
        self._log_observed_sources()
        if self.step >= cfg.max_steps:
            if self.eval_set.positions.size:
                last = self._log_eval()
            self.save_checkpoint()
            self._save_final()
        else:
            self.save_checkpoint()  # stopped early (--stop-after): resume later
        return last

    def _log_observed_sources(self) -> None:
        """Log, per teacher, how many training positions' log p(o) was exact, listed or bounded (student/targets.py;
        the observed-token weightings only), summed over ranks."""
        counts = self.observed_counts
        if counts is None:
            return
        counts = counts.clone()
        if self.distributed:
            counts = counts.to(self.device)
            dist.all_reduce(counts)
        if self.rank != 0:
            return
        for name, row in zip(self.names, counts.cpu().tolist(), strict=True):
            total = max(sum(row), 1)
            log.info("teacher %r: log p(o) for --teacher-weighting %s at %d training positions: %s",
                     name, self.cfg.loss.teacher_weighting, sum(row),
                     ", ".join(f"{n} {c} ({100.0 * c / total:.1f}%)" for n, c in zip(OBSERVED_SOURCES, row,
                                                                                      strict=True)))

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out perplexity (CE on positions 0..L-2) and KL to the fused target (all L positions)."""
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # kl sum, kl positions, nll sum, nll positions
        for batch in self.eval_loader:
            terms = self.compute_loss(batch, train=False)
            b, seq_len = batch.shape
            if batch.loss_mask is not None:  # conversations: means over the masked positions, weighted by them
                kl_n = float(batch.fused.has_target.sum())
                ce_n = float(batch.loss_mask[:, :-1].sum())
                sums += torch.tensor([float(terms.kd) * kl_n, kl_n, float(terms.ce) * ce_n, ce_n], dtype=torch.float64)
                continue
            sums += torch.tensor([float(terms.kd) * b * seq_len, b * seq_len,
                                  float(terms.ce) * b * (seq_len - 1), b * (seq_len - 1)], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(sums)
        # the KD term carries tau^2; report the plain KL
        kl = float(sums[0] / sums[1].clamp_min(1)) / self.temperature**2
        ce = float(sums[2] / sums[3].clamp_min(1))
        return {"eval_kl": kl, "eval_ce": ce, "eval_ppl": math.exp(min(ce, 50.0))}

    def _log_eval(self) -> dict[str, float]:
        """Evaluate, and record its time against the time spent since the previous evaluation (training,
        logging, checkpoints): `eval_seconds` and `eval_share` in metrics.jsonl and the log."""
        t0 = time.perf_counter()
        since = t0 - self._eval_mark
        res = {"step": self.step, "split": "eval", **self.evaluate()}
        seconds = time.perf_counter() - t0
        self._eval_mark = time.perf_counter()
        res.update(eval_seconds=round(seconds, 3),
                   eval_share=round(seconds / (seconds + since), 4) if self.step > 0 else None)
        self._write_metrics(res)
        if self.rank == 0:
            share = "" if res["eval_share"] is None else f", {100 * res['eval_share']:.1f}% of the time since the last one"
            log.info("step %d: held-out evaluation of %d sequences took %.2f s%s", self.step,
                     self.eval_set.positions.size * self.world, seconds, share)
        return res

    # ---- checkpoints ---------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict, dict]:
        if self.cfg.fsdp and self.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.module.state_dict(), self.optimizer.state_dict()

    def save_checkpoint(self) -> str:
        """Checkpoint this step (every rank calls it; rank 0 writes; student/checkpoint.py): refused with
        DivergedError when a weight is not finite."""
        model_sd, optim_sd = self._state_dicts()
        self._check_weights_finite(model_sd)
        return self.checkpoints.save(self.step, {
            "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch, "config": dataclasses.asdict(self.cfg)})

    def _claim_output(self) -> None:
        """Rank 0 checks, creates and locks the run directory (student/rundir.py) before any cache is opened or
        model built; a refusal stops every rank with the same one line instead of leaving the others waiting."""
        self.run_lock = None
        problem: UserError | None = None
        if self.rank == 0:
            try:
                self.run_lock = claim_output(self.cfg)
            except UserError as e:
                problem = e
        if self.distributed:
            box = [None if problem is None else str(problem)]
            dist.broadcast_object_list(box, src=0)
            if problem is None and box[0] is not None:
                raise ConfigError(box[0])
        if problem is not None:
            raise problem

    def _maybe_resume(self) -> None:
        found = self.checkpoints.resume(dataclasses.asdict(self.cfg), requested=self.cfg.resume,
                                        output=self.cfg.output)
        self.resumed = found is not None
        if found is None:
            return
        state = found.state
        if self.cfg.fsdp and self.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        set_rng_state(state["rng"][self.rank])
        log.info("resumed from %s (step %d, epoch %d, micro-batch %d)", found.path, self.step, self.epoch,
                 self.micro_in_epoch)

    def _save_final(self) -> None:
        if self.cfg.fsdp and self.distributed:
            model_sd, _ = self._state_dicts()
        self._check_weights_finite(model_sd if self.cfg.fsdp and self.distributed else self.module.state_dict())
        if self.rank == 0:
            student = self.module.student
            if self.cfg.fsdp and self.distributed:  # rebuild an unsharded copy from the full state dict
                student = smodel.build_student(self.cfg.student, vocab_size=self.teachers[0].manifest.vocab_size,
                                               seq_len=self.teachers[0].manifest.seq_len, seed=self.cfg.seed,
                                               special_ids=self.special_ids)
                student.load_state_dict({k[len("student."):]: v for k, v in model_sd.items()
                                         if k.startswith("student.")})
            with writing(os.path.join(self.cfg.output, FINAL_DIR)):
                smodel.save_student(student, os.path.join(self.cfg.output, FINAL_DIR), self.tokenizer)
        self._barrier()

    # ---- helpers -------------------------------------------------------------------------------
    def _all_mean(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(self.device)
        if self.distributed:
            dist.all_reduce(x)
            x = x / self.world
        return x.cpu()

    def _verify_caches(self) -> None:
        """Rank 0 checks the shards (`cfg.verify`; sizes always) and tells the other ranks the outcome, so a
        damaged cache stops every rank with the same one-line error instead of leaving them waiting."""
        mode = self.cfg.verify
        if self.cfg.resume and mode == "full":
            mode = "stamp"  # the first run hashed every shard and stamped it
        problem: str | None = None
        error: StorageError | None = None
        if self.rank == 0:
            try:
                for t, report in zip(self.teachers, sdata.verify_teachers(self.teachers, mode), strict=True):
                    log.info("%s: %s", t.path, report.line(mode))
            except StorageError as e:  # a damaged shard, or a manifest its shards' stored headers contradict
                error, problem = e, str(e)
        if self.distributed:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if error is not None:
            raise error
        if problem is not None:
            raise ShardCorruptError(problem)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _write_metrics(self, rec: dict) -> None:
        bad = non_finite([v for k, v in rec.items() if k != "tokens_per_s"])
        if bad is not None:  # e.g. a held-out loss of weights that went to inf in the last optimizer step
            raise DivergedError(f"step {self.step}: {rec.get('split')} metrics are not finite ({bad}); nothing "
                                "was saved from this step; lower --lr or the loss weights")
        rec.update(self.positions_note)  # conversations: the line (and the summary printed) names its positions
        self.metrics.write(rec)

    def _last_logged(self) -> dict:
        """The last metrics.jsonl record (the final evaluation of a finished run); {} on ranks other than 0."""
        return self.metrics.last()

    def _any_rank(self, bad: bool) -> bool:
        """True on every rank when `bad` is True on any rank."""
        flag = torch.tensor([1.0 if bad else 0.0])
        return bool(self._all_mean(flag)[0] > 0) if self.distributed else bad

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """DivergedError, before the optimizer step, when the step's loss or gradient norm is NaN or inf."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the global norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        if self._any_rank(not bool(torch.isfinite(values).all())):
            saved = self.checkpoints.names() if self.rank == 0 else []
            raise DivergedError(
                f"training diverged at step {self.step + 1}: loss {float(values[0]):.4g}, gradient norm "
                f"{float(values[1]):.4g} (not finite); nothing was saved from this step"
                + (f" (last checkpoint: {saved[-1]})" if saved else "")
                + "; lower --lr or the loss weights")

    def _check_weights_finite(self, state_dict: dict) -> None:
        """DivergedError instead of saving a model or checkpoint with a NaN or inf weight."""
        bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
        if self._any_rank(bool(bad)):
            raise DivergedError(f"step {self.step}: the model holds non-finite weights"
                                + (f" ({bad[0]}{' and others' if len(bad) > 1 else ''})" if bad else "")
                                + "; nothing was saved; lower --lr or --weight-decay")

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:  # ends the bar's line before an error message
            self.bar.close()
        for t in getattr(self, "teachers", []):
            t.close()
        if getattr(self, "run_lock", None) is not None:  # after the last write of this run
            self.run_lock.release()
        if getattr(self, "distributed", False) and dist.is_initialized():
            dist.destroy_process_group()


def _unique_names(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _final_tokenizer(tokenizer: str | None, m: Manifest) -> Any | None:
    """The tokenizer saved beside the final student (its EOS/BOS/PAD ids go into the student's config):
    --tokenizer, after checking it is the one the caches were made with; else the caches' own tokenizer
    (the path precompute recorded, with the teacher's GGUF file when it came from there). When that one
    cannot be loaded here, or is not the caches' tokenizer, the student is saved without one, with a warning."""
    from transformers import AutoTokenizer

    from common.tokenizer import tokenizer_fingerprint

    explicit = tokenizer is not None
    gguf = None
    if not explicit:
        tokenizer = m.notes.get("tokenizer")
        if not tokenizer:
            log.warning("the caches do not record their tokenizer; the final student is saved without one "
                        "(pass --tokenizer)")
            return None
        gguf = m.teacher.gguf_file if tokenizer == m.teacher.path else None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        if explicit:
            raise ConfigError(f"--tokenizer {tokenizer}: cannot load ({str(e).strip().splitlines()[0]})") from None
        log.warning("the caches' tokenizer %s cannot be loaded here (%s); the final student is saved without "
                    "one (pass --tokenizer)", tokenizer, str(e).strip().splitlines()[0])
        return None
    got = tokenizer_fingerprint(tok)
    if got != m.tokenizer_fingerprint:
        if explicit:
            raise MismatchError(f"--tokenizer {tokenizer} and the teachers differ in 'tokenizer_fingerprint': "
                                f"{got[:12]}... vs {m.tokenizer_fingerprint[:12]}...", "tokenizer_fingerprint",
                                (got, m.tokenizer_fingerprint))
        log.warning("the tokenizer at %s is no longer the one the caches were made with; the final student is "
                    "saved without one (pass --tokenizer)", tokenizer)
        return None
    if not explicit:
        log.info("final student's tokenizer: the caches' own, %s", tokenizer)
    template = m.notes.get("chat_template") if m.loss_mask is not None else None
    if isinstance(template, str) and getattr(tok, "chat_template", None) != template:
        # conversations: the student answers in the template it was trained on (--chat-template, if given)
        log.info("final student's tokenizer: the chat template the caches' conversations were rendered with")
        tok.chat_template = template
    return tok


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    oc = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=oc.lr, betas=oc.betas)


def _schedule(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
