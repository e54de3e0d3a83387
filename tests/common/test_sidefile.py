"""common/sidefile.py: JSON side files are read only from regular files, up to a cap, as UTF-8 JSON; every
refusal is one UserError line naming the file."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from common.errors import ConfigError, UserError
from common.sidefile import read_side_bytes, read_side_json, read_side_text


def test_reads_a_regular_file_directly_or_through_a_link(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"x": [1, 2], "s": "naïve"}), encoding="utf-8")
    os.symlink(f, tmp_path / "link.json")
    for p in (f, tmp_path / "link.json"):
        assert read_side_json(str(p)) == {"x": [1, 2], "s": "naïve"}
    assert read_side_text(str(f)).startswith('{"x"')


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_devices_are_refused_without_reading(tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "zero.json")
    for p in ("/dev/zero", str(tmp_path / "zero.json")):
        with pytest.raises(ConfigError, match="character device, not a regular file"):
            read_side_json(p, error=ConfigError)


def test_fifo_and_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_side_json(str(fifo))
            outcome.append(None)
        except UserError as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader (it waits for a writer) before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(outcome[0], UserError) and "a FIFO, not a regular file" in str(outcome[0])
    with pytest.raises(UserError, match="a directory, not a regular file"):
        read_side_json(str(tmp_path))


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "big.json"
    f.write_text(json.dumps(list(range(1000))))
    with pytest.raises(UserError, match=r"big.json: \d+ bytes, more than the 100 a side file may hold"):
        read_side_bytes(str(f), max_bytes=100)
    assert len(read_side_bytes(str(f), max_bytes=f.stat().st_size)) == f.stat().st_size


def test_bad_bytes_bad_json_and_deep_nesting_are_one_line(tmp_path: Path) -> None:
    f = tmp_path / "m.json"
    for content, why in ((b'{"a": "\xff"}', "not UTF-8 text (byte 7"), (b'{"a": ', "not valid JSON"),
                         (b"[" * 200_000, "not valid JSON"), (b'{"n": ' + b"1" * 10_000 + b"}", "not valid JSON")):
        f.write_bytes(content)
        with pytest.raises(UserError) as info:
            read_side_json(str(f), label="--config X", hint="; fix it")
        message = str(info.value)
        assert message.startswith("--config X: ") and why in message and message.endswith("; fix it")
        assert "\n" not in message


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_side_json(str(tmp_path / "absent.json"))


def test_fsspec_filesystems_are_checked_by_their_entries(memory_url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(memory_url) + "/m.json"
    fs.pipe(path, b'{"a": 1}')
    assert read_side_json(path, fs=fs) == {"a": 1}
    with pytest.raises(UserError, match="more than the 4 a side file may hold"):
        read_side_json(path, fs=fs, max_bytes=4)
    fs.pipe(path, b'{"a": "\xfe"}')
    with pytest.raises(UserError, match="not UTF-8"):
        read_side_json(path, fs=fs)
    with pytest.raises(UserError, match="not a regular file"):
        read_side_json(fs._strip_protocol(memory_url), fs=fs)
