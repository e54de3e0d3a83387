"""The package layers: common <- storage <- {teachers, student}. Neither stage imports the other, and a lower
layer never imports a higher one (imports read with `ast`, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "common": {"storage", "teachers", "student"},
    "storage": {"teachers", "student"},
    "teachers": {"student"},
    "student": {"teachers"},
}


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
