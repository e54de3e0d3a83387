"""Every command line in README.md and docs/*.md: `cli.py` flags exist on that command, multi-node torchrun
lines name a rendezvous backend and id, and `$HEAD` is defined before it is used."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")  # a span may wrap onto the next line


def command_lines(text: str) -> list[str]:
    """Shell lines from fenced blocks (continuations joined) and inline code spans that run something."""
    lines = []
    for block in _FENCE.findall(text):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    prose = _FENCE.sub("", text)
    spans = [" ".join(span.split()) for span in _INLINE.findall(prose)]
    lines += [span for span in spans if "cli.py" in span or "torchrun" in span]
    return [line for line in lines if not line.startswith("#")]


def cli_calls(line: str) -> list[tuple[str, list[str]]]:
    """(command, flags) for every `cli.py COMMAND ...` in a line (up to the next shell separator)."""
    calls = []
    for match in re.finditer(r"cli\.py\s+([a-z][a-z-]*)(.*?)(?=$|&&|;|\||cli\.py)", line):
        flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2))
        calls.append((match.group(1), flags))
    return calls


def _options(command: click.Command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return names


def _all_lines() -> list[tuple[str, str]]:
    return [(doc.name, line) for doc in DOCS for line in command_lines(doc.read_text(encoding="utf-8"))]


def test_the_docs_have_command_lines() -> None:
    lines = _all_lines()
    assert sum(bool(cli_calls(line)) for _, line in lines) >= 20
    assert sum("torchrun" in line for _, line in lines) >= 4


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_every_cli_flag_exists_on_its_command(doc: str) -> None:
    bad = []
    for name, line in _all_lines():
        if name != doc:
            continue
        for command, flags in cli_calls(line):
            cmd = main.commands.get(command)
            if cmd is None:
                bad.append(f"unknown command {command!r} in: {line}")
                continue
            bad += [f"{command} has no {flag}: {line}" for flag in flags if flag not in _options(cmd)]
    assert not bad, "\n".join(bad)


def test_multi_node_torchrun_lines_name_a_rendezvous() -> None:
    bad = []
    for name, line in _all_lines():
        if "torchrun" not in line:
            continue
        nodes = re.search(r"--nnodes[ =](\S+)", line)
        if nodes and nodes.group(1) not in ("1", "1:1"):
            for needed in ("--rdzv-backend", "--rdzv-id", "--rdzv-endpoint"):
                if needed not in line:
                    bad.append(f"{name}: {needed} missing: {line}")
            if "--rdzv-backend static" in line:
                bad.append(f"{name}: static rendezvous across nodes: {line}")
    assert not bad, "\n".join(bad)


def test_head_is_defined_where_it_is_used() -> None:
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        if "$HEAD" in text:
            assert re.search(r"HEAD=\$\(scontrol show hostnames", text), f"{doc.name} uses $HEAD without defining it"


def test_no_link_leaves_the_repository() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text(encoding="utf-8")):
            if target.startswith(("http", "#")):
                continue
            resolved = (doc.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc.name} links {target}"
        assert "../shared" not in doc.read_text(encoding="utf-8"), doc.name
