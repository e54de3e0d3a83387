"""benchmarks/shared.py: the marked RESULTS block is replaced in place, inserted under its header, or refused,
and a failing logged command stops with its last lines."""

from __future__ import annotations

import sys

import pytest

from benchmarks.shared import replace_block, run_logged

B, E = "<!-- x:begin -->", "<!-- x:end -->"


def test_replace_block_in_place_under_a_header_or_refused(tmp_path):
    f = tmp_path / "RESULTS.md"
    f.write_text(f"# R\n\n## X\n{B}\nold\n{E}\n\n## Y\ny\n")
    replace_block(f, B, E, "new")
    assert f.read_text() == f"# R\n\n## X\n{B}\nnew\n{E}\n\n## Y\ny\n"
    f.write_text("# R\n\n## X\nprose\n")
    replace_block(f, B, E, "t", "## X\n")
    assert f.read_text() == f"# R\n\n## X\n\n{B}\nt\n{E}\nprose\n"
    f.write_text("# R\n")
    replace_block(f, B, E, "t", "## X\n")
    assert f.read_text() == f"# R\n\n## X\n\n{B}\nt\n{E}\n"
    f.write_text("# R\n")
    with pytest.raises(SystemExit, match="no <!-- x:begin --> ... <!-- x:end --> block"):
        replace_block(f, B, E, "t")
    assert f.read_text() == "# R\n"


def test_run_logged_stops_with_the_last_lines(tmp_path):
    log = tmp_path / "logs" / "ok.log"
    run_logged([sys.executable, "-c", "print('fine')"], log)
    assert log.read_text() == "fine\n"
    code = "import sys; [print(i) for i in range(30)]; sys.exit(3)"
    with pytest.raises(SystemExit, match=r"exit 3\); last lines of .*bad.log:\n10\n11\n(.|\n)*\n29$"):
        run_logged([sys.executable, "-c", code], tmp_path / "bad.log")
