"""One `--device` option type for every command: `auto`, `cpu`, `cuda`, `cuda:N`.

    @click.option("--device", type=DeviceParam(), default="auto", help=DEVICE_HELP)

Configs check the same values with `storage.params.check_device` in `__post_init__`.
"""

from __future__ import annotations

import click

from storage.params import DEVICE_PATTERN

DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, or cuda:N."


class DeviceParam(click.ParamType):
    """click type for `--device`: auto, cpu, cuda or cuda:N (a usage error names the accepted values)."""

    name = "auto|cpu|cuda|cuda:N"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value):
            return value
        self.fail(f"{value!r} is not one of auto, cpu, cuda, cuda:N", param, ctx)
