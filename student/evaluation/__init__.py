"""`evaluate`: perplexity, KL to each teacher and to the fused target, top-1 agreement, BLEU.

- `config`: `EvalConfig`.
- `sources`: held-out windows (text packed as `precompute` packs, or caches joined by training's
  `join_teachers`), teacher targets in one form (training's `student.targets.TeacherView`, fused by training's
  `student.targets.fuse` into the same `FusedTargets`), and model loading, one model resident at a time.
- `metrics`: NLL, KL, agreement, BLEU, the paired bootstrap.
- `report`: the JSON record and the table; `run`: `run_evaluate(cfg)`; `command`: the click command.
"""

from student.evaluation.config import EvalConfig
from student.evaluation.metrics import bleu, greedy_continuations, next_token_nll
from student.evaluation.report import format_comparisons, format_table
from student.evaluation.run import run_evaluate

__all__ = ["EvalConfig", "bleu", "format_comparisons", "format_table", "greedy_continuations", "next_token_nll",
           "run_evaluate"]
