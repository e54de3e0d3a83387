"""`python cli.py COMMAND ...` from a checkout (also under torchrun): the same click group as the installed
`multidistill` console script, `multidistill.cli.main`. Not installed itself."""

from __future__ import annotations

import sys

from multidistill.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
