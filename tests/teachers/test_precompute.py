"""run_precompute end to end on a tiny random Llama teacher: stored targets against a float64 dense
reference, slices against an unsliced run, resume, refusal of a different configuration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.errors import MismatchError
from storage.merge import write_merged
from storage.reader import TeacherDataset
from teachers.backend_options import VllmOptions
from teachers.config import PrecomputeConfig, tiny
from teachers.precompute import run_precompute
from tests.helpers import make_tiny_setup

SEQ_LEN, WINDOWS = 32, 30  # 30 windows in shards of 4: 8 shards, the last one partial


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("precompute")
    teacher, corpus = make_tiny_setup(root, n_docs=80, vocab=512, seed=3)
    return root, teacher, corpus


def _cfg(setup, out: str, **kw) -> PrecomputeConfig:
    root, teacher, corpus = setup
    cfg = tiny(str(teacher), str(corpus), str(root / out), **{k: v for k, v in kw.items() if k in ("num_slices", "slice_index")})
    cfg.corpus.max_tokens = SEQ_LEN * WINDOWS
    for key, value in kw.items():
        if key in ("top_k", "temperature", "pool_layers", "head_chunk_size", "batch_size", "targets", "samples"):
            setattr(cfg.teacher, key, value)
        elif key in ("logprob_dtype", "logprob_mantissa_bits", "format", "shard_size"):
            setattr(cfg.storage, key, value)
    return cfg


def _shard_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.parquet"))}


TARGETS = [pytest.param({}, id="topk"), pytest.param({"targets": "sampled", "samples": 12}, id="sampled")]
"""Target kinds the byte-identity tests run for (keyword arguments of _cfg)."""


def _reference(teacher: Path, input_ids: np.ndarray, temperature: float, k: int):
    """Dense float64: full log-softmax over the vocab, entropy, top-k, pooled hidden states."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float64).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids).long(), output_hidden_states=True)
    logp = torch.log_softmax(out.logits / temperature, dim=-1)  # [B, L, V]
    entropy = -(logp.exp() * logp).sum(-1)
    top_lp, top_ids = torch.topk(logp, k, dim=-1)
    pooled = {i: out.hidden_states[i + 1].mean(1) for i in range(len(out.hidden_states) - 1)}
    return logp, top_ids, top_lp, entropy, pooled


# (dtype, mantissa bits asked (None: default), bits in the manifest, relative tolerance of stored log-probs)
@pytest.mark.parametrize(("logprob_dtype", "bits", "stored_bits", "temperature", "rtol"), [
    ("float32", None, None, 1.0, 0.0),
    ("float16", None, None, 0.7, 2.0 ** -11),  # default: exact float16, rounding of the cast only
    ("float16", 7, 7, 0.7, 2.0 ** -8),        # 7 of float16's 10 bits, relative error <= 2**-8
    ("float16", 10, None, 0.7, 2.0 ** -11),   # all 10 = the default
    ("float32", 12, 12, 1.0, 2.0 ** -13),
])
def test_stored_targets_match_float64_reference(setup, logprob_dtype: str, bits, stored_bits, temperature: float,
                                                rtol: float) -> None:
    out = f"ref-{logprob_dtype}-{bits}"
    cfg = _cfg(setup, out, logprob_dtype=logprob_dtype, logprob_mantissa_bits=bits, temperature=temperature,
               pool_layers=[0, -1], top_k=8, head_chunk_size=13)
    manifest = run_precompute(cfg)
    assert manifest.logprob_mantissa_bits == stored_bits
    assert manifest.num_sequences == WINDOWS and len(manifest.shards) == 8 and manifest.shards[-1].rows == 2
    assert manifest.pooled_layers == [0, 1] and manifest.entropy_kind == "exact"
    assert manifest.notes["packing"]["windows"] == WINDOWS and manifest.notes["packing"]["dropped_tokens"] == 0
    ds = TeacherDataset.open(str(setup[0] / out))
    data = ds.read_columns(np.arange(len(ds)))
    np.testing.assert_array_equal(data["seq_id"], np.arange(WINDOWS))
    assert data["topk_logprobs"].dtype == np.dtype(logprob_dtype)
    logp, ref_ids, ref_lp, ref_ent, pooled = _reference(setup[1], data["input_ids"], temperature, 8)
    ids = torch.from_numpy(data["topk_ids"]).long()
    lp = torch.from_numpy(data["topk_logprobs"].astype(np.float64))
    gaps = ref_lp[..., :-1] - ref_lp[..., 1:]
    clear = torch.cat([gaps > 1e-4, torch.ones_like(gaps[..., :1], dtype=torch.bool)], -1)
    clear &= torch.cat([torch.ones_like(gaps[..., :1], dtype=torch.bool), gaps > 1e-4], -1)
    assert clear.float().mean() > 0.95
    torch.testing.assert_close(ids[clear], ref_ids[clear], rtol=0, atol=0)
    # float32 head vs float64: ~2e-5 absolute; storage rounding: relative, at most rtol
    torch.testing.assert_close(lp, logp.gather(-1, ids), rtol=rtol, atol=2e-5)
    torch.testing.assert_close(torch.from_numpy(data["entropy"]).double(), ref_ent, rtol=1e-4, atol=1e-6)
    for layer in (0, 1):
        torch.testing.assert_close(torch.from_numpy(data[f"pooled_{layer}"]).double(), pooled[layer],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_draws_follow_the_float64_reference(setup, temperature: float) -> None:
    """The stored draws are the inverse-CDF draws of the run's uniforms under the dense float64 softmax, with
    another chunk and batch size changing at most a rare draw; entropy is exact as for top-k."""
    from storage.manifest import SAMPLE_SEED_RULE
    from teachers.sampling import draw_uniforms, sample_key

    n = 12
    cfg = _cfg(setup, f"sampled-ref-{temperature}", targets="sampled", samples=n, temperature=temperature,
               head_chunk_size=13, batch_size=3)
    manifest = run_precompute(cfg)
    assert (manifest.target_kind, manifest.samples, manifest.top_k) == ("sampled", n, n)
    assert manifest.sample_seed == SAMPLE_SEED_RULE
    data = TeacherDataset.open(str(setup[0] / f"sampled-ref-{temperature}")).read_columns(np.arange(WINDOWS))
    assert set(data) >= {"sample_ids", "sample_counts", "entropy"} and "topk_ids" not in data
    ids, counts = data["sample_ids"].astype(np.int64), data["sample_counts"].astype(np.int64)
    assert counts.dtype == np.int64 and (counts.sum(-1) == n).all()
    assert (np.diff(counts, axis=-1) <= 0).all()  # by descending count, padding (0) last
    logp, *_, ref_ent, _ = _reference(setup[1], data["input_ids"], temperature, 8)
    torch.testing.assert_close(torch.from_numpy(data["entropy"]).double(), ref_ent, rtol=1e-4, atol=1e-6)
    # redraw with the dense float64 distribution and the manifest's seed rule
    key = sample_key(manifest.corpus_fingerprint, manifest.teacher.name, manifest.teacher.path)
    u = torch.from_numpy(draw_uniforms(key, data["seq_id"], SEQ_LEN, n))  # [B * L, n]
    cdf = logp.exp().reshape(-1, logp.shape[-1]).cumsum(-1)
    ref_draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[-1] - 1)
    ref_counts = torch.zeros_like(cdf, dtype=torch.int64).scatter_add_(1, ref_draws, torch.ones_like(ref_draws))
    got_counts = torch.zeros_like(ref_counts).scatter_add_(
        1, torch.from_numpy(ids.reshape(-1, n)), torch.from_numpy(counts.reshape(-1, n)))
    same = (got_counts == ref_counts).all(dim=1)
    # a draw can only differ where a uniform falls within float32 rounding of a CDF step: rare
    assert same.float().mean() > 0.995, same.float().mean()
    # another head chunk size and batch size
    other = _cfg(setup, f"sampled-ref-{temperature}-b", targets="sampled", samples=n, temperature=temperature,
                 head_chunk_size=64, batch_size=4)
    run_precompute(other)
    again = TeacherDataset.open(str(setup[0] / f"sampled-ref-{temperature}-b")).read_columns(np.arange(WINDOWS))
    # the uniforms are the same; another batch size may move a logit by one float32 ulp (the matmul's
    # blocking), which can move a draw that falls exactly on a CDF step: at most a few in 10^4 draws
    same = (again["sample_ids"] == data["sample_ids"]) & (again["sample_counts"] == data["sample_counts"])
    assert same.mean() > 0.999, same.mean()


@pytest.mark.parametrize("kind", TARGETS)
def test_two_slices_equal_one_unsliced_run(setup, kind) -> None:
    """One partition (the corpus is smaller than --partition-bytes): slice 0 computes everything, slice 1
    writes an empty slice manifest, and the merge equals the unsliced run."""
    root, tag = setup[0], kind.get("targets", "topk")
    whole = run_precompute(_cfg(setup, f"whole-{tag}", **kind))
    assert whole.num_partitions == 1
    counts = [len(run_precompute(_cfg(setup, f"sliced-{tag}", num_slices=2, slice_index=s, **kind)).shards) for s in (0, 1)]
    assert counts == [8, 0]
    assert (root / f"sliced-{tag}" / "manifest-slice-00001-of-00002.json").exists()
    assert _shard_hashes(root / f"sliced-{tag}") == _shard_hashes(root / f"whole-{tag}")
    a, b = TeacherDataset.open(str(root / f"whole-{tag}")), TeacherDataset.open(str(root / f"sliced-{tag}"))
    assert a.manifest.target_kind == b.manifest.target_kind == tag
    assert len(a) == len(b) == whole.num_sequences == WINDOWS
    ra, rb = a.read_columns(np.arange(WINDOWS)), b.read_columns(np.arange(WINDOWS))
    assert ra.keys() == rb.keys()
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)


def test_three_slices_read_a_third_each_and_join_two_slices(setup) -> None:
    """Acceptance: with 6 corpus partitions, each of 3 slices reads at most 1/3 of the corpus bytes plus
    one partition; the merged cache is byte-identical to the unsliced run and joins a 2-slice cache."""
    from storage.layout import partition_of
    from student.data import join_teachers

    root, teacher, corpus = setup
    size = corpus.stat().st_size
    part_bytes = -(-size // 6)

    def cfg(out: str, n: int, s: int) -> PrecomputeConfig:
        c = tiny(str(teacher), str(corpus), str(root / out), num_slices=n, slice_index=s)
        c.corpus.partition_bytes = part_bytes
        return c

    whole = run_precompute(cfg("p-whole", 1, 0))
    assert whole.num_partitions == 6 and len({partition_of(i.index) for i in whole.shards}) == 6
    assert whole.notes["this_run"]["corpus_bytes_read"] >= size
    reads, docs = [], []
    for s in range(3):
        m = run_precompute(cfg("p-three", 3, s))
        assert m.shards and {partition_of(i.index) % 3 for i in m.shards} == {s}
        reads.append(m.notes["this_run"]["corpus_bytes_read"])
        docs.append(m.notes["this_run"]["corpus_documents_read"])
    print(f"corpus {size} B in 6 partitions of {part_bytes} B; bytes read per slice {reads}, documents {docs} "
          f"of {whole.notes['this_run']['corpus_documents_read']}")
    assert all(r <= size / 3 + part_bytes for r in reads), (reads, size, part_bytes)
    assert sum(docs) == whole.notes["this_run"]["corpus_documents_read"] == whole.notes["packing"]["documents"]
    for s in range(2):
        run_precompute(cfg("p-two", 2, s))
    assert _shard_hashes(root / "p-three") == _shard_hashes(root / "p-whole") == _shard_hashes(root / "p-two")
    merged = write_merged(str(root / "p-three"))
    assert merged.shards == whole.shards
    # the merged manifest reports the whole run's statistics (equal to the unsliced run's counts), and keeps
    # each slice's own
    assert merged.notes["packing"] == whole.notes["packing"]
    assert merged.notes["partitions"] == whole.notes["partitions"]
    run, slices = merged.notes["this_run"], merged.notes["slices"]
    assert (run["sequences"], run["shards"], run["corpus_documents_read"]) == (
        whole.num_sequences, len(whole.shards), whole.notes["this_run"]["corpus_documents_read"])
    assert run["corpus_bytes_read"] == sum(reads)
    assert sorted(slices) == ["0", "1", "2"]
    assert [slices[str(s)]["this_run"]["corpus_bytes_read"] for s in range(3)] == reads
    assert run["teacher_seconds"] == pytest.approx(sum(slices[str(s)]["this_run"]["teacher_seconds"] for s in range(3)),
                                                   abs=1e-9)
    joined = join_teachers([str(root / "p-three"), str(root / "p-two"), str(root / "p-whole")])
    np.testing.assert_array_equal(joined[0].seq_ids, joined[1].seq_ids)
    assert len(joined[0]) == whole.num_sequences


@pytest.mark.parametrize("kind", TARGETS)
def test_rerun_resumes_and_a_different_config_is_refused(setup, kind) -> None:
    root, tag = setup[0], kind.get("targets", "topk")
    out = f"resume-{tag}"
    first = run_precompute(_cfg(setup, out, **kind))
    hashes = _shard_hashes(root / out)
    run = first.notes["this_run"]
    assert 0.0 <= run["writer_wait_s"] <= run["loop_seconds"]  # producer time inside write_shard, within the loop
    again = run_precompute(_cfg(setup, out, **kind))
    assert again.notes["this_run"] == {**again.notes["this_run"], "sequences": 0, "shards": 0, "skipped_completed": 8}
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]
    assert _shard_hashes(root / out) == hashes
    # a different run into the same directory: other k / N, or the other kind of targets
    other = {"samples": 7, "targets": "sampled"} if kind else {"top_k": 4}
    field = "top_k"
    with pytest.raises(MismatchError, match=field) as err:
        run_precompute(_cfg(setup, out, **other))
    assert err.value.field == field
    switched = {"top_k": 12} if kind else {"targets": "sampled", "samples": 8}  # same slot count, other kind
    with pytest.raises(MismatchError, match="target_kind") as err:
        run_precompute(_cfg(setup, out, **switched))
    assert err.value.field == "target_kind"
    manifest = json.loads((root / out / "manifest.json").read_text())
    assert manifest["top_k"] == (12 if kind else 8)  # the refused runs left the output as it was


@pytest.mark.parametrize("kind", TARGETS)
def test_zarr_holds_the_same_rows_as_parquet(setup, kind) -> None:
    root, tag = setup[0], kind.get("targets", "topk")
    run_precompute(_cfg(setup, f"pq-{tag}", shard_size=8, **kind))
    run_precompute(_cfg(setup, f"zarr-{tag}", shard_size=8, format="zarr", **kind))
    assert (root / f"zarr-{tag}" / "shard-000000.zarr").is_dir()
    a, b = TeacherDataset.open(str(root / f"pq-{tag}")), TeacherDataset.open(str(root / f"zarr-{tag}"))
    ra, rb = a.read_columns(np.arange(WINDOWS)), b.read_columns(np.arange(WINDOWS))
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)


def test_backend_selection_and_options_are_checked(setup) -> None:
    import importlib.util

    from common.errors import ConfigError
    from teachers.backends import create_backend
    from teachers.config import TeacherConfig
    from teachers.errors import TeacherLoadError

    teacher = str(setup[1])
    with pytest.raises(ConfigError, match="no backend options"):
        create_backend(TeacherConfig(path=teacher, device="cpu", backend_options={"x": 1}), seq_len=32)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(TeacherLoadError, match="vllm"):
            create_backend(TeacherConfig(path=teacher, backend="vllm"), seq_len=32)
    with pytest.raises(ConfigError, match="out of range"):
        create_backend(TeacherConfig(path=teacher, device="cpu", pool_layers=[5]), seq_len=32)


def test_cli_maps_options_onto_the_config(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import teachers.precompute
    from cli import main

    seen = {}

    def fake_run(cfg: PrecomputeConfig, **kw):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(teachers.precompute, "run_precompute", fake_run)
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "allenai/c4", "--dataset-config", "en",
                                  "--output", "o", "--pool-layers", "0,-2", "--top-k", "5", "--temperature", "2",
                                  "--backend", "vllm", "--backend-option", "tensor_parallel_size=2", "--num-slices", "3",
                                  "--slice-index", "1", "--format", "zarr", "--batch-tokens", "4096",
                                  "--compile-head", "on"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert cfg.teacher.pool_layers == [0, -2] and cfg.teacher.top_k == 5 and cfg.teacher.temperature == 2.0
    assert cfg.teacher.backend_options == VllmOptions(tensor_parallel_size=2)
    assert (cfg.num_slices, cfg.slice_index, cfg.storage.format) == (3, 1, "zarr")
    assert cfg.corpus.dataset_config == "en" and cfg.batch_size == 2 and cfg.teacher.compile_head == "on"
    assert cfg.storage.logprob_mantissa_bits is None and cfg.storage.manifest_mantissa_bits is None  # exact

    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--logprob-dtype", "float32", "--logprob-bits", "12"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].storage.manifest_mantissa_bits == 12
    assert seen["cfg"].teacher.targets == "topk" and seen["cfg"].slots == 64
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--targets", "sampled", "--samples", "24"])
    assert r.exit_code == 0, r.output
    assert (seen["cfg"].teacher.targets, seen["cfg"].teacher.samples, seen["cfg"].slots) == ("sampled", 24, 24)
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--targets", "sampled", "--backend", "vllm"])
    assert r.exit_code == 2 and "error: targets 'sampled' needs the full softmax" in r.output
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--targets", "sampled", "--samples", "70000"])
    assert r.exit_code == 2 and "samples must be at most 65535" in r.output
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--logprob-bits", "10"])
    assert r.exit_code == 0 and seen["cfg"].storage.manifest_mantissa_bits is None  # float16's all: exact
    r = CliRunner().invoke(main, ["precompute", "--teacher", "t", "--dataset", "d.jsonl", "--output", "o",
                                  "--logprob-bits", "12"])
    assert r.exit_code == 2 and "logprob_mantissa_bits must be in 1..10 for float16, got 12" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_compiled_head_stores_the_same_targets(setup) -> None:
    eager = run_precompute(_cfg(setup, "head-eager", top_k=8))
    cfg = _cfg(setup, "head-compiled", top_k=8)
    cfg.teacher.compile_head = "on"
    compiled = run_precompute(cfg)
    assert eager.notes["backend"]["head_lse_entropy"] == "eager"  # auto on CPU
    assert compiled.notes["backend"]["head_lse_entropy"] == "torch.compile"
    a = TeacherDataset.open(str(setup[0] / "head-eager")).read_columns(np.arange(WINDOWS))
    b = TeacherDataset.open(str(setup[0] / "head-compiled")).read_columns(np.arange(WINDOWS))
    np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
    # float16 storage: the float32 differences (~1e-6) flip at most the last bit of a stored value
    np.testing.assert_allclose(a["topk_logprobs"].astype(np.float32), b["topk_logprobs"].astype(np.float32),
                               rtol=2.0 ** -10, atol=1e-5)
    np.testing.assert_allclose(a["entropy"], b["entropy"], rtol=1e-5, atol=1e-6)


def test_a_failing_compile_names_the_way_out(setup, monkeypatch) -> None:
    import torch._dynamo.exc

    import teachers.head
    from teachers.errors import TeacherLoadError

    def broken():
        def fail(z):
            raise torch._dynamo.exc.TorchDynamoException("no backend for this device\nlong trace")
        return fail

    monkeypatch.setattr(teachers.head, "_compiled_lse_entropy", broken)
    cfg = _cfg(setup, "head-broken", top_k=8)
    cfg.teacher.compile_head = "on"
    with pytest.raises(TeacherLoadError, match=r"torch.compile of the targets head failed on cpu "
                                               r"\(TorchDynamoException: no backend for this device\); "
                                               r"rerun with --compile-head off"):
        run_precompute(cfg)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(shard_size=0), "shard_size"),
    (dict(logprob_mantissa_bits=11), r"logprob_mantissa_bits must be in 1\.\.10 for float16, got 11"),
    (dict(logprob_dtype="float32", logprob_mantissa_bits=24), r"1\.\.23 for float32"),
    (dict(format="hdf5"), "format"),
])
def test_storage_config_refuses_bad_values(kwargs, message) -> None:
    from common.errors import ConfigError
    from teachers.config import StorageConfig

    with pytest.raises(ConfigError, match=message):
        StorageConfig(output="o", **kwargs)
