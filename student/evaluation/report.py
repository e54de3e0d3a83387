"""`evaluate`'s results: the JSON record, the markdown table and the comparison lines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from storage.errors import StorageError
from student.evaluation.metrics import Scores

REPORT_CONFIG = "config"
"""The member of the JSON report holding the `EvalConfig` it was made with (`evaluate --config REPORT.json`
replays it)."""


def model_summary(s: Scores, role: str, teachers: list[str], bleu: dict[str, float] | None) -> dict[str, Any]:
    """One model's entry of `result["models"]`."""
    out: dict[str, Any] = {"role": role, "perplexity": math.exp(s.nll / s.count), "tokens_scored": s.count}
    if s.positions:
        out["kl"] = {t: s.kl[t] / max(s.kl_positions[t], 1) for t in teachers}
        out["top1_agreement"] = s.agree / s.positions
        # per teacher, the positions its KL averages over; an aligned cache's masked positions are not in it
        out["target_positions"] = {t: s.kl_positions[t] for t in teachers}
        out["positions_with_target"] = s.positions
        out["kl_fused"] = s.kl_fused / s.positions
    out["window_nll"] = s.window_nll
    if s.window_kl:
        out["window_kl_fused"] = s.window_kl
    if bleu is not None:
        out["bleu"] = bleu
    return out


def check_output_file(path: str) -> None:
    """Create the parent directory of the results file and check it can be written, before any work;
    ConfigError naming the path when it is a directory, under a file, or not writable."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name for the JSON results")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8"):
            pass
        if not existed:
            out.unlink()
    except OSError as e:
        raise ConfigError(f"--output {path} cannot be written: {e.strerror or e}") from None


def write_json(result: dict[str, Any], path: str) -> None:
    try:
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise StorageError(f"cannot write --output {path}: {e.strerror or e}") from e


def format_comparisons(result: dict[str, Any]) -> str:
    """One line per comparison: a - b with its 95% paired-bootstrap interval."""
    lines = []
    for c in result.get("comparisons", []):
        parts = [f"{name} {c[name]['difference']:+.3f} [{c[name]['low']:+.3f}, {c[name]['high']:+.3f}]"
                 for name in ("perplexity", "nll", "kl_fused") if name in c]
        over = f", {result['positions']}" if result.get("positions") else ""
        lines.append(f"{c['a']} - {c['b']}: " + ", ".join(parts) + f" (95% paired bootstrap over {c['windows']} "
                     f"windows, {c['replicates']} replicates{over})")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per model."""
    teachers = result["teachers"]
    header = ["model", "perplexity"]
    if result["kl_kind"]:
        header += ["KL fused", *[f"KL {t}" for t in teachers], "top-1 agree"]
    has_bleu = result["bleu_prompts"] > 0
    live = "models" in (result["teacher_source"] or "")  # the live teachers' own continuations exist
    if has_bleu:
        header += (["BLEU teachers"] if live else []) + ["BLEU text"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if result.get("positions"):  # conversations: say it before any number
        first = next(iter(result["models"].values()), {})
        lines.insert(0, f"Every figure averages over {result['positions']}: "
                        f"{first.get('tokens_scored', 0)} predicted tokens of {result['windows'] * result['seq_len']} "
                        "positions.")

    def f(x: float | None, nd: int = 3) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    for label, m in result["models"].items():
        row = [f"{label} ({m['role']})", f(m["perplexity"], 2)]
        if result["kl_kind"]:
            kl = m.get("kl", {})
            row += [f(m.get("kl_fused"))] + [f(kl.get(t)) for t in teachers] + [f(m.get("top1_agreement"))]
        if has_bleu:
            b = m.get("bleu", {})
            row += ([f(b.get("teachers"), 1)] if live else []) + [f(b.get("reference"), 1)]
        lines.append("| " + " | ".join(row) + " |")
    total = result["windows"] * result["seq_len"]
    for label, m in result["models"].items():
        counts = m.get("target_positions", {})
        partial = {t: n for t, n in counts.items() if n < total and not result.get("positions")}
        if partial:  # aligned caches: their KL is over the positions with a target only
            lines.append(f"{label}: KL over positions with a target only: "
                         + ", ".join(f"{t} {n} of {total}" for t, n in partial.items()))
    for name, c in result.get("cache_teachers", {}).items():  # aligned caches: teachers with another tokenizer
        if c["perplexity_observed"] is None:
            lines.append(f"{name} (teacher, aligned cache): no position where its log-prob of the next token is exact")
            continue
        over = f" ({result['positions']})" if result.get("positions") else ""
        lines.append(f"{name} (teacher, aligned cache): perplexity {c['perplexity_observed']:.2f} over the "
                     f"{c['observed_positions']} of {c['positions']} positions{over} where its log-prob of the next "
                     "token is exact")
    return "\n".join(lines)
