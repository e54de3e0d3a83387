"""Sampled caches in stage two: the KD gradient from count / N is unbiased (float64 reference, CLT bound over many
seeds, temperature 1 and 2); training reads sampled and mixed caches; DKD refuses sampled caches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from student.fusion import fuse_topk
from student.loss.terms import sparse_kl
from student.targets import sparse_target
from teachers.head import dense_reference
from teachers.sampling import draw_uniforms, sample_key, sampled_head


def _sampled_view(hidden, weight, n, temperature, seed):
    """(ids, log-probs) of a sampled target as stage two reads it from a cache written with `seed`."""
    positions = hidden.shape[0]
    u = torch.from_numpy(draw_uniforms(sample_key(f"corpus-{seed}", "t", "p"), np.arange(positions), 1, n))
    ids, counts, _ = sampled_head(hidden, weight, uniforms=u, temperature=temperature, chunk_size=8)
    cols = {"sample_ids": ids.numpy().reshape(1, positions, n),
            "sample_counts": counts.numpy().astype(np.uint16).reshape(1, positions, n)}
    return sparse_target(cols, SimpleNamespace(target_kind="sampled", samples=n), positions)


@pytest.mark.parametrize("mixed", [False, True], ids=["sampled", "topk+sampled"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_kd_gradient_matches_the_dense_kd_gradient(temperature: float, mixed: bool) -> None:
    """d/dz of the KD loss with a sampled teacher, averaged over R seeds, against float64 references: the dense
    gradient tau (softmax(z / tau) - p) / P of the full KL for the sampled teacher, plus (mixed) alpha_1 times
    the float64 gradient of a top-k teacher's own coarse KL. Every element within 5 standard errors of the
    sampled part (+ float32 rounding), and the errors are of the binomial size."""
    g = torch.Generator().manual_seed(2)
    positions, hidden_size, vocab, n, seeds = 6, 16, 40, 12, 300
    hidden = torch.randn(positions, hidden_size, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.6
    p = dense_reference(hidden, weight, k=1, temperature=temperature)[3].exp()  # [P, V] float64 teacher
    z = torch.randn(positions, vocab, generator=g, dtype=torch.float64) * 2  # student logits
    alpha = torch.tensor([[0.3, 0.7]], dtype=torch.float64).expand(positions, 2) if mixed else \
        torch.ones(positions, 1, dtype=torch.float64)
    a_s = alpha[:, -1:]  # the sampled teacher's weight
    q = torch.softmax(z / temperature, dim=-1)
    dense = a_s * temperature * (q - p) / positions  # gradient of the mean over positions
    z64 = z.clone().requires_grad_(True)
    ref_loss = temperature**2 * (a_s[:, 0] * (torch.xlogy(p, p) - p * torch.log_softmax(z64 / temperature, -1))
                                 .sum(-1)).mean()
    ref_loss.backward()
    torch.testing.assert_close(z64.grad, dense)  # the closed form is the autograd gradient
    views, tailless = [], [True]
    if mixed:  # a deterministic top-5 teacher with its own tail, weight 0.3
        logp1 = torch.log_softmax(torch.randn(positions, vocab, generator=g, dtype=torch.float64), -1)
        top = logp1.topk(5, dim=-1)
        z64 = z.clone().requires_grad_(True)
        coarse = fuse_topk([top.indices], [top.values], alpha[:, :1])  # float64 probs
        (alpha[0, 0] * sparse_kl(z64, coarse, temperature=temperature)).backward()
        dense = dense + z64.grad
        views, tailless = [(top.indices.int(), top.values.float())], [False, True]
    total = torch.zeros_like(dense)
    for seed in range(seeds):
        ids, lp = _sampled_view(hidden, weight, n, temperature, seed)
        fused = fuse_topk([*(v[0] for v in views), ids], [*(v[1] for v in views), lp], alpha.float(),
                          tailless=tailless)
        assert (fused.tail[:, -1] == 0).all()  # a sampled target has no tail
        zs = z.float().requires_grad_(True)
        sparse_kl(zs, fused, temperature=temperature).backward()
        total += zs.grad.double()
    mean = total / seeds
    se = a_s * temperature / positions * (p * (1 - p) / (n * seeds)).sqrt()
    err = (mean - dense).abs()
    assert (err <= 5 * se + 2e-6).all(), float((err / (se + 1e-12)).max())
    assert 0.6 < float((err**2).sum() / (se**2).sum()) < 1.4  # errors of the binomial size, not smaller


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_training_reads_a_mixed_top_k_and_sampled_pair(stage_one, sampled_cache, tmp_path, chunk_size) -> None:
    import json

    from student.config import LossConfig, OptimConfig, TrainConfig
    from student.data import DistillDataset, join_teachers
    from student.trainer import run_train

    teachers = join_teachers([stage_one["caches"][0], sampled_cache])
    batch = DistillDataset(teachers, np.arange(4), weighting="entropy")[[0, 1, 2, 3]]
    assert torch.isfinite(batch.fused.probs).all() and (batch.fused.probs >= 0).all()
    cfg = TrainConfig(teacher_data=[stage_one["caches"][0], sampled_cache], output=str(tmp_path / "run"),
                      student="tiny", tokenizer=stage_one["tokenizer"], batch_size=4, max_steps=3, eval_sequences=8,
                      eval_every=3, log_every=1, num_workers=0, optim=OptimConfig(lr=3e-3, warmup_steps=1),
                      loss=LossConfig(chunk_size=chunk_size))
    result = run_train(cfg)
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["split"] == "train"]
    assert len(train) == 3 and all(np.isfinite(m["kd"]) and m["kd"] > 0 for m in train)
    assert np.isfinite(result["eval_kl"])


def test_dkd_refuses_a_sampled_cache_in_one_line(stage_one, sampled_cache, tmp_path) -> None:
    from click.testing import CliRunner

    from cli import main

    r = CliRunner().invoke(main, ["train-student", "--teacher-data", stage_one["caches"][0], "--teacher-data",
                                  sampled_cache, "--output", str(tmp_path / "o"), "--student", "tiny",
                                  "--tokenizer", stage_one["tokenizer"], "--loss", "dkd", "--max-steps", "1"])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output
    assert "--loss dkd cannot use the sampled cache of teacher 't0-sampled'" in lines[0]
