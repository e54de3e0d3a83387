"""storage/artifacts.py: each kind of artifact is recognised by its own files, and `check_output` applies the
output rule (tests/test_outputs.py runs it through every command)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.errors import ConfigError
from storage.artifacts import Input, Kind, artifact, artifact_kind, check_output
from tests.student.synthetic import make_cache


def _write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    """One small instance of every kind, made of the files that mark it (no model is built)."""
    cache = make_cache(tmp_path / "cache", n=8)
    run = tmp_path / "run"
    _write(run / "config.json", json.dumps({"teacher_data": [str(cache)], "output": str(run)}))
    _write(run / "final" / "config.json", json.dumps({"model_type": "llama"}))
    _write(run / "final" / "model.safetensors")
    _write(tmp_path / "model" / "config.json", json.dumps({"model_type": "llama"}))
    _write(tmp_path / "web" / "manifest.json", json.dumps({"name": "an app", "icons": []}))
    _write(tmp_path / "web" / "index.html", "<html></html>")
    return {
        "cache": cache,
        "slices_only": _write(tmp_path / "sliced" / "ledger-slice-00000-of-00002.json", "{}").parent,
        "run": run,
        "run_metrics_only": _write(tmp_path / "run2" / "metrics.jsonl", "").parent,
        "model": _write(tmp_path / "model" / "model.safetensors").parent,
        "gguf": _write(tmp_path / "gguf" / "m.Q4_K_M.gguf").parent,
        "config_only": _write(tmp_path / "cfg" / "config.json", json.dumps({"model_type": "llama"})).parent,
        "tokenizer": _write(tmp_path / "tok" / "tokenizer.json", "{}").parent,
        "report": _write(tmp_path / "results", json.dumps({"models": {}, "windows": 3, "seq_len": 16})),
        "figure": _write(tmp_path / "fig", b"\x89PNG\r\n\x1a\n rest"),
        "fake_png": _write(tmp_path / "fake.png", b"not an image"),
        "corpus": _write(tmp_path / "c.jsonl", '{"text": "a"}\n'),
        "corpus_dir": _write(tmp_path / "corpus" / "train.jsonl.gz").parent,
        "other": _write(tmp_path / "notes.md", "hello"),
        "other_dir": _write(tmp_path / "misc" / "notes.md", "hello").parent,
        "web_manifest": tmp_path / "web",
        "empty": tmp_path / "empty",
    }


def test_every_kind_is_recognised_by_its_files(layout):
    layout["empty"].mkdir()
    expected = {
        "cache": Kind.CACHE, "slices_only": Kind.CACHE, "run": Kind.RUN, "run_metrics_only": Kind.RUN,
        "model": Kind.MODEL, "gguf": Kind.MODEL, "config_only": Kind.MODEL, "tokenizer": Kind.TOKENIZER,
        "report": Kind.REPORT, "figure": Kind.FIGURE, "fake_png": Kind.FILE, "corpus": Kind.CORPUS,
        "corpus_dir": Kind.CORPUS, "other": Kind.FILE, "other_dir": Kind.DIRECTORY, "empty": Kind.EMPTY,
        "web_manifest": Kind.DIRECTORY,  # a manifest.json without a cache manifest's keys
    }
    assert {name: artifact_kind(str(p)) for name, p in layout.items()} == expected
    assert artifact_kind(str(layout["empty"] / "new")) is Kind.ABSENT


def test_parts_name_the_artifact_they_belong_to(layout):
    cache, run = layout["cache"], layout["run"]
    for part in (cache / "shard-000000.parquet", cache / "manifest.json", cache / "new-report.json"):
        held = artifact(str(part))
        assert held.kind is Kind.CACHE_PART and held.inside == str(cache), part
    for part in (run / "final", run / "config.json", run / "checkpoints"):
        held = artifact(str(part))
        assert held.kind is Kind.RUN_PART and held.inside == str(run), part
    assert artifact_kind(str(run / "eval.json")) is Kind.ABSENT  # a new file beside the run's own ones
    assert artifact_kind(str(layout["model"] / "model.safetensors")) is Kind.MODEL_PART


def test_special_files_are_never_read(tmp_path):
    """A FIFO named like a report or a figure is classified without reading it (a read would block)."""
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    assert artifact_kind(str(fifo)) is Kind.CORPUS  # by its name only: never opened
    with pytest.raises(ConfigError, match="corpus"):
        check_output(str(fifo), command="evaluate", writes=Kind.REPORT)


def test_object_store_cache(memory_url):
    make_cache(memory_url, n=8)
    assert artifact_kind(memory_url) is Kind.CACHE
    assert artifact(f"{memory_url}/shard-000000.parquet").kind is Kind.CACHE_PART
    check_output(memory_url, command="precompute", writes=Kind.CACHE, replace=True)
    with pytest.raises(ConfigError, match="teacher cache"):
        check_output(memory_url, command="train-student", writes=Kind.RUN)


def test_inputs_are_never_outputs(layout, tmp_path):
    model = layout["model"]
    link = tmp_path / "link"
    link.symlink_to(model)
    cases = [(str(model), "is --from"), (str(link), "is --from"), (str(model / "sub"), "inside --from"),
             (str(tmp_path), "holds --from")]
    for out, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            check_output(out, command="init-student", writes=Kind.MODEL, inputs=[Input("--from", str(model))],
                         replace=True)
    # plot's figure may go inside the run directory it reads, not over it
    check_output(str(layout["run"] / "curves.png"), command="plot", writes=Kind.FIGURE,
                 inputs=[Input("RUN_DIR", str(layout["run"]), output_inside_ok=True)])


def test_own_kind_needs_its_flag_and_other_kinds_never_pass(layout):
    with pytest.raises(ConfigError, match="pass --overwrite to replace it"):
        check_output(str(layout["report"]), command="evaluate", writes=Kind.REPORT, replace_flag="--overwrite")
    check_output(str(layout["report"]), command="evaluate", writes=Kind.REPORT, replace_flag="--overwrite",
                 replace=True)
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        check_output(str(layout["run"]), command="train-student", writes=Kind.RUN, replace_flag="--resume")
    for name in ("cache", "run", "model", "tokenizer", "figure", "corpus", "corpus_dir", "other_dir"):
        with pytest.raises(ConfigError):
            check_output(str(layout[name]), command="evaluate", writes=Kind.REPORT, replace_flag="--overwrite",
                         replace=True)
