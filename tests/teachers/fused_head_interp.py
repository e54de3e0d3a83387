"""Child process of test_fused_head.py: runs the fused head under Triton's CPU interpreter.

    TRITON_INTERPRET=1 python tests/teachers/fused_head_interp.py cases.pt results.pt

Triton reads TRITON_INTERPRET when it is first imported, so the kernel runs in a fresh process where the
variable is set before that import. Each case is a dict of fused_targets_head keyword arguments (hidden and
weight included); the results are the three output tensors per case.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting this process"
    import torch

    from teachers.fused_head import fused_targets_head

    cases = torch.load(sys.argv[1])
    results = {name: fused_targets_head(**kwargs) for name, kwargs in cases.items()}
    torch.save(results, sys.argv[2])


if __name__ == "__main__":
    main()
