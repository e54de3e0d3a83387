"""Held-out evaluation during training: perplexity (CE on positions 0..L-2) and KL to the fused target (all L
positions), summed over this rank's share of the held-out sequences and over ranks.

`Validator.run(compute_loss)` gives the figures; `Validator.timed(evaluate, step)` also records how long an
evaluation took against the time since the previous one (`eval_seconds`, `eval_share`), so the cost of
`--eval-every` is visible in metrics.jsonl and the log.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from student.loss.objective import LossTerms
from student.parallel import Parallelism

log = logging.getLogger("student")


class Validator:
    """Evaluates the held-out batches of `loader` with the trainer's `compute_loss`."""

    def __init__(self, loader: Iterable[Any], *, sequences: int, temperature: float, parallel: Parallelism) -> None:
        self.loader, self.sequences, self.temperature, self.parallel = loader, sequences, temperature, parallel
        self.mark = time.perf_counter()
        """When the time counted against the next evaluation began."""

    @torch.no_grad()
    def run(self, compute_loss: Callable[..., LossTerms]) -> dict[str, float]:
        """eval_kl (the plain KL: KD without its tau^2), eval_ce and eval_ppl over every rank's share."""
        sums = torch.zeros(4, dtype=torch.float64)  # kl sum, kl positions, nll sum, nll positions
        for batch in self.loader:
            terms = compute_loss(batch, train=False)
            b, seq_len = batch.shape
            if batch.loss_mask is not None:  # conversations: means over the masked positions, weighted by them
                kl_n = float(batch.fused.has_target.sum())
                ce_n = float(batch.loss_mask[:, :-1].sum())
                sums += torch.tensor([float(terms.kd) * kl_n, kl_n, float(terms.ce) * ce_n, ce_n], dtype=torch.float64)
                continue
            sums += torch.tensor([float(terms.kd) * b * seq_len, b * seq_len,
                                  float(terms.ce) * b * (seq_len - 1), b * (seq_len - 1)], dtype=torch.float64)
        self.parallel.all_reduce(sums)
        kl = float(sums[0] / sums[1].clamp_min(1)) / self.temperature**2
        ce = float(sums[2] / sums[3].clamp_min(1))
        return {"eval_kl": kl, "eval_ce": ce, "eval_ppl": math.exp(min(ce, 50.0))}

    def timed(self, evaluate: Callable[[], dict[str, float]], step: int) -> dict[str, Any]:
        """The record of one evaluation at `step` (`evaluate()` gives its figures), with `eval_seconds` and
        `eval_share` (of the time since the previous evaluation; None at step 0); logged on rank 0."""
        t0 = time.perf_counter()
        since = t0 - self.mark
        res: dict[str, Any] = {"step": step, "split": "eval", **evaluate()}
        seconds = time.perf_counter() - t0
        self.mark = time.perf_counter()
        res.update(eval_seconds=round(seconds, 3), eval_share=round(seconds / (seconds + since), 4) if step > 0 else None)
        if self.parallel.rank == 0:
            share = "" if res["eval_share"] is None else f", {100 * res['eval_share']:.1f}% of the time since the last one"
            log.info("step %d: held-out evaluation of %d sequences took %.2f s%s", step,
                     self.sequences * self.parallel.world, seconds, share)
        return res
