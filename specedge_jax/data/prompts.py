"""Turning prompt records into token ids: the embedded prompt set and chat templates.

A record is `{"text": ...}` (a completion prompt, tokenized as is) or `{"messages": [...]}` (a
chat, rendered with the tokenizer's own chat template and a generation prompt). This module owns
that rule; the benchmark prompt sets are loaded by `datasets.py`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from specedge_jax.data import assets


def load_records(path: str | os.PathLike = assets.DEFAULT_PROMPTS) -> list[dict[str, Any]]:
  with open(path) as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(records, list):
    raise ValueError(f"{path} must hold a JSON list of prompt records")
  for i, record in enumerate(records):
    if not isinstance(record, dict) or ("text" not in record and "messages" not in record):
      raise ValueError(f"{path} row {i}: a record needs 'text' or 'messages'")
  return records


def encode(tokenizer, record: dict[str, Any]) -> list[int]:
  """Token ids of one record (no special tokens added to completion prompts)."""
  if "messages" in record:
    ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
      ids = ids["input_ids"]
    return [int(t) for t in ids]
  return [int(t) for t in tokenizer.encode(record["text"], add_special_tokens=False)]


def encode_all(tokenizer, records: Sequence[dict[str, Any]]) -> list[list[int]]:
  return [encode(tokenizer, r) for r in records]
