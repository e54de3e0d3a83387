"""The trainer's parts alone: builders from a config, the parallelism of one process, checkpoint parts."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import ConfigError
from storage.errors import ShardCorruptError
from student import builders
from student.checkpoint import CheckpointManager
from student.config import LossConfig, OptimConfig, TrainConfig
from student.divergence import DivergedError, check_metrics, check_step, check_weights
from student.parallel import Parallelism
from student.validation import Validator
from tests.student.synthetic import make_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("builders")
    return [str(make_cache(root / "a", name="a", seed=1, k=8, n=24, pooled={1: 12})),
            str(make_cache(root / "b", name="b", seed=2, k=4, n=24, pooled={1: 10}))]


def _cfg(caches, tmp_path, **kw) -> TrainConfig:
    base = dict(teacher_data=caches, output=str(tmp_path / "run"), student="tiny", batch_size=4, max_steps=10,
                eval_sequences=6, num_workers=0, device="cpu", loss=LossConfig(gamma_feat=0.1),
                optim=OptimConfig(lr=1e-3, warmup_steps=2, min_lr_ratio=0.1))
    base.update(kw)
    return TrainConfig(**base)


def test_builders_make_every_part_from_the_config(caches, tmp_path):
    cfg = _cfg(caches, tmp_path)
    parallel = Parallelism()
    teachers = builders.open_caches(cfg, parallel)
    try:
        loss, pool_layers = builders.build_loss(cfg, teachers)
        assert pool_layers == [1, 1] and loss.gamma_feat == 0.1 and loss.temperature == 1.0
        data = builders.build_data(cfg, teachers, pool_layers, parallel)
        assert data.eval_set.positions.size == 6 and data.sampler.batches_per_epoch == 18 // 4
        assert data.tokens_per_step == 4 * teachers[0].manifest.seq_len
        batch = next(iter(data.train_loader))
        assert batch.shape == (4, teachers[0].manifest.seq_len)
        module = builders.build_model(cfg, teachers, pool_layers, {}, parallel.device)
        again = builders.build_model(cfg, teachers, pool_layers, {}, parallel.device)
        # seeded: the same config builds the same student and projections
        for (name, a), (_, b) in zip(module.state_dict().items(), again.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        assert [p is not None for p in module.projection_list()] == [True, True]
        optimizer, scheduler = builders.build_optimizer(module, cfg)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.optim.weight_decay, 0.0]
        assert all(p.ndim >= 2 for p in optimizer.param_groups[0]["params"])
        with pytest.raises(ConfigError, match="--temperature 2.0 differs"):
            builders.build_loss(_cfg(caches, tmp_path, loss=LossConfig(temperature=2.0)), teachers)
        with pytest.raises(ConfigError, match="--student-pool-layer 9"):
            builders.build_model(_cfg(caches, tmp_path, loss=LossConfig(gamma_feat=0.1, student_pool_layer=9)),
                                 teachers, pool_layers, {}, parallel.device)
    finally:
        for t in teachers:
            t.close()


def test_lr_schedule_warms_up_then_decays_to_the_floor(caches, tmp_path):
    factor = builders.lr_schedule(_cfg(caches, tmp_path))
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0) and factor(10) == pytest.approx(0.1) and factor(50) == pytest.approx(0.1)
    assert factor(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_one_process_parallelism_is_the_plain_module(caches, tmp_path):
    p = Parallelism.from_config(_cfg(caches, tmp_path, fsdp=True))  # warns: no torchrun
    assert (p.rank, p.world, p.distributed, p.sharded, p.device.type) == (0, 1, False, False, "cpu")
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    assert p.wrap(module) is module
    assert p.state_parts(module, module, optimizer) == {"model": module, "optimizer": optimizer}
    with p.no_sync(module, sync=False):
        pass
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(p.all_mean(x), x) and p.any_rank(True) and not p.any_rank(False)
    assert p.on_rank0(lambda: 7, catch=ShardCorruptError, elsewhere=ShardCorruptError) == 7

    def damaged():
        raise ShardCorruptError("shard-000001.parquet: sha256 differs")

    with pytest.raises(ShardCorruptError, match="sha256 differs"):
        p.on_rank0(damaged, catch=ShardCorruptError, elsewhere=ConfigError)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda was requested but CUDA is not available"):
            Parallelism.from_config(_cfg(caches, tmp_path, device="cuda"))


def test_checkpoint_parts_round_trip_bitwise(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        module(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    parts = {"model": module, "optimizer": optimizer, "scheduler": scheduler}
    manager = CheckpointManager(str(tmp_path), parts=parts)
    state = manager.gather()
    manager.save(3, {**state, "epoch": 1, "micro_in_epoch": 2, "config": {"seed": 1}})

    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (s + 1))
    again = CheckpointManager(str(tmp_path), parts={"model": fresh, "optimizer": fresh_opt, "scheduler": fresh_sched})
    found = again.resume({"seed": 1}, requested=True, output=str(tmp_path))
    again.restore(found)
    assert found.state["epoch"] == 1 and found.state["micro_in_epoch"] == 2 and found.state["step"] == 3
    for (name, a), (_, b) in zip(module.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert fresh_sched.state_dict() == scheduler.state_dict()
    x = torch.randn(5, 4)
    for m, o in ((module, optimizer), (fresh, fresh_opt)):  # one more step each: the same update
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(module.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_divergence_checks_name_the_step():
    p = Parallelism()
    check_step(torch.tensor(1.0), torch.tensor(2.0), parallel=p, step=3, last_checkpoint=lambda: None)
    with pytest.raises(DivergedError, match=r"diverged at step 3: .*\(last checkpoint: step-0000002\)"):
        check_step(torch.tensor(float("nan")), torch.tensor(2.0), parallel=p, step=3,
                   last_checkpoint=lambda: "step-0000002")
    with pytest.raises(DivergedError, match=r"step 4: the model holds non-finite weights \(w\)"):
        check_weights({"w": torch.tensor([1.0, float("inf")]), "n": 3}, parallel=p, step=4)
    check_metrics({"split": "train", "loss": 1.0, "tokens_per_s": float("inf")}, step=1)
    with pytest.raises(DivergedError, match="eval metrics are not finite"):
        check_metrics({"split": "eval", "eval_kl": float("nan")}, step=1)


def test_validator_weights_batches_by_their_positions():
    from types import SimpleNamespace

    from student.loss.objective import LossTerms

    def batch(b, kd, ce):
        return SimpleNamespace(shape=(b, 5), loss_mask=None, kd=kd, ce=ce)

    def compute_loss(x, *, train):
        zero = torch.zeros(())
        return LossTerms(loss=zero, kd=torch.tensor(x.kd), ce=torch.tensor(x.ce), feat=zero, alpha=zero)

    v = Validator([batch(1, 4.0, 1.0), batch(3, 8.0, 3.0)], sequences=4, temperature=2.0, parallel=Parallelism())
    res = v.run(compute_loss)
    assert res["eval_kl"] == pytest.approx((4.0 * 5 + 8.0 * 15) / 20 / 4)
    assert res["eval_ce"] == pytest.approx((1.0 * 4 + 3.0 * 12) / 16)
    assert res["eval_ppl"] == pytest.approx(math.exp(res["eval_ce"]))
    rec = v.timed(lambda: {"eval_kl": 0.5}, step=0)
    assert rec["split"] == "eval" and rec["eval_share"] is None and rec["eval_seconds"] >= 0
    assert v.timed(lambda: {"eval_kl": 0.5}, step=3)["eval_share"] is not None
