"""What the benchmark scripts share: the command-line options several of them take (one flag, type and help
each; every script keeps its own default) and the process's memory counters on Linux."""

from __future__ import annotations

import argparse

_OPTIONS: dict[str, tuple[type, str]] = {
    "device": (str, "cpu, cuda or cuda:N"),
    "seq_len": (int, "tokens per sequence"),
    "batch_size": (int, "sequences per forward or step"),
    "batch_tokens": (int, "tokens per teacher forward / student step"),
    "top_k": (int, "top-k stored per position and teacher"),
    "vocab": (int, "vocab size of the random or tiny models"),
    "workers": (int, "DataLoader workers of the cache run"),
    "threads": (int, "torch intra-op CPU threads (default: torch's)"),
}


def add_options(ap: argparse.ArgumentParser, *, helps: dict[str, str] | None = None, **defaults: object) -> None:
    """Add `--name` for each keyword (seq_len=256 -> `--seq-len`, default 256), with the shared type and help
    (`helps` overrides a help text where a script means something narrower)."""
    for name, default in defaults.items():
        kind, text = _OPTIONS[name]
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default,
                        help=(helps or {}).get(name, text))


def status_kib(field: str) -> int:
    """A `/proc/self/status` counter in KiB (`VmRSS`, `VmHWM`, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
