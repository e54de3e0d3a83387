"""init-student: depth pruning of a tiny random Llama, Block Influence, and training the cut student."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from common.errors import ConfigError
from student.config import InitStudentConfig, parse_keep_layers
from student.pruning import run_init_student
from tests.helpers import make_tiny_teacher

BLOCKS = 6


@pytest.fixture(scope="module")
def teacher(stage_one, tmp_path_factory):
    """A 6-block random Llama (vocab 512, untied head) sharing the stage-one tokenizer."""
    root = tmp_path_factory.mktemp("prune")
    return make_tiny_teacher(root / "teacher6", 512, seed=3, tokenizer_dir=stage_one["tokenizer"],
                             num_layers=BLOCKS)


def _corpus(stage_one) -> str:
    return str(stage_one["root"] / "corpus.jsonl")


def _load(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()


def _manual_logits(teacher_dir, keep: list[int], ids: torch.Tensor) -> torch.Tensor:
    """float64 forward of the full teacher that runs only blocks `keep` (embedding, blocks, norm, head)."""
    model = _load(teacher_dir)
    inner = model.model
    L = ids.shape[1]
    h = inner.embed_tokens(ids)
    pos = torch.arange(L)[None]
    cos_sin = inner.rotary_emb(h, pos)
    mask = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        for i in keep:
            out = inner.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        return model.lm_head(inner.norm(h))


def test_parse_keep_layers():
    assert parse_keep_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_keep_layers("24-29, 0-5") == list(range(6)) + list(range(24, 30))
    assert parse_keep_layers("12") == 12
    assert parse_keep_layers("3-3") == [3]
    for bad in ("0", "a-b", "5-2", "1,,x", ""):
        with pytest.raises(ConfigError):
            parse_keep_layers(bad)
    with pytest.raises(ConfigError, match="--dataset is required"):
        InitStudentConfig(teacher="t", output="o", keep_layers="3")


def test_explicit_cut_loads_generates_and_equals_skipping_blocks(teacher, tmp_path):
    keep = [0, 2, 3, 5]
    out = tmp_path / "cut"
    card = run_init_student(InitStudentConfig(teacher=str(teacher), output=str(out), keep_layers="0,2-3,5"))
    assert card["kept_blocks"] == keep and card["dropped_blocks"] == [1, 4] and card["scores"] is None
    assert json.loads((out / "init_student.json").read_text())["kept_blocks"] == keep
    student = _load(out)
    assert student.config.num_hidden_layers == 4 and len(student.model.layers) == 4
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1, 2, 3]
    assert card["parameters_student"] == sum(p.numel() for p in student.parameters())
    assert card["parameters_teacher"] - card["parameters_student"] == 2 * sum(
        p.numel() for p in student.model.layers[0].parameters())

    ids = torch.randint(2, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, _manual_logits(teacher, keep, ids), rtol=1e-10, atol=1e-10)

    # generation with a KV cache equals greedy decoding by full re-forwards (cache slots renumbered)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = torch.tensor([tok("The man and the woman", add_special_tokens=False)["input_ids"]])
    gen = student.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                           pad_token_id=tok.pad_token_id)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            nxt = student(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


def test_count_keeps_highest_block_influence(stage_one, teacher, tmp_path):
    out = tmp_path / "bi"
    cfg = InitStudentConfig(teacher=str(teacher), output=str(out), keep_layers="3", dataset=_corpus(stage_one),
                            calibration_tokens=256, seq_len=32, batch_size=3)
    card = run_init_student(cfg)

    # independent BI: hidden_states of the float64 teacher with the final norm removed, so that
    # hidden_states[i] and hidden_states[i + 1] are block i's input and output for every block
    from common.tokenizer import load_tokenizer
    from student.block_influence import calibration_windows

    windows = calibration_windows(cfg, load_tokenizer(str(teacher)))
    assert windows.shape == (8, 32)
    model = copy.deepcopy(_load(teacher))
    model.model.norm = torch.nn.Identity()
    with torch.no_grad():
        hs = model(input_ids=windows, output_hidden_states=True).hidden_states
    ref = torch.stack([(1 - torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean()
                       for i in range(BLOCKS)])
    torch.testing.assert_close(torch.tensor(card["scores"], dtype=torch.float64), ref, rtol=1e-4, atol=1e-6)
    dropped = sorted(ref.argsort()[: BLOCKS - 3].tolist())
    assert card["dropped_blocks"] == dropped, (card["scores"], dropped)
    assert card["kept_blocks"] == sorted(set(range(BLOCKS)) - set(dropped))
    assert len(set(ref.tolist())) == BLOCKS  # distinct scores: the choice is not decided by tie-breaking
    assert _load(out).config.num_hidden_layers == 3


def test_cli_refuses_other_layouts_with_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cli import main

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    r = CliRunner().invoke(main, ["init-student", "--from", str(tmp_path / "gpt2"), "--keep-layers", "0-0",
                                  "--output", str(tmp_path / "o")])
    last = r.output.strip().splitlines()[-1]  # before it: transformers' loading progress bar
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert last.startswith("error: GPT2LMHeadModel has no model.model.layers"), r.output
    r = CliRunner().invoke(main, ["init-student", "--from", "x", "--keep-layers", "2", "--output", "o"])
    assert r.exit_code == 2 and "--dataset is required" in r.output


def test_freeze_options_freeze_exactly_those(teacher, tmp_path):
    from student.model import build_student, freeze

    untied = build_student(str(teacher), vocab_size=512, seq_len=32)
    assert freeze(untied, embeddings=True, lm_head=False) == ["model.embed_tokens.weight"]
    assert [n for n, p in untied.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]
    untied = build_student(str(teacher), vocab_size=512, seq_len=32)
    assert freeze(untied, embeddings=False, lm_head=True) == ["lm_head.weight"]
    tied = make_tiny_teacher(tmp_path / "tied", 512, seed=4, tie_word_embeddings=True)
    tied = build_student(str(tied), vocab_size=512, seq_len=32)
    assert sorted(freeze(tied, embeddings=True, lm_head=False)) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert not tied.get_output_embeddings().weight.requires_grad


def test_train_student_on_a_cut_teacher_with_frozen_embeddings(stage_one, teacher, tmp_path):
    from student.config import OptimConfig, TrainConfig
    from student.trainer import run_train

    cut = tmp_path / "cut"
    run_init_student(InitStudentConfig(teacher=str(teacher), output=str(cut), keep_layers="0-1,5"))
    before = _load(cut, torch.float32).state_dict()
    result = run_train(TrainConfig(
        teacher_data=stage_one["caches"], output=str(tmp_path / "run"), student=str(cut),
        tokenizer=stage_one["tokenizer"], batch_size=4, max_steps=4, eval_sequences=8, eval_every=0,
        log_every=2, num_workers=0, freeze_embeddings=True, optim=OptimConfig(lr=1e-2, warmup_steps=1)))
    assert result["eval_ppl"] > 0
    after = _load(tmp_path / "run" / "final", torch.float32).state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert "lm_head.weight" in changed and any(k.startswith("model.layers.2.") for k in changed)
    assert after.keys() == before.keys()
