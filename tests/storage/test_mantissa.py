"""Log-prob mantissa rounding (`logprob_mantissa_bits`): against a float64 reference, and through the writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from storage_helpers import make_header, write_run

from storage.errors import ManifestError
from storage.manifest import Manifest
from storage.reader import TeacherDataset
from storage.schema import round_mantissa


def _reference(x: np.ndarray, bits: int) -> np.ndarray:
    """float64: |x| = m * 2**e with m in [0.5, 1); keep bits + 1 significant bits, round half to even."""
    m, e = np.frexp(x.astype(np.float64))
    scale = 2.0 ** (bits + 1)
    return np.ldexp(np.round(m * scale) / scale, e)  # np.round rounds halves to even


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bits", [1, 4, 7, 9])
def test_matches_float64_reference_on_normal_numbers(dtype, bits):
    rng = np.random.default_rng(bits)
    x = -np.exp(rng.uniform(-8, 3.4, 20000)).astype(dtype)  # log-prob-like: -3e-4 .. -30
    # exact ties (a half ulp of the kept mantissa above a kept value) must round to even
    full = np.finfo(dtype).nmant
    utype = {np.float16: np.uint16, np.float32: np.uint32, np.float64: np.uint64}[dtype]
    tie = ((x.view(utype) >> utype(full - bits)) << utype(full - bits)) | utype(1 << (full - bits - 1))
    x = np.concatenate([x, tie.view(dtype)])
    got = round_mantissa(x, bits)
    assert got.dtype == dtype
    want = _reference(x, bits)
    np.testing.assert_array_equal(got.astype(np.float64), want)
    assert np.all(np.abs(got.astype(np.float64) - x) <= np.abs(x.astype(np.float64)) * 2.0 ** -(bits + 1))
    # the dropped low bits are zero
    assert not np.any(got.view(utype) & utype((1 << (full - bits)) - 1))


def test_special_values_and_full_precision():
    x = np.array([0.0, -0.0, np.nan, -np.inf, np.inf, -6e-8, -65504.0], dtype=np.float16)
    got = round_mantissa(x, 3)
    assert got[0] == 0 and not np.signbit(got[0]) and got[1] == 0 and np.signbit(got[1])
    assert np.isnan(got[2]) and got[3] == -np.inf and got[4] == np.inf
    assert got[5] <= 0 and got[5] >= x[5] * 2  # subnormal: rounded on the coarser grid, never grows past 2x
    assert got[6] == -np.inf  # the largest finite value rounds up past the range, as in IEEE rounding
    same = round_mantissa(x, 10)
    assert same.tobytes() == x.tobytes() and same is not x
    with pytest.raises(ValueError, match="1..10"):
        round_mantissa(x, 11)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        round_mantissa(np.arange(3, dtype=np.int32), 3)


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_writer_rounds_and_reader_returns_rounded(tmp_path, fmt):
    header = make_header(fmt=fmt, logprob_mantissa_bits=5)
    manifest, written = write_run(str(tmp_path), header)
    assert manifest.logprob_mantissa_bits == 5
    got = TeacherDataset.open(str(tmp_path)).read(np.arange(len(written)))
    # rounded once, from the given float32 values, then cast to float16 (exact: 5 bits fit)
    want = round_mantissa(written.topk_logprobs, 5).astype(np.float16)
    assert written.topk_logprobs.dtype == np.float32
    assert got.topk_logprobs.tobytes() == want.tobytes()
    exact = written.topk_logprobs.astype(np.float64)
    assert np.all(np.abs(got.topk_logprobs - exact) <= np.abs(exact) * 2.0 ** -6)  # one rounding: 2**-(5+1)
    assert not np.array_equal(want, written.topk_logprobs.astype(np.float16))  # rounding did something
    # rounding is idempotent: rewriting what was read gives the same bytes (resume compares shards)
    assert round_mantissa(got.topk_logprobs, 5).tobytes() == got.topk_logprobs.tobytes()


def test_fewer_bits_make_smaller_files(tmp_path):
    sizes = {}
    for bits in (None, 7, 4):
        header = make_header(seq_len=64, top_k=32, logprob_mantissa_bits=bits)
        manifest, _ = write_run(str(tmp_path / str(bits)), header)
        sizes[bits] = manifest.total_bytes
    assert sizes[4] < sizes[7] < sizes[None]


@pytest.mark.parametrize("dtype, bits, message", [
    ("float16", 11, r"1\.\.10 for float16"), ("float16", 0, r"1\.\.10"), ("float32", 24, r"1\.\.23 for float32"),
    ("float16", "7", "expected null or an integer"), ("float16", True, "expected null or an integer"),
])
def test_manifest_refuses_bad_bits(tmp_path, dtype, bits, message):
    write_run(str(tmp_path), make_header(logprob_dtype=dtype))
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["logprob_mantissa_bits"] = bits
    with pytest.raises(ManifestError, match=f"field 'logprob_mantissa_bits' .*{message}"):
        Manifest.from_dict(d, source="x/manifest.json")


def test_manifest_without_the_field_means_full_precision(tmp_path):
    write_run(str(tmp_path), make_header())
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert d.pop("logprob_mantissa_bits") is None
    assert Manifest.from_dict(d).logprob_mantissa_bits is None


def test_no_bits_stores_the_dtype_exactly(tmp_path):
    header = make_header()
    assert header.logprob_mantissa_bits is None
    manifest, written = write_run(str(tmp_path), header)
    got = TeacherDataset.open(str(tmp_path)).read(np.arange(len(written)))
    assert written.topk_logprobs.dtype == np.float32
    assert got.topk_logprobs.tobytes() == written.topk_logprobs.astype(np.float16).tobytes()
