"""Paths of the files shipped inside the package: the embedded default models and prompts.

`models/target` and `models/draft` are HF folders (config.json, model.safetensors, tokenizer
files) of a tiny Qwen3 target and a draft distilled from it, trained by `launch/train_tiny.py`
(see docs/notes/training.md); `models/draft_small` is a smaller draft (hidden 80, one layer)
distilled from the same target with its tokenizer, for edges that run different draft models.
`prompts.json` is a list of prompts written for this project, each `{"id", "kind", "text"}` or
`{"id", "kind", "messages"}` for chat prompts. This module only names paths; it loads nothing.
"""

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TARGET_DIR = os.path.join(ASSETS_DIR, "models", "target")
DEFAULT_DRAFT_DIR = os.path.join(ASSETS_DIR, "models", "draft")
SMALL_DRAFT_DIR = os.path.join(ASSETS_DIR, "models", "draft_small")
DEFAULT_PROMPTS = os.path.join(ASSETS_DIR, "prompts.json")
