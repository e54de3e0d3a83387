"""What the benchmark scripts share: the command-line options several of them take (one flag, type and help
each; every script keeps its own default), the process's memory counters on Linux, running a logged command,
and replacing a script's marked block of benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run `cmd` at the repository root with its output in `log`; on failure, exit with its last 20 lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"error: command failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))


def replace_block(results: Path, begin: str, end: str, text: str, header: str | None = None) -> None:
    """Put `text` between the `begin` and `end` markers of `results`, replacing what was there. Without the
    markers the block goes right under `header` (added at the end when missing); with no `header`, missing
    markers are an error."""
    doc = results.read_text(encoding="utf-8")
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        a, b = doc.index(begin), doc.index(end) + len(end)
        doc = doc[:a] + block + doc[b:]
    elif header is None:
        raise SystemExit(f"error: {results} has no {begin} ... {end} block to replace")
    elif header in doc:
        a = doc.index(header) + len(header)
        doc = doc[:a] + "\n" + block + "\n" + doc[a:]
    else:
        doc = doc.rstrip("\n") + "\n\n" + header + "\n" + block + "\n"
    results.write_text(doc, encoding="utf-8")
