"""The benchmarks' structure, parsed with `ast`: no function longer than 80 lines, and no script but the runner
(benchmarks/runner.py) builds `cli.py` command lines (experiments describe runs as configs; the runner executes
them)."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MAX_LINES = 80


def _trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(BENCHMARKS.glob("*.py"))}


def test_no_benchmark_function_is_longer_than_80_lines():
    long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _trees().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, "split these functions: " + ", ".join(long)


def test_only_the_runner_names_cli_py_in_code():
    """A string constant `cli.py` (or a path ending in it) outside docstrings means a hand-built command line."""
    found = []
    for name, tree in _trees().items():
        if name == "runner.py":
            continue
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and node.value.strip().endswith("cli.py")):
                found.append(f"{name}:{node.lineno}")
    assert not found, "build cli.py commands through benchmarks/runner.py: " + ", ".join(found)
