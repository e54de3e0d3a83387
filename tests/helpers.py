"""Shared test fixtures: tiny tokenizers, tiny random teachers, small corpora.

Everything is built locally in a few seconds (no hub access):

    texts = sample_texts(200, seed=0)
    tok_dir = train_tiny_tokenizer(tmp / "tok", texts, vocab_size=512)
    teacher = make_tiny_teacher(tmp / "teacher", 512, seed=1, tokenizer_dir=tok_dir)
    corpus = write_jsonl_corpus(tmp / "corpus.jsonl", texts)

A teacher directory made this way holds the model and its tokenizer, so `--teacher DIR` is enough.
Teachers built with the same tokenizer share its fingerprint and can be joined in stage two.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_WORDS = (
    "the a of and to in is was for on that with as by at from it be this which are or his her they an "
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education good new first last long great little own other old right big high different small large "
    "next early young important few public bad same able said made went took came saw knew found gave told "
    "became left felt brought began kept held stood heard let meant set met ran paid sat spoke lay led read"
).split()


def sample_texts(n: int, seed: int = 0, *, min_words: int = 8, max_words: int = 60) -> list[str]:
    """`n` deterministic pseudo-English documents (one to a few sentences each)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))]
        sentences, start = [], 0
        while start < len(words):
            stop = min(len(words), start + rng.randint(5, 15))
            chunk = words[start:stop]
            sentences.append(" ".join(chunk).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
            start = stop
        texts.append(" ".join(sentences))
    return texts


def train_tiny_tokenizer(directory: str | Path, texts: list[str], vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it (transformers format) in `directory`.

    Special tokens: `<|endoftext|>` (id 0, EOS and BOS) and `<|pad|>` (id 1). Byte-level, so any text
    tokenizes. Returns `directory`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
    )
    fast.save_pretrained(directory)
    return directory


def make_tiny_teacher(
    directory: str | Path,
    vocab: int = 512,
    seed: int = 0,
    *,
    tokenizer_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
) -> Path:
    """Save a random Llama-style causal LM (float32) in `directory`; returns `directory`.

    `vocab` is the model's vocab size (must be >= the tokenizer's). With `tokenizer_dir`, the tokenizer
    is copied next to the weights and EOS/BOS/PAD ids are set from it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = {}
    tok = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if len(tok) > vocab:
            raise ValueError(f"tokenizer has {len(tok)} tokens, more than vocab={vocab}")
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        **special,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives nearly uniform distributions; widen the logits so top-k and entropy are non-trivial.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(directory)
    if tok is not None:
        tok.save_pretrained(directory)
    return directory


def write_jsonl_corpus(path: str | Path, texts: list[str], *, field: str = "text") -> Path:
    """Write one JSON object per line (`{field: text}`); gzip-compressed when `path` ends in `.gz`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def make_tiny_setup(root: str | Path, *, n_docs: int = 200, vocab: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """Tokenizer + tiny teacher + jsonl corpus under `root`; returns (teacher_dir, corpus_path)."""
    root = Path(root)
    texts = sample_texts(n_docs, seed=seed)
    tok_dir = train_tiny_tokenizer(root / "tokenizer", texts, vocab_size=vocab)
    teacher = make_tiny_teacher(root / "teacher", vocab, seed=seed + 1, tokenizer_dir=tok_dir)
    corpus = write_jsonl_corpus(root / "corpus.jsonl", texts)
    return teacher, corpus


BOS_TOKEN_SP = "<bos>"
EOS_TOKEN_SP = "<eos>"
PAD_TOKEN_SP = "<pad>"

_EXTRA_WORDS = "naïve café résumé über señor 日本語 東京 Привет мир 🤗 ✓ Zürich façade coöperate".split()


def sample_texts_unicode(n: int, seed: int = 0) -> list[str]:
    """Like `sample_texts`, with accented, Cyrillic, CJK and emoji words, runs of spaces and blank lines
    mixed in (multi-byte characters and whitespace runs that two tokenizers split differently)."""
    rng = random.Random(seed + 1000)
    out = []
    for text in sample_texts(n, seed=seed):
        words = text.split(" ")
        for _ in range(rng.randint(1, 4)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_EXTRA_WORDS))
        if rng.random() < 0.5:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["\n\n", "\n  ", "   ", "\n"]))
        out.append(" ".join(words))
    return out


def train_sentencepiece_tokenizer(directory: str | Path, texts: list[str], vocab_size: int = 300,
                                  *, limit_alphabet: int = 60) -> Path:
    """A SentencePiece-style BPE tokenizer (spaces become `▁` inside tokens, `<0xNN>` byte fallback for
    characters outside its alphabet, `<bos>` added before every text), like Gemma's. Saved in `directory`.

    Specials: `<pad>` 0, `<eos>` 1, `<bos>` 2, then the 256 byte tokens. `limit_alphabet` keeps rare
    characters out of the vocab so that byte fallback is exercised.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN_SP, EOS_TOKEN_SP, BOS_TOKEN_SP],
                                  limit_alphabet=limit_alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(byte_tokens)  # ids after the trained vocab; the BPE model falls back to them
    model = json.loads(tok.to_str())
    vocab = model["model"]["vocab"]
    for t in byte_tokens:  # byte fallback looks the <0xNN> pieces up in the model's own vocab
        vocab.setdefault(t, tok.token_to_id(t))
    model["added_tokens"] = [a for a in model["added_tokens"] if a["content"] not in set(byte_tokens)]
    tok = Tokenizer.from_str(json.dumps(model))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN_SP} $A", pair=f"{BOS_TOKEN_SP} $A $B",
                                                       special_tokens=[(BOS_TOKEN_SP, 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN_SP, bos_token=BOS_TOKEN_SP,
                                   pad_token=PAD_TOKEN_SP)
    fast.save_pretrained(directory)
    return directory


def make_two_tokenizer_setup(root: str | Path, *, texts: list[str], s_vocab: int, t_vocab: int, t_seed: int,
                             s_seed: int | None = None, t_texts: list[str] | None = None) -> SimpleNamespace:
    """The setup of the aligned-cache tests under `root`: a student tokenizer S (byte-level BPE, `S/`) and a
    teacher tokenizer T (SentencePiece-style, `T/`, trained on `t_texts`, default `texts`), a tiny teacher on
    T (`teacher_t/`, seeded `t_seed`), one on S when `s_seed` is given (`teacher_s/`), and `texts` as
    `corpus.jsonl`. Returns their paths as attributes s_dir, t_dir, teacher_t, teacher_s (None without s_seed),
    corpus."""
    from transformers import AutoTokenizer

    root = Path(root)
    s_dir = train_tiny_tokenizer(root / "S", texts, vocab_size=s_vocab)
    t_dir = train_sentencepiece_tokenizer(root / "T", texts if t_texts is None else t_texts, vocab_size=t_vocab)
    teacher_t = make_tiny_teacher(root / "teacher_t", len(AutoTokenizer.from_pretrained(str(t_dir))), seed=t_seed,
                                  tokenizer_dir=t_dir)
    teacher_s = None if s_seed is None else make_tiny_teacher(root / "teacher_s", s_vocab, seed=s_seed,
                                                              tokenizer_dir=s_dir)
    return SimpleNamespace(s_dir=s_dir, t_dir=t_dir, teacher_t=teacher_t, teacher_s=teacher_s,
                           corpus=write_jsonl_corpus(root / "corpus.jsonl", texts))


def run_cli(*args):
    """`cli.py ARGS` through click's CliRunner (arguments turned into strings)."""
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, *needles: str, ignore: tuple[str, ...] = ()) -> str:
    """Asserts exit code 2 and a stderr of exactly one `error: ...` line holding every needle, no traceback.

    Lines containing any string in `ignore` (e.g. a progress bar transformers draws while loading) are not
    counted. Returns the error line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not any(i in line for i in ignore)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def load_script(relative: str, name: str | None = None):
    """A script of the repository that is not in a package (benchmarks/*.py, scripts/*.py), loaded as a module."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module
