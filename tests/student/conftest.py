"""Stage-one caches of two tiny random teachers, built once per test session (a few seconds)."""

from __future__ import annotations

import pytest

from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer, write_jsonl_corpus

VOCAB = 512
SEQ_LEN = 32


@pytest.fixture(scope="session")
def stage_one(tmp_path_factory) -> dict:
    """Tokenizer, corpus and the caches of two tiny teachers (top-k 8 and 16, pooled last block)."""
    import torch

    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stage_one")
    texts = sample_texts(400, seed=0)
    tok = train_tiny_tokenizer(root / "tokenizer", texts, vocab_size=VOCAB)
    corpus = write_jsonl_corpus(root / "corpus.jsonl", texts)
    caches = []
    for i, k in enumerate((8, 16)):
        teacher = make_tiny_teacher(root / f"teacher{i}", VOCAB, seed=10 + i, tokenizer_dir=tok)
        out = root / f"cache{i}"
        run_precompute(PrecomputeConfig(
            corpus=CorpusConfig(dataset=str(corpus)),
            teacher=TeacherConfig(path=str(teacher), name=f"t{i}", batch_size=8, top_k=k, head_chunk_size=256,
                                  device="cpu", pool_layers=[-1]),
            storage=StorageConfig(output=str(out), shard_size=32),
            seq_len=SEQ_LEN, num_slices=1, slice_index=0, progress=False))
        caches.append(str(out))
    torch.set_num_threads(threads)
    return {"tokenizer": str(tok), "caches": caches, "root": root}


@pytest.fixture(scope="session")
def sampled_cache(stage_one) -> str:
    """A sampled cache (N = 8 draws per position) of stage_one's first teacher, over the same corpus."""
    import torch

    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = stage_one["root"]
    out = root / "cache-sampled"
    run_precompute(PrecomputeConfig(
        corpus=CorpusConfig(dataset=str(root / "corpus.jsonl")),
        teacher=TeacherConfig(path=str(root / "teacher0"), name="t0-sampled", batch_size=8, targets="sampled",
                              samples=8, head_chunk_size=256, device="cpu", pool_layers=[-1]),
        storage=StorageConfig(output=str(out), shard_size=32),
        seq_len=SEQ_LEN, num_slices=1, slice_index=0, progress=False))
    torch.set_num_threads(threads)
    return str(out)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and far faster when the 2 CI cores are shared; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
