"""`evaluate` on tiny random models: every metric against an independent float64 computation."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from common.errors import ConfigError
from student.evaluation import EvalConfig, bleu, format_table, greedy_continuations, run_evaluate
from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer, write_jsonl_corpus

VOCAB = 384
SEQ_LEN = 48


def make_setup(root: Path) -> tuple[Path, dict[str, Path], Path]:
    """A tokenizer, three tiny models sharing it (student, t1, t2) and a held-out corpus under `root`."""
    texts = sample_texts(120, seed=3)
    tok = train_tiny_tokenizer(root / "tok", texts, vocab_size=VOCAB)
    models = {
        name: make_tiny_teacher(root / name, VOCAB, seed=seed, tokenizer_dir=tok, hidden_size=32)
        for name, seed in (("student", 1), ("t1", 2), ("t2", 3))
    }
    held_out = write_jsonl_corpus(root / "held_out.jsonl", sample_texts(30, seed=9))
    return root, models, held_out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("eval"))


def _windows(model_dir: Path, corpus: Path) -> torch.Tensor:
    """Independent packing: each document's tokens then EOS, one stream, cut into SEQ_LEN windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream = []
    for line in corpus.read_text().splitlines():
        stream += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // SEQ_LEN
    return torch.tensor(stream[: n * SEQ_LEN]).reshape(n, SEQ_LEN)


def _logp64(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)  # [S, L, V] float64


def _cfg(setup, **kw) -> EvalConfig:
    _, models, held_out = setup
    # top_k = vocab: a live teacher's kept target is its whole distribution, so its KL is the full KL
    # the references below use the paper's entropy weights (the default, min-ce-seq, is checked against
    # training's targets for every scheme in tests/student/test_targets.py)
    base = dict(students=[f"s={models['student']}"], data=str(held_out), seq_len=SEQ_LEN, bleu_prompts=0,
                top_k=VOCAB, teacher_weighting="entropy")
    return EvalConfig(**{**base, **kw})


def test_perplexity_equals_exp_of_mean_ce(setup):
    _, models, held_out = setup
    res = run_evaluate(_cfg(setup))
    ids = _windows(models["student"], held_out)
    logp = _logp64(models["student"], ids)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert res["models"]["s"]["tokens_scored"] == ids[:, 1:].numel()
    torch.testing.assert_close(
        torch.tensor(res["models"]["s"]["perplexity"], dtype=torch.float64), ce.exp(), rtol=1e-5, atol=0
    )


def test_kl_of_a_model_to_itself_is_zero_and_bleu_is_100(setup):
    _, models, _ = setup
    res = run_evaluate(
        _cfg(setup, teachers=[f"self={models['student']}"], bleu_prompts=4, prompt_tokens=8, new_tokens=8)
    )
    m = res["models"]["s"]
    assert m["kl"]["self"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_fused"] == pytest.approx(0.0, abs=1e-5)
    assert m["top1_agreement"] == 1.0
    assert m["bleu"]["teachers"] == pytest.approx(100.0)
    assert res["models"]["self"]["perplexity"] == pytest.approx(m["perplexity"], rel=1e-6)


def test_bleu_of_identical_texts_is_100_and_of_disjoint_texts_is_0():
    hyps = ["the cat sat on the mat today", "a quick brown fox jumps over it"]
    assert bleu(hyps, [hyps]) == pytest.approx(100.0)
    assert bleu(hyps, [["zz yy xx ww vv uu tt", "qq pp oo nn mm ll kk"]]) == pytest.approx(0.0)


def test_full_kl_and_agreement_match_float64_reference_with_entropy_weights(setup):
    _, models, held_out = setup
    res = run_evaluate(_cfg(setup, teachers=[str(models["t1"]), str(models["t2"])]))
    ids = _windows(models["student"], held_out)
    q = _logp64(models["student"], ids).reshape(-1, VOCAB)
    ps = [_logp64(models[t], ids).reshape(-1, VOCAB) for t in ("t1", "t2")]
    kls = [(p.exp() * (p - q)).sum(-1).mean() for p in ps]
    inv = torch.stack([1.0 / (-(p.exp() * p).sum(-1) + 1e-3) for p in ps], dim=1)  # entropy weights, eps 1e-3
    alpha = inv / inv.sum(1, keepdim=True)
    fused = alpha[:, :1] * ps[0].exp() + alpha[:, 1:] * ps[1].exp()
    # KL fused is the training KD quantity, sum_k alpha_k KL(P_Tk || P_S) per position: the KL to the
    # mixture plus the teachers' weighted Jensen-Shannon divergence H(mixture) - sum_k alpha_k H_k
    per_teacher = [(p.exp() * (p - q)).sum(-1) for p in ps]
    kl_fused = (alpha[:, 0] * per_teacher[0] + alpha[:, 1] * per_teacher[1]).mean()
    jsd = -torch.xlogy(fused, fused).sum(-1) - sum(alpha[:, i] * -(p.exp() * p).sum(-1) for i, p in enumerate(ps))
    torch.testing.assert_close(kl_fused, ((fused * (fused.log() - q)).sum(-1) + jsd).mean())
    agree = (q.argmax(-1) == fused.argmax(-1)).double().mean()
    m = res["models"]["s"]
    got = torch.tensor(
        [m["kl"]["t1"], m["kl"]["t2"], m["kl_fused"], m["top1_agreement"]], dtype=torch.float64
    )
    torch.testing.assert_close(got, torch.stack([*kls, kl_fused, agree]), rtol=1e-4, atol=1e-6)
    assert "KL fused" in format_table(res) and "| s (student) |" in format_table(res)


def test_greedy_continuation_with_kv_cache_equals_recomputing_from_scratch(setup):
    from transformers import AutoModelForCausalLM

    _, models, held_out = setup
    model = AutoModelForCausalLM.from_pretrained(str(models["t1"]), dtype=torch.float32).eval()
    prompts = _windows(models["student"], held_out)[:3, :10]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = greedy_continuations(model, prompts, 6)
    # the KV cache is passed under the name the installed transformers expects (no deprecation warning)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    seq = prompts.clone()
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 10:])


def _write_full_cache(out: Path, teacher: Path, ids: torch.Tensor, tok_dir: Path, **manifest: object) -> None:
    """A cache with k = vocab (so the top-k + tail KL is the full KL), written by the storage writer."""
    from transformers import AutoTokenizer

    from common.tokenizer import tokenizer_fingerprint
    from storage.manifest import Manifest, TeacherInfo
    from storage.records import TeacherTargets
    from storage.writer import TargetsWriter

    logp = _logp64(teacher, ids).float()  # [S, L, V]
    top = logp.sort(dim=-1, descending=True)
    header = Manifest(
        teacher=TeacherInfo(name=teacher.name, path=str(teacher)),
        logprob_dtype="float32",
        tokenizer_fingerprint=tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tok_dir))),
        vocab_size=VOCAB,
        seq_len=SEQ_LEN,
        top_k=VOCAB,
        corpus_fingerprint="held-out",
        shard_size=1000,
        **manifest,
    )
    targets = TeacherTargets(
        seq_ids=np.arange(len(ids), dtype=np.int64),
        input_ids=ids.numpy().astype(np.int32),
        topk_ids=top.indices.numpy().astype(np.int32),
        topk_logprobs=top.values.numpy(),
        entropy=(-(logp.exp() * logp).sum(-1)).numpy().astype(np.float32),
    )
    with TargetsWriter(str(out), header, background=False) as w:
        w.write_shard(0, targets)


def test_cache_mode_with_full_topk_agrees_with_teacher_models(setup, tmp_path):
    pytest.importorskip("storage.reader")
    _, models, held_out = setup
    ids = _windows(models["student"], held_out)
    for t in ("t1", "t2"):
        _write_full_cache(tmp_path / t, models[t], ids, models["student"])
    from_models = run_evaluate(_cfg(setup, teachers=[str(models["t1"]), str(models["t2"])]))
    from_caches = run_evaluate(
        _cfg(setup, data=None, teacher_data=[str(tmp_path / "t1"), str(tmp_path / "t2")])
    )
    assert from_caches["kl_kind"] == "topk+tail"
    a, b = from_models["models"]["s"], from_caches["models"]["s"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
    for t in ("t1", "t2"):
        assert b["kl"][t] == pytest.approx(a["kl"][t], rel=1e-3, abs=1e-5)
    assert b["kl_fused"] == pytest.approx(a["kl_fused"], rel=1e-3, abs=1e-5)
    assert b["top1_agreement"] == pytest.approx(a["top1_agreement"], abs=0.01)


def test_config_refuses_both_or_neither_source(setup):
    with pytest.raises(ConfigError, match="exactly one"):
        _cfg(setup, teacher_data=["somewhere"])
    with pytest.raises(ConfigError, match="exactly one"):
        _cfg(setup, data=None)
    with pytest.raises(ConfigError, match="one weight per teacher"):
        _cfg(setup, teachers=["a", "b"], teacher_weighting="fixed", teacher_weights=[1.0])


def test_cli_prints_table_writes_json_and_reports_user_errors_in_one_line(setup, tmp_path):
    from cli import main

    _, models, held_out = setup
    out = tmp_path / "eval.json"
    args = [
        "evaluate",
        "--student",
        str(models["student"]),
        "--data",
        str(held_out),
        "--seq-len",
        str(SEQ_LEN),
        "--teacher",
        str(models["t1"]),
        "--bleu-prompts",
        "2",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "8",
        "--output",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "| student (student) |" in r.output and "| t1 (teacher) |" in r.output
    saved = json.loads(out.read_text())
    assert math.isfinite(saved["models"]["student"]["kl"]["t1"])
    # the window length is checked against the models' positions before the corpus is read
    _one_error_line(_evaluate(setup, "--seq-len", "100000"), "max_position_embeddings 1024 < seq_len 100000")
    _one_error_line(_evaluate(setup, "--seq-len", "1024", "--max-tokens", "1000"), "fewer than seq_len=1024")


def _evaluate(setup, *extra: str):
    from cli import main

    _, models, held_out = setup
    return CliRunner().invoke(main, ["evaluate", "--student", str(models["student"]), "--data", str(held_out),
                                     "--seq-len", str(SEQ_LEN), "--bleu-prompts", "0", *extra])


def _one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, (result.output, result.exception)
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.output


def test_cli_refuses_non_finite_weights_bad_devices_and_outputs(setup, tmp_path):
    _, models, _ = setup
    _one_error_line(_evaluate(setup, "--teacher", str(models["t1"]), "--teacher", str(models["t2"]),
                              "--teacher-weighting", "fixed", "--teacher-weights", "nan,1"), "'nan'", "finite")
    _one_error_line(_evaluate(setup, "--teacher", str(models["t1"]), "--teacher", str(models["t2"]),
                              "--teacher-weighting", "fixed", "--teacher-weights", "-1,2"), "--teacher-weights")
    _one_error_line(_evaluate(setup, "--device", "bogus"), "--device", "bogus")
    if not torch.cuda.is_available():
        _one_error_line(_evaluate(setup, "--device", "cuda:0"), "CUDA is not available")
    _one_error_line(_evaluate(setup, "--output", str(tmp_path)), "is a directory")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _one_error_line(_evaluate(setup, "--output", str(blocker / "res.json")), "cannot be written")


def test_cli_refuses_windows_longer_than_the_model_positions(setup, tmp_path):
    import shutil

    _, models, held_out = setup
    short = tmp_path / "short"
    shutil.copytree(models["student"], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = SEQ_LEN - 8
    (short / "config.json").write_text(json.dumps(config))
    from cli import main

    r = CliRunner().invoke(main, ["evaluate", "--student", str(short), "--data", str(held_out),
                                  "--seq-len", str(SEQ_LEN), "--bleu-prompts", "0"])
    _one_error_line(r, f"max_position_embeddings {SEQ_LEN - 8} < seq_len {SEQ_LEN}", "--seq-len")


def test_per_window_values_teacher_kl_and_paired_bootstrap(setup):
    """Per-window NLL / KL against float64, each teacher's KL to the fused target, and the comparison."""
    from student.evaluation import format_comparisons
    from student.fusion import teacher_weights
    from student.stats import paired_bootstrap, perplexity_of_means

    _, models, held_out = setup
    res = run_evaluate(_cfg(setup, students=[f"a={models['student']}", f"b={models['t1']}"],
                            teachers=[f"t1={models['t1']}", f"t2={models['t2']}"], bootstrap=300, seed=5,
                            bleu_prompts=2, prompt_tokens=8, new_tokens=4))
    ids = _windows(models["student"], held_out)
    logp = {name: _logp64(models[name], ids) for name in ("student", "t1", "t2")}
    nll = {name: -lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(dim=1) for name, lp in logp.items()}
    ent = torch.stack([-(lp.exp() * lp).sum(-1).reshape(-1) for lp in (logp["t1"], logp["t2"])], dim=1)
    alpha = teacher_weights(ent, "entropy", None)
    a1, a2 = alpha[:, 0].reshape(ids.shape), alpha[:, 1].reshape(ids.shape)

    def kl_to(p, q):  # KL(P || Q) per position from log-probs [S, L, V]
        return (p.exp() * (p - q)).sum(-1)

    # KL fused is sum_k alpha_k KL(P_Tk || model), per window (a teacher's own term is 0)
    kl = {name: (a1 * kl_to(logp["t1"], logp[name]) + a2 * kl_to(logp["t2"], logp[name])).mean(dim=1)
          for name in ("student", "t1")}
    a, b, t1, t2 = (res["models"][k] for k in ("a", "b", "t1", "t2"))
    for got, want in ((a["window_nll"], nll["student"]), (b["window_nll"], nll["t1"]), (t2["window_nll"], nll["t2"]),
                      (t1["window_nll"], nll["t1"]), (a["window_kl_fused"], kl["student"]),
                      (b["window_kl_fused"], kl["t1"])):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=2e-4, atol=1e-5)
    # a teacher is scored alone (one model resident): its KL to the other teachers is not computed
    assert "kl_fused" not in t1 and "window_kl_fused" not in t1
    assert a["perplexity"] == pytest.approx(math.exp(np.mean(a["window_nll"])), rel=1e-5)
    (c,) = res["comparisons"]
    assert (c["a"], c["b"], c["windows"], c["replicates"]) == ("a", "b", ids.shape[0], 300)
    ref = paired_bootstrap(a["window_nll"], b["window_nll"], n=300, seed=5, stat=perplexity_of_means)
    assert c["perplexity"] == {"difference": ref.estimate, "low": ref.low, "high": ref.high,
                               "excludes_zero": ref.excludes_zero()}
    assert c["perplexity"]["difference"] == pytest.approx(a["perplexity"] - b["perplexity"], rel=1e-5)
    assert c["kl_fused"]["low"] <= c["kl_fused"]["difference"] <= c["kl_fused"]["high"]
    assert format_comparisons(res).startswith("a - b: perplexity ")
    conts = res["continuations"]
    assert len(conts["prompts"]) == 2 and set(conts) == {"prompts", "reference", "a", "b", "t1", "t2"}


def _no_weights_load(monkeypatch) -> None:
    """Makes any model weights load fail the test: the checks below must refuse before that."""
    import student.evaluation.run as run_mod

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(run_mod, "load_model", load_model)


@pytest.mark.parametrize("n_students", [1, 2])
def test_negative_or_huge_seed_is_refused_before_any_model_loads(setup, monkeypatch, n_students):
    """A negative bootstrap seed used to score every model and then fail inside numpy (two students), or pass
    unnoticed (one student, no bootstrap)."""
    _, models, _ = setup
    _no_weights_load(monkeypatch)
    second = ["--student", f"s2={models['t1']}"] if n_students == 2 else []
    _one_error_line(_evaluate(setup, *second, "--seed", "-1"), "--seed", "-1")
    _one_error_line(_evaluate(setup, *second, "--seed", str(2**63)), "--seed")
    with pytest.raises(ConfigError, match="seed"):
        _cfg(setup, seed=-1)


def test_tokenizer_larger_than_a_models_vocab_is_refused_before_any_model_loads(setup, tmp_path, monkeypatch):
    """A --tokenizer with more tokens than the student's vocab gave ids past its embeddings (IndexError)."""
    _, models, _ = setup
    big = train_tiny_tokenizer(tmp_path / "big", sample_texts(300, seed=4), vocab_size=2 * VOCAB)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(big))) > VOCAB
    _no_weights_load(monkeypatch)
    _one_error_line(_evaluate(setup, "--tokenizer", str(big)), "--tokenizer", f"vocab of {VOCAB}")
