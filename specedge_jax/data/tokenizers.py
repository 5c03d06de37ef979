"""Loading a model's tokenizer from its HF folder.

This module owns the one way the project loads a tokenizer: transformers' `AutoTokenizer` on the
folder (a checkpoint folder or a tokenizer folder), imported only when a tokenizer is loaded
(transformers is a heavy import). It never trains or saves a tokenizer (`training/recipe.py`
does), never applies chat templates (`datasets.py` and `prompts.py` do) and never tokenizes
prompts itself. `has_tokenizer` says whether a folder holds one at all (a random test checkpoint
has none).
"""

from __future__ import annotations

import os


def load_tokenizer(folder: str | os.PathLike):
  """The tokenizer saved in `folder`, via `transformers.AutoTokenizer.from_pretrained`."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top (heavy import)

  return AutoTokenizer.from_pretrained(folder)


# Any of these in a folder means a tokenizer was saved there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: str | os.PathLike) -> bool:
  """Whether `folder` holds a saved tokenizer (one of `TOKENIZER_FILES`); never loads it."""
  return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)
