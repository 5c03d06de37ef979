"""Test doubles and builders shared by the tests and the benchmarks.

  fakes.py        engines implementing the `api` contract with outputs worked out by hand.
  checkpoints.py  random HF (transformers) checkpoints, saved with `save_pretrained`.
  configs.py      tiny HF config presets per family.
"""
