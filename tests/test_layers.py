"""The package layers: common <- storage <- {teachers, student} <- multidistill (the command line). Neither
stage imports the other, and a lower layer never imports a higher one (imports read with `ast`, including those
inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "common": {"storage", "teachers", "student", "multidistill"},
    "storage": {"teachers", "student", "multidistill"},
    "teachers": {"student", "multidistill"},
    "student": {"teachers", "multidistill"},
}
"""multidistill (the command line, above both stages) may import every package; none imports it."""


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in the file, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            out.add((node.lineno, (node.module or "").split(".")[0]))
    return out


def test_imported_packages_sees_nested_and_from_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from teachers.corpus import x\n    import student.data as d\n")
    assert imported_packages(f) == {(1, "os"), (4, "teachers"), (5, "student")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_or_beside_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = [f"{f.relative_to(ROOT)}:{line} imports {top}" for f in files
           for line, top in sorted(imported_packages(f)) if top in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_console_script_is_the_group_cli_py_runs() -> None:
    """`multidistill` (pyproject) names the package's click group, which `python cli.py` runs too; the
    top-level `cli.py` is not installed (no `py-modules`), and the packages installed are the layers above."""
    import importlib

    import cli

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"] == {"multidistill": "multidistill.cli:main"}
    module, attr = project["project"]["scripts"]["multidistill"].split(":")
    assert getattr(importlib.import_module(module), attr) is cli.main
    setuptools = project["tool"]["setuptools"]
    assert "py-modules" not in setuptools
    assert setuptools["packages"]["find"]["include"] == [f"{p}*" for p in (*FORBIDDEN, "multidistill")]
