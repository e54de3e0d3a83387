"""The installed entry point: `multidistill.cli.main` is the `multidistill` console script (and what the
top-level `cli.py` of a checkout runs). The only package that imports both stages."""
