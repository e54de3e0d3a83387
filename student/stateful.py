"""What a checkpoint is made of: parts with `state_dict()` / `load_state_dict(state)`.

`Stateful` is torch.distributed.checkpoint's protocol; modules, optimizers and LR schedulers already follow
it, and the trainer hands `CheckpointManager` (student/checkpoint.py) one dict of them. The only parts that
need a wrapper are an FSDP2-sharded model and its optimizer, whose own `state_dict` would hold this rank's
shards: `FullModelState` / `FullOptimizerState` gather the full, unsharded state to the CPU (every rank
calls them) and load a full state back into the shards. `student.parallel.Parallelism.state_parts` chooses
them once, at setup.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    """An object whose state a checkpoint saves and restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def _full_options(*, cpu_offload: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


class FullModelState:
    """An FSDP2 module's full state dict (gathered to the CPU of every rank), and loading one into its shards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_full_options(cpu_offload=True))

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        return set_model_state_dict(self.model, state_dict, options=_full_options(cpu_offload=False))


class FullOptimizerState:
    """The optimizer of an FSDP2 module: its full state dict (parameters named, gathered to the CPU), and loading
    one into the sharded state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=_full_options(cpu_offload=True))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_full_options(cpu_offload=False))
