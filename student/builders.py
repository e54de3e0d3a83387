"""The parts of a training run, each built from the config by one function (the trainer calls them in order):

    teachers = open_caches(cfg, parallel)                        joined, verified caches
    loss, pool_layers = build_loss(cfg, teachers)                DistillLoss; which teacher layers feed the feature term
    data = build_data(cfg, teachers, pool_layers, parallel)      TrainData: datasets, sampler, loaders
    tokenizer = final_tokenizer(cfg.tokenizer, manifest)         saved beside the final student
    module = build_model(cfg, teachers, pool_layers, ids, dev)   DistillModule: the student plus projections W_k
    optimizer, scheduler = build_optimizer(model, cfg)           AdamW (no decay on vectors), warmup + cosine

The order is part of a run's reproducibility: the student and the projections draw their initial weights
from the global RNG in this order, so a replayed config builds the same weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.errors import ConfigError
from storage.errors import MismatchError, ShardCorruptError, StorageError
from storage.manifest import Manifest
from storage.reader import TeacherDataset
from student import data as sdata
from student import model as smodel
from student.config import EVAL_SEQUENCES_CAP, TrainConfig
from student.fusion import FusedTargets
from student.loss.objective import DistillLoss
from student.parallel import Parallelism

log = logging.getLogger("student")


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

    def projection_list(self) -> list[torch.nn.Module | None]:
        """W_k per teacher, None for a teacher without features."""
        return [p if has else None for p, has in zip(self.projections, self.has_proj, strict=True)]


@dataclass(kw_only=True)
class TrainData:
    """The held-out split, the datasets and their loaders (this rank's share)."""

    train_set: sdata.DistillDataset
    sampler: sdata.EpochBatchSampler
    """Seeded per-epoch shuffle of the training sequences, split between ranks."""
    train_loader: DataLoader
    eval_set: sdata.DistillDataset
    """This rank's share of the held-out sequences (every rank gets as many)."""
    eval_loader: DataLoader
    tokens_per_step: int
    """Tokens of one optimizer step over all ranks."""


def open_caches(cfg: TrainConfig, parallel: Parallelism) -> list[TeacherDataset]:
    """The teacher caches, joined (`join_teachers`) and checked: rank 0 verifies the shards (`cfg.verify`, sizes
    always) and tells the other ranks the outcome, so a damaged cache stops every rank with the same one-line
    error instead of leaving them waiting."""
    teachers = sdata.join_teachers(cfg.teacher_data, spot_check=cfg.spot_check, seed=cfg.seed, verify=False)
    mode = cfg.verify
    if cfg.resume and mode == "full":
        mode = "stamp"  # the first run hashed every shard and stamped it

    def verify() -> None:
        for t, report in zip(teachers, sdata.verify_teachers(teachers, mode), strict=True):
            log.info("%s: %s", t.path, report.line(mode))

    try:  # a damaged shard, or a manifest its shards' stored headers contradict
        parallel.on_rank0(verify, catch=StorageError, elsewhere=ShardCorruptError)
    except BaseException:
        for t in teachers:
            t.close()
        raise
    return teachers


def build_loss(cfg: TrainConfig, teachers: Sequence[TeacherDataset]) -> tuple[DistillLoss, list[int | None]]:
    """The objective at the caches' temperature, after checking the loss settings against the caches, and the
    pooled layer each teacher's feature term reads (None: no feature term for it)."""
    lc, m0 = cfg.loss, teachers[0].manifest
    if lc.temperature is not None and not math.isclose(lc.temperature, m0.temperature):
        raise ConfigError(f"--temperature {lc.temperature} differs from the caches' precompute temperature "
                          f"{m0.temperature}; top-k log-probs cannot be re-tempered exactly")
    sdata.check_weighting(teachers, lc.teacher_weighting, lc.weight_settings())
    sdata.check_loss(teachers, lc.loss)
    pool_layers = sdata.feature_layers(teachers, lc.teacher_pool_layer, lc.gamma_feat > 0)
    return DistillLoss.from_config(lc, temperature=m0.temperature, num_teachers=len(teachers)), pool_layers


def build_data(cfg: TrainConfig, teachers: Sequence[TeacherDataset], pool_layers: list[int | None],
               parallel: Parallelism) -> TrainData:
    """Split the sequences (seeded held-out slice), and build this rank's datasets and loaders."""
    rank, world = parallel.rank, parallel.world
    train_pos, eval_pos = sdata.split_positions(len(teachers[0]), eval_fraction=cfg.eval_fraction,
                                                eval_sequences=cfg.eval_sequences, split_seed=cfg.split_seed,
                                                cap=EVAL_SEQUENCES_CAP)
    lc = cfg.loss
    ds_kw = dict(weighting=lc.teacher_weighting, settings=lc.weight_settings(), pooled_layers=pool_layers,
                 observed_correction=lc.observed_correction)
    train_set = sdata.DistillDataset(teachers, train_pos, **ds_kw)
    sampler = sdata.EpochBatchSampler(len(train_pos), cfg.batch_size, rank=rank, world_size=world, seed=cfg.seed)
    dropped = len(train_pos) - sampler.batches_per_epoch * cfg.batch_size * world
    if dropped and rank == 0:
        log.info("%d of %d training sequences do not fill a last global micro-batch; each epoch's shuffle "
                 "leaves a different %d out", dropped, len(train_pos), dropped)
    if len(eval_pos) % world and rank == 0:  # every rank must run the same number of batches
        log.info("held-out slice cut from %d to %d sequences (a multiple of %d ranks)", len(eval_pos),
                 len(eval_pos) // world * world, world)
    eval_pos = eval_pos[: len(eval_pos) // world * world][rank::world]
    eval_set = sdata.DistillDataset(teachers, eval_pos, **ds_kw)
    eval_batches = [list(range(i, min(i + cfg.batch_size, len(eval_pos))))
                    for i in range(0, len(eval_pos), cfg.batch_size)]
    return TrainData(train_set=train_set, sampler=sampler,
                     train_loader=_loader(cfg, train_set, sampler, parallel.device, persistent=True),
                     eval_set=eval_set, eval_loader=_loader(cfg, eval_set, eval_batches, parallel.device, persistent=False),
                     tokens_per_step=cfg.batch_size * teachers[0].manifest.seq_len * cfg.grad_accum * world)


def _loader(cfg: TrainConfig, dataset: sdata.DistillDataset, batches: Any, device: torch.device, *,
            persistent: bool) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(dataset, batch_sampler=batches, collate_fn=sdata.collate, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch_factor if workers else None,
                      persistent_workers=persistent and workers > 0)


def build_model(cfg: TrainConfig, teachers: Sequence[TeacherDataset], pool_layers: list[int | None],
                special_ids: dict[str, int | None], device: torch.device) -> DistillModule:
    """The student (`cfg.student`, seeded; frozen parts per the config) and one projection per teacher with
    features, on `device`. With `--loss-chunk-size`, the student's head is checked to be a plain linear one."""
    m0, lc = teachers[0].manifest, cfg.loss
    student = smodel.build_student(cfg.student, vocab_size=m0.vocab_size, seq_len=m0.seq_len, seed=cfg.seed,
                                   special_ids=special_ids)
    if cfg.freeze_embeddings or cfg.freeze_lm_head:
        frozen = smodel.freeze(student, embeddings=cfg.freeze_embeddings, lm_head=cfg.freeze_lm_head)
        log.info("frozen: %s", ", ".join(frozen))
    proj_dims = [None if layer is None else t.manifest.pooled_dims[layer]
                 for t, layer in zip(teachers, pool_layers, strict=True)]
    blocks = smodel.num_layers(student)
    use_feat = any(x is not None for x in pool_layers)
    if use_feat and not -blocks <= lc.student_pool_layer < blocks:
        raise ConfigError(f"--student-pool-layer {lc.student_pool_layer} is outside the student's {blocks} "
                          f"blocks (use {-blocks}..{blocks - 1})")
    module = DistillModule(student, proj_dims, lc.student_pool_layer).to(device)
    if lc.chunk_size is not None:
        from student.loss.chunked import check_plain_head

        check_plain_head(student, m0.vocab_size)
    return module


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer,
                                                                       torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) and its schedule: linear warmup, then cosine to `min_lr_ratio`."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    oc = cfg.optim
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=oc.lr, betas=oc.betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warmup over `warmup_steps`, then a cosine down to
    `min_lr_ratio` at `max_steps`."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def special_ids(tokenizer: Any | None) -> dict[str, int | None]:
    """The BOS/EOS/PAD ids written into the student's config ({} without a tokenizer)."""
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def final_tokenizer(tokenizer: str | None, m: Manifest) -> Any | None:
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
