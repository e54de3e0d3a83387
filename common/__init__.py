"""The layer both stages stand on: errors, value checks, devices, tokenizers, corpus reading and packing.

`teachers/` (stage one) and `student/` (stage two) import this package and `storage/`; neither imports the
other (tests/test_layers.py). Nothing here imports torch, transformers or datasets at module level.
"""
