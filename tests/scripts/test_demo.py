"""scripts/demo.sh stays in step with the CLI: valid bash, and every option it passes exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts/demo.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_demo_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEMO)], check=True)


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))


def test_every_option_in_the_demo_is_known_to_the_command_it_goes_to():
    from cli import main

    script = DEMO.read_text()
    # the commands the demo runs, each with the options passed on its (continued) lines
    known = {}
    for cmd in ("init-student", "precompute", "train-student", "evaluate"):
        r = CliRunner().invoke(main, [cmd, "--help"], terminal_width=200)
        assert r.exit_code == 0, r.output
        known[cmd] = _options(r.output)
    bt = subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_teachers.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    known["build_teachers"] = _options(bt.stdout) if bt.returncode == 0 else None

    # join continuation lines, then attribute each line's options to the command named on it
    logical = script.replace("\\\n", " ").splitlines()
    train_opts = _options(re.search(r"TRAIN=\((.*?)\)$", script, re.DOTALL | re.MULTILINE).group(1))
    assert {"--student", "--max-steps", "--device"} <= train_opts
    checked = 0
    for line in logical:
        for cmd, opts in known.items():
            if (f"cli.py {cmd}" in line or f"{cmd}.py" in line) and opts is not None:
                used = _options(line) | (train_opts if cmd == "train-student" else set())
                assert used <= opts, f"{cmd}: unknown options {sorted(used - opts)}"
                checked += 1
    assert checked >= 5


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_demo_refuses_an_unknown_corpus_in_one_line(tmp_path):
    r = subprocess.run(["bash", str(DEMO), str(tmp_path / "out")], env={"PATH": "/usr/bin:/bin", "DEMO_CORPUS": "poems"},
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.strip() == "error: DEMO_CORPUS must be text or chat, got poems"
    assert not (tmp_path / "out").exists()
