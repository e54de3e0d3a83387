"""Stage two on conversations: CE and KD average over the loss mask only (against a float64 reference that
drops the unmasked positions), the loader folds the mask into the targets, the teachers' masks must agree,
and every metrics line says which positions it averages over."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from student.fusion import fuse_topk
from student.loss.objective import DistillLoss
from tests.chat_helpers import PLAIN_TEMPLATE, sample_conversations, write_chat_corpus
from tests.helpers import make_tiny_teacher, sample_texts, train_tiny_tokenizer

VOCAB, SEQ_LEN = 400, 128


def _reference(logits: torch.Tensor, input_ids: torch.Tensor, dense: list[torch.Tensor], alpha: torch.Tensor,
               loss_mask: torch.Tensor, ids: list[torch.Tensor]) -> tuple[float, float]:
    """float64, one position at a time, only where loss_mask is True: CE of the next token (t < L-1) and
    sum_k alpha_k KL_k of teacher k's coarse view (its top-k plus tail) against the student's."""
    b, seq_len, _ = logits.shape
    ce, kd, n_ce, n_kd = 0.0, 0.0, 0, 0
    for i in range(b):
        for t in range(seq_len):
            if not loss_mask[i, t]:
                continue  # dropped: neither the prompt nor padding counts
            logq = torch.log_softmax(logits[i, t].double(), -1)
            if t < seq_len - 1:
                ce -= float(logq[input_ids[i, t + 1]])
                n_ce += 1
            row = i * seq_len + t
            w = alpha[row].double() / alpha[row].double().sum()
            for k, p in enumerate(dense):
                top = ids[k][row].long()
                pk, qk = p[row][top], logq.exp()[top]
                tail_p, tail_q = 1 - pk.sum(), 1 - qk.sum()
                kd += float(w[k] * ((pk * (pk / qk).log()).sum() + tail_p * (tail_p / tail_q).log()))
            n_kd += 1
    return ce / n_ce, kd / n_kd


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_masked_ce_and_kd_equal_a_float64_reference_over_masked_positions(chunk_size):
    g = torch.Generator().manual_seed(0)
    b, seq_len, v, ks = 3, 9, 30, [5, 3]
    logits = torch.randn(b, seq_len, v, generator=g, dtype=torch.float64) * 2
    input_ids = torch.randint(0, v, (b, seq_len), generator=g)
    loss_mask = torch.rand(b, seq_len, generator=g) < 0.5
    loss_mask[:, -1] = False  # as packing makes it: the last position's next token is outside the window
    n = b * seq_len
    dense, ids, lps = [], [], []
    for k in ks:
        logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
        top = logp.topk(k, -1)
        dense.append(logp.exp())
        ids.append(top.indices.int())
        lps.append(top.values.float())
    alpha = torch.rand(n, len(ks), generator=g) + 0.1
    # what DistillDataset does with a conversation cache: no teacher has a target outside the mask
    valid = torch.ones(n, len(ks), dtype=torch.bool) & loss_mask.reshape(n, 1)
    fused = fuse_topk(ids, lps, alpha, valid)
    loss = DistillLoss(lambda_kd=0.5, chunk_size=chunk_size)
    if chunk_size is None:
        ce, kd = loss.logit_terms(logits.float(), input_ids, fused, train=False, loss_mask=loss_mask)
    else:
        weight = torch.randn(v, 16, generator=g, dtype=torch.float64)
        hidden = torch.randn(b, seq_len, 16, generator=g, dtype=torch.float64)
        logits = hidden @ weight.T
        ce, kd = loss.chunked_terms(hidden.float(), weight.float(), input_ids, fused, loss_mask)
    ref_ce, ref_kd = _reference(logits, input_ids, dense, alpha, loss_mask, ids)
    torch.testing.assert_close(float(ce), ref_ce, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(float(kd), ref_kd, rtol=2e-4, atol=2e-5)
    # the unmasked mean differs: the mask is really applied
    ce_all, _ = DistillLoss().logit_terms(logits.float(), input_ids, fused, train=False)
    assert abs(float(ce_all) - ref_ce) > 1e-3


@pytest.fixture(scope="module")
def chat_caches(tmp_path_factory) -> dict:
    """Two tiny teachers' caches of the same conversations (shared tokenizer, our own template)."""
    from common.corpus import CorpusConfig
    from teachers.config import PrecomputeConfig, StorageConfig, TeacherConfig
    from teachers.precompute import run_precompute

    root = tmp_path_factory.mktemp("chat_train")
    tok = train_tiny_tokenizer(root / "tok", sample_texts(200), vocab_size=VOCAB)
    corpus = write_chat_corpus(root / "chat.jsonl", sample_conversations(120, seed=7, max_words=8))
    template = root / "template.jinja"
    template.write_text(PLAIN_TEMPLATE, encoding="utf-8")
    caches = []
    for i, k in enumerate((8, 12)):
        teacher = make_tiny_teacher(root / f"teacher{i}", VOCAB, seed=20 + i, tokenizer_dir=tok)
        out = root / f"cache{i}"
        run_precompute(PrecomputeConfig(
            corpus=CorpusConfig(dataset=str(corpus), corpus_format="chat", chat_template=str(template)),
            teacher=TeacherConfig(path=str(teacher), name=f"t{i}", batch_size=8, top_k=k, device="cpu",
                                  pool_layers=[-1]),
            storage=StorageConfig(output=str(out), shard_size=16), seq_len=SEQ_LEN, num_slices=1, slice_index=0,
            progress=False))
        caches.append(str(out))
    return {"root": root, "tok": str(tok), "caches": caches}


def test_loader_folds_the_mask_into_targets_and_ce(chat_caches):
    from student.data import DistillDataset, join_teachers

    teachers = join_teachers(chat_caches["caches"])
    ds = DistillDataset(teachers, np.arange(len(teachers[0])), weighting="uniform")
    batch = ds.__getitems__([0, 1, 2])
    mask = teachers[0].read_columns(np.arange(3), ["loss_mask"])["loss_mask"] != 0
    np.testing.assert_array_equal(batch.loss_mask.numpy(), mask)
    np.testing.assert_array_equal(batch.fused.has_target.numpy(), mask.reshape(-1))


def test_teachers_whose_masks_differ_are_refused(chat_caches, tmp_path):
    """A cache whose loss_mask column was changed (its manifest entry still equal) is caught on join."""
    import shutil

    from storage.errors import MismatchError
    from student.data import DistillDataset, join_teachers

    bad = tmp_path / "bad"
    shutil.copytree(chat_caches["caches"][1], bad)
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((bad / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = bad / shard["file"]
        table = pq.read_table(path)
        meta = pq.ParquetFile(path).schema_arrow.metadata
        col = table.column("loss_mask").combine_chunks()
        values = col.flatten().to_numpy().copy()
        values[:] = 1 - values
        field = table.schema.field("loss_mask")
        table = table.set_column(table.schema.get_field_index("loss_mask"), field,
                                 pa.FixedSizeListArray.from_arrays(pa.array(values), type=col.type))
        pq.write_table(table.replace_schema_metadata(meta), path)
        shard["bytes"], shard["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for stamp in bad.glob("verified-*.json"):
        stamp.unlink()
    with pytest.raises(MismatchError, match="'loss_mask' at seq id"):
        join_teachers([chat_caches["caches"][0], str(bad)])
    teachers = join_teachers([chat_caches["caches"][0], str(bad)], spot_check=0)
    batch = DistillDataset(teachers, np.arange(2), weighting="uniform").__getitems__([0, 1])
    with pytest.raises(MismatchError, match="'loss_mask'"):
        batch.check()


def test_training_on_conversations_reports_masked_metrics(chat_caches, tmp_path):
    from student.config import OptimConfig, TrainConfig
    from student.data import LOSS_MASK_POSITIONS
    from student.trainer import Trainer, run_train

    cfg = TrainConfig(teacher_data=chat_caches["caches"], output=str(tmp_path / "run"), student="tiny",
                      tokenizer=chat_caches["tok"], batch_size=4, max_steps=3, eval_sequences=4, eval_every=3,
                      log_every=1, num_workers=0, optim=OptimConfig(lr=1e-3, warmup_steps=1))
    run_train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(m["positions"] == LOSS_MASK_POSITIONS for m in lines)
    assert {m["split"] for m in lines} == {"train", "eval"}

    # the saved student answers through the chat template its conversations were rendered with
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "final"
    tok, model = AutoTokenizer.from_pretrained(str(final)), AutoModelForCausalLM.from_pretrained(str(final))
    assert tok.chat_template == PLAIN_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "Where is the school?"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    assert tok.decode(prompt["input_ids"][0]).endswith("### assistant:\n")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4

    # held-out CE is the float64 mean over masked positions of the student's next-token NLL
    from dataclasses import replace

    trainer = Trainer(replace(cfg, output=str(tmp_path / "again")))
    try:
        trainer.setup()
        got = trainer.evaluate()
        nll, count = 0.0, 0
        for batch in trainer.eval_loader:
            with torch.no_grad():
                logits = trainer.module.student(input_ids=batch.input_ids).logits.double()
            logq = torch.log_softmax(logits, -1)
            nxt = logq[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
            m = batch.loss_mask[:, :-1]
            nll -= float(nxt[m].sum())
            count += int(m.sum())
        assert count > 0
        assert got["eval_ce"] == pytest.approx(nll / count, rel=1e-5)
    finally:
        trainer.close()


def test_evaluate_on_conversation_caches_scores_assistant_positions_only(chat_caches, tmp_path):
    """evaluate on held-out conversation caches: perplexity is exp of the float64 mean NLL over the masked
    positions, every table line and comparison says so, and the teachers' targets exist only there."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from cli import main
    from storage.reader import TeacherDataset
    from student.config import OptimConfig, TrainConfig
    from student.data import LOSS_MASK_POSITIONS
    from student.trainer import run_train

    runs = []
    for i, lam in enumerate((0.5, 0.0)):
        cfg = TrainConfig(teacher_data=chat_caches["caches"], output=str(tmp_path / f"run{i}"), student="tiny",
                          tokenizer=chat_caches["tok"], batch_size=4, max_steps=2, eval_sequences=4, eval_every=0,
                          log_every=1, num_workers=0, optim=OptimConfig(lr=1e-3, warmup_steps=1))
        cfg.loss.lambda_kd = lam
        run_train(cfg)
        runs.append(tmp_path / f"run{i}" / "final")
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["evaluate", "--student", f"kd={runs[0]}", "--student", f"ce={runs[1]}",
                                  *[x for c in chat_caches["caches"] for x in ("--teacher-data", c)],
                                  "--bleu-prompts", "0", "--bootstrap", "50", "--device", "cpu", "--output", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["positions"] == LOSS_MASK_POSITIONS
    assert f"Every figure averages over {LOSS_MASK_POSITIONS}" in r.output
    assert LOSS_MASK_POSITIONS in [x for x in r.output.splitlines() if x.startswith("kd - ce")][0]

    ds = TeacherDataset.open(chat_caches["caches"][0])
    cols = ds.read_columns(np.arange(len(ds)), ["input_ids", "loss_mask"])
    ids, mask = torch.from_numpy(cols["input_ids"].astype(np.int64)), torch.from_numpy(cols["loss_mask"] != 0)
    model = AutoModelForCausalLM.from_pretrained(str(runs[0])).eval()
    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    nll = -logq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)[mask[:, :-1]]
    kd = res["models"]["kd"]
    assert kd["tokens_scored"] == int(mask[:, :-1].sum()) < ids[:, 1:].numel()
    assert kd["perplexity"] == pytest.approx(float(nll.mean().exp()), rel=1e-4)
    assert kd["positions_with_target"] == int(mask.sum())

    # the held-out conversations themselves (no cache): packed and masked as precompute did, the same figures
    root = chat_caches["root"]
    r = CliRunner().invoke(main, ["evaluate", "--student", f"kd={runs[0]}", "--dataset", str(root / "chat.jsonl"),
                                  "--corpus-format", "chat", "--chat-template", str(root / "template.jinja"),
                                  "--seq-len", str(SEQ_LEN), "--bleu-prompts", "0", "--device", "cpu",
                                  "--output", str(tmp_path / "text.json")])
    assert r.exit_code == 0, r.output
    text = json.loads((tmp_path / "text.json").read_text())
    assert text["positions"] == LOSS_MASK_POSITIONS and text["windows"] == len(ds)
    assert text["models"]["kd"]["tokens_scored"] == kd["tokens_scored"]
    assert text["models"]["kd"]["perplexity"] == pytest.approx(kd["perplexity"], rel=1e-6)
