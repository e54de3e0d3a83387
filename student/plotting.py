"""`plot RUN_DIR`: training and held-out curves from metrics.jsonl to a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os

from common.errors import ConfigError
from common.sidefile import read_side_text
from storage.errors import StorageError
from student.metrics_log import MAX_METRICS_BYTES


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run directory's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a train-student run directory?)")
    train, evals = [], []
    text = read_side_text(path, error=ConfigError, max_bytes=MAX_METRICS_BYTES)
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{i}: not valid JSON") from None
        (evals if rec.get("split") == "eval" else train).append(rec)
    return train, evals


def plot_run(run_dir: str, out: str | None = None, *, overwrite: bool = False) -> str:
    """Write the curves image and return the path written: `out` (default RUN_DIR/curves.png), with `.png`
    appended when it has no extension; its format follows the extension (png, pdf, svg, ...). An existing
    figure is replaced only with `overwrite`; any other existing file, or a file a run directory owns, never
    (storage/artifacts.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storage.artifacts import Input, Kind, check_output

    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise ConfigError(f"{run_dir}: metrics.jsonl holds no records")
    out = out or os.path.join(run_dir, "curves.png")
    # the figure may go inside the run directory it draws (the default does), never over a file it owns
    rule = dict(command="plot", writes=Kind.FIGURE, inputs=[Input("RUN_DIR", run_dir, output_inside_ok=True)],
                replace_flag="--overwrite", replace=overwrite)
    if os.path.lexists(out):  # what the user named, judged before `.png` is appended to its name
        check_output(out, **rule)
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if not ext:
        out, ext = out + ".png", "png"
    if ext not in plt.figure().canvas.get_supported_filetypes():
        plt.close("all")
        raise ConfigError(f"--out {out}: unsupported image format {ext!r} (use .png, .pdf or .svg)")
    plt.close("all")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {out}: directory {parent} does not exist")
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory; give a file name")
    check_output(out, **rule)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in train]
    ax = axes[0, 0]
    for key in ("loss", "kd", "ce", "feat"):
        if any(r.get(key) for r in train):
            ax.plot(steps, [r[key] for r in train], label=key)
    ax.set(title="training loss terms", xlabel="step")
    ax.legend()
    ax = axes[0, 1]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_kl"] for r in evals], "o-", label="KL to fused target")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "s--", color="C1", label="perplexity")
        ax2.set_ylabel("perplexity")
        ax2.legend(loc="upper center")
    ax.set(title="held-out", xlabel="step", ylabel="KL (nats/token)")
    ax.legend(loc="upper right")
    ax = axes[1, 0]
    names = sorted({n for r in train for n in r.get("alpha", {})})
    for n in names:
        ax.plot(steps, [r.get("alpha", {}).get(n, float("nan")) for r in train], label=n)
    ax.set(title="mean teacher weight alpha", xlabel="step")
    if names:
        ax.legend()
    ax = axes[1, 1]
    ax.plot(steps, [r["lr"] for r in train], color="C0", label="lr")
    ax.legend(loc="upper left")
    ax3 = ax.twinx()
    ax3.plot(steps, [r["tokens_per_s"] for r in train], "--", color="C2", label="tokens/s")
    ax3.set_ylabel("tokens/s")
    ax3.legend(loc="upper right")
    ax.set(title="learning rate and throughput", xlabel="step")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100, format=ext)
    except OSError as e:
        raise StorageError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return out
