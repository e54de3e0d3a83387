"""The one `--device` vocabulary of every command (`auto`, `cpu`, `cuda`, `cuda:N`) and the one rule that
turns it into a torch device string.

    @click.option("--device", type=DeviceParam(), default="auto", help=DEVICE_HELP)

Configs check the same values with `check_device` in `__post_init__`; the code that places a model calls
`resolve_device`.
"""

from __future__ import annotations

import os
import re

import click

from common.errors import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
"""Device names the commands accept: auto, cpu, cuda, cuda:N."""
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, or cuda:N."


def check_device(name: str, value: str) -> None:
    """ConfigError unless `value` is auto, cpu, cuda or cuda:N (`name` is the option, e.g. --device)."""
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"{name} is {value!r}, expected auto, cpu, cuda or cuda:N")


def local_rank() -> int:
    """This process's GPU slot on its node: LOCAL_RANK (torchrun), else SLURM_LOCALID (srun), else 0."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def resolve_device(device: str) -> str:
    """`auto` -> `cuda:(local_rank() modulo visible GPUs)` when CUDA is available, else `cpu`; `cuda` ->
    the same GPU; `cpu` and `cuda:N` stay. ConfigError (one line) when CUDA is asked for and absent."""
    import torch

    check_device("--device", device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device in ("auto", "cuda"):
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> bfloat16 on a GPU, float32 on CPU; any other name stays (a torch dtype name)."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return dtype


class DeviceParam(click.ParamType):
    """click type for `--device`: auto, cpu, cuda or cuda:N (a usage error names the accepted values)."""

    name = "auto|cpu|cuda|cuda:N"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value):
            return value
        self.fail(f"{value!r} is not one of auto, cpu, cuda, cuda:N", param, ctx)
