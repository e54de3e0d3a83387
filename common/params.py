"""Value checks shared by every command and config: finite numbers, float lists, positive integers and
choices (device names: `common/devices.py`).

One source for the rules, used twice: click parameter types (`FINITE_FLOAT`, `FLOAT_LIST`) reject a bad
option value at the command line with the option's name, and `check_finite(cfg)` (called first in each
config dataclass's `__post_init__`) rejects a non-finite number however the config was built, so NaN or
infinity never reaches a manifest, a checkpoint or a model. NaN compares false with everything, so range
checks such as `if x < 0` let it through; that is why finiteness is checked on its own, before them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import click

from common.errors import ConfigError

MAX_WEIGHT_SUM = 1e38
"""Teacher weights are normalised in float32 (largest value ~3.4e38)."""
MAX_SEED = 2**63 - 1
"""Seeds are in 0..MAX_SEED (torch.manual_seed takes 64-bit seeds; numpy refuses negative ones)."""


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def non_finite(value: object) -> float | None:
    """The first non-finite number in `value` (a number, or a list/tuple/dict of them), else None."""
    if _is_number(value):
        return None if math.isfinite(value) else float(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            bad = non_finite(v)
            if bad is not None:
                return bad
    return None


def check_finite(cfg: Any) -> None:
    """ConfigError naming the first field of dataclass `cfg` that holds NaN or +-infinity (also inside
    lists, tuples and dicts; nested dataclasses check themselves)."""
    for f in dataclasses.fields(cfg):
        bad = non_finite(getattr(cfg, f.name))
        if bad is not None:
            raise ConfigError(f"{f.name} must be a finite number, got {bad}")


def check_weights(name: str, values: tuple[float, ...] | list[float] | None) -> None:
    """ConfigError unless `values` (None passes) are finite, >= 0, with a positive sum below MAX_WEIGHT_SUM
    (they are normalised by it in float32)."""
    if values is None:
        return
    if non_finite(values) is not None or any(w < 0 for w in values) or not 0 < sum(values) < MAX_WEIGHT_SUM:
        raise ConfigError(f"{name} must be >= 0 with a positive sum below {MAX_WEIGHT_SUM:g}, got {tuple(values)}")


def check_positive(name: str, value: int | None, *, optional: bool = False) -> None:
    """ConfigError unless `value` is an int in [1, 2**63-1] (None passes when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= sys.maxsize:
        raise ConfigError(f"{name} must be a positive integer (at most 2**63-1), got {value!r}")


def check_seed(name: str, value: int) -> None:
    """ConfigError unless `value` is an int in 0..MAX_SEED (every seed of every command: torch and numpy take
    these, and a bad one must fail before any work rather than inside numpy after it)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be in 0..2**63-1, got {value!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{name} is {value!r}, expected one of {', '.join(choices)}")


def parse_float_list(text: str) -> tuple[float, ...]:
    """'0.5,0.3,0.2' -> (0.5, 0.3, 0.2); ValueError naming the bad item (not a number, or not finite)."""
    out = []
    for item in text.split(","):
        try:
            x = float(item)
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
        if not math.isfinite(x):
            raise ValueError(f"{item.strip()!r} in {text!r} is not a finite number")
        out.append(x)
    return tuple(out)


class FiniteFloat(click.ParamType):
    """A float that is not NaN or +-infinity (click's FLOAT accepts 'nan' and 'inf')."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


class FloatList(click.ParamType):
    """Comma-separated finite floats, e.g. 0.5,0.3,0.2 -> (0.5, 0.3, 0.2)."""

    name = "floats"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_float_list(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


FINITE_FLOAT = FiniteFloat()
FLOAT_LIST = FloatList()
