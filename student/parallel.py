"""How `train-student` runs across processes, decided once at setup: `Parallelism.from_config(cfg)`.

One process per device. Under torchrun (WORLD_SIZE > 1) the process group is initialised (gloo on CPU,
nccl on GPU) and the student is wrapped in DDP, or with `--fsdp` sharded with FSDP2 `fully_shard`; alone,
it is trained as it is (`--fsdp` then warns). Everything that differs between these three modes is here:
`wrap`, `no_sync`, `state_parts` (the model's and optimizer's checkpoint state, student/stateful.py) and
the collectives, which are no-ops in one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from common.errors import ConfigError
from student import model as smodel
from student.stateful import FullModelState, FullOptimizerState, Stateful

log = logging.getLogger("student")
T = TypeVar("T")


@dataclass(kw_only=True)
class Parallelism:
    """This process's place in the run and the one decision of how the student is wrapped."""

    rank: int = 0
    """This process's rank (RANK)."""
    world: int = 1
    """Number of processes (WORLD_SIZE)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The device this rank trains on (cuda:LOCAL_RANK under torchrun)."""
    sharded: bool = False
    """FSDP2: `--fsdp` under torchrun (otherwise DDP when distributed, or nothing)."""

    @classmethod
    def from_config(cls, cfg: Any) -> Parallelism:
        """From `TrainConfig.device` / `.fsdp` and torchrun's RANK, WORLD_SIZE, LOCAL_RANK; initialises the process
        group when distributed and selects the CUDA device."""
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device} was requested but CUDA is not available")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device.startswith("cuda:"):
            if world > 1:
                raise ConfigError(f"--device {cfg.device} under torchrun: each rank uses cuda:LOCAL_RANK; pass "
                                  "--device cuda (or auto)")
            local = int(cfg.device.split(":", 1)[1])
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        if cfg.fsdp and world == 1:
            log.warning("--fsdp without torchrun (WORLD_SIZE=1): training unsharded")
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return cls(rank=rank, world=world, device=device, sharded=bool(cfg.fsdp) and world > 1)

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world > 1

    def autocast(self) -> AbstractContextManager:
        """bfloat16 autocast on a GPU; nothing on the CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    # ---- the model -------------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as trained: itself in one process, FSDP2-sharded per decoder block, or in DDP."""
        if not self.distributed:
            return module
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for layer in smodel.decoder_layers(module.student):
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> AbstractContextManager:
        """DDP: skip the gradient all-reduce on the micro-batches before the last of a step (`sync` False)."""
        return model.no_sync() if self.distributed and not self.sharded and not sync else nullcontext()

    def state_parts(self, model: torch.nn.Module, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Stateful]:
        """The checkpoint's `model` and `optimizer` parts: their full, unsharded state (the module's own
        `state_dict` unless sharded; FSDP2's gathered to the CPU on every rank)."""
        if self.sharded:
            return {"model": FullModelState(model), "optimizer": FullOptimizerState(model, optimizer)}
        return {"model": module, "optimizer": optimizer}

    # ---- collectives (no-ops in one process) -------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks in place; returns it."""
        if self.distributed:
            dist.all_reduce(x)
        return x

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of `x` over ranks, on the CPU."""
        x = x.detach().to(self.device)
        if self.distributed:
            dist.all_reduce(x)
            x = x / self.world
        return x.cpu()

    def any_rank(self, bad: bool) -> bool:
        """True on every rank when `bad` is True on any rank."""
        flag = torch.tensor([1.0 if bad else 0.0])
        return bool(self.all_mean(flag)[0] > 0) if self.distributed else bad

    def on_rank0(self, fn: Callable[[], T], *, catch: type[Exception],
                 elsewhere: Callable[[str], Exception]) -> T | None:
        """`fn()` on rank 0 only (None elsewhere). An exception of type `catch` there stops every rank with the
        same line instead of leaving the others waiting at a collective: rank 0 raises it, the others
        `elsewhere(its message)`."""
        result, problem = None, None
        if self.rank == 0:
            try:
                result = fn()
            except catch as e:
                problem = e
        if self.distributed:
            box = [None if problem is None else str(problem)]
            dist.broadcast_object_list(box, src=0)
            if problem is None and box[0] is not None:
                raise elsewhere(box[0])
        if problem is not None:
            raise problem
        return result

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
