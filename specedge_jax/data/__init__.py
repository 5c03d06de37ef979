"""Data: benchmark prompt sets, the embedded prompts, tokenizers, and the shipped assets.

  datasets.py    the five SpecEdge benchmark sets, read from a folder given by a flag.
  prompts.py     the embedded prompt records and their encoding with a chat template.
  tokenizers.py  the one tokenizer loader (transformers).
  tokenizer_fingerprint.py  what two processes compare to know they share a tokenizer.
  assets/        the embedded default models (HF folders) and prompts, shipped in the package.
"""
