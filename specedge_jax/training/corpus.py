"""The training corpus of the embedded models: documents, the validation split, token windows.

wikitext and oasst from the benchmark folder (oasst's Llama-2 `[INST]` markup rewritten into the
Qwen chat template), plus Python's bundled documentation. c4, mtbench and specbench are held out
(`HELD_OUT_DATASETS` are never read here). The batch of step `s` is a pure function of (seed, s),
so a resumed run computes the same updates as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from specedge_jax.data import datasets
from specedge_jax.training import bpe_tokenizer

TRAINING_DATASETS = {name: datasets.DATASET_FILES[name] for name in ("wikitext", "oasst")}
# Benchmark sets the trained models are evaluated on: never read for training.
HELD_OUT_DATASETS = ("c4", "mtbench", "specbench")


@dataclasses.dataclass(frozen=True)
class Document:
  source: str  # "wikitext", "oasst" or "pydoc"
  text: str


# The oasst rows open with the stock Llama-2 system prompt (note the file's malformed closing
# `<</SYS>`), and mark user turns `[INST] ... [\INST]` (sometimes `[/INST]`).
_SYSTEM_BLOCK = re.compile(r"<<SYS>>.*?<</SYS>>?", re.DOTALL)
_INST_SPLIT = re.compile(r"\[INST\]|\[[\\/]INST\]")


def llama2_chat_to_messages(text: str) -> list[tuple[str, str]]:
  """Parses one Llama-2 chat transcript into (role, content) turns, dropping the system prompt.

  The stock system prompt is the same boilerplate in every row; keeping it would spend the tiny
  model's capacity on memorizing one paragraph. Empty turns (the unanswered last question leaves
  an empty assistant turn) are dropped.
  """
  text = _SYSTEM_BLOCK.sub("", text)
  pieces = _INST_SPLIT.split(text)
  if len(pieces) < 2:
    raise ValueError(f"no [INST] turn in chat transcript {text[:80]!r}")
  messages = []
  # pieces: [before first [INST], user, assistant, user, assistant, ...]
  for turn, piece in enumerate(pieces[1:]):
    content = piece.strip()
    if content:
      messages.append(("user" if turn % 2 == 0 else "assistant", content))
  return messages


def _wikitext_documents(dataset_dir: str) -> list[Document]:
  return [Document("wikitext", text.strip()) for text in
          datasets.read_index_text_rows(os.path.join(dataset_dir,
                                                     TRAINING_DATASETS["wikitext"]))]


def _oasst_documents(dataset_dir: str) -> list[Document]:
  docs = []
  for text in datasets.read_index_text_rows(os.path.join(dataset_dir,
                                                        TRAINING_DATASETS["oasst"])):
    messages = llama2_chat_to_messages(text)
    if messages:
      docs.append(Document("oasst", bpe_tokenizer.format_chat(messages)))
  return docs


def _pydoc_documents() -> list[Document]:
  from pydoc_data import topics  # the stdlib's bundled language reference
  return [Document("pydoc", topics.topics[name].strip()) for name in sorted(topics.topics)]


def load_training_documents(dataset_dir: str, use_pydoc: bool = True) -> list[Document]:
  """The training sources as documents, in a fixed order."""
  docs = _wikitext_documents(dataset_dir) + _oasst_documents(dataset_dir)
  if use_pydoc:
    docs += _pydoc_documents()
  return docs


def split_documents(docs: Sequence[Document], validation_fraction: float,
                    seed: int) -> tuple[list[Document], list[Document]]:
  """Sets aside `validation_fraction` of each source's documents (at least one) for validation."""
  if not 0 < validation_fraction < 1:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  train, validation = [], []
  for source in sorted({d.source for d in docs}):
    of_source = [d for d in docs if d.source == source]
    order = np.random.default_rng([seed, len(of_source)]).permutation(len(of_source))
    n_val = max(1, round(validation_fraction * len(of_source)))
    held = set(order[:n_val].tolist())
    for i, doc in enumerate(of_source):
      (validation if i in held else train).append(doc)
  return train, validation


def encode_documents(tokenizer, docs: Sequence[Document]) -> np.ndarray:
  """One int32 token stream: each document's tokens followed by `<|endoftext|>`."""
  eos = bpe_tokenizer.special_token_ids(tokenizer)[bpe_tokenizer.END_OF_TEXT]
  encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
  return np.concatenate([np.asarray(ids + [eos], np.int32) for ids in encoded])


def windows(stream: np.ndarray, seq_len: int, offset: int = 0) -> np.ndarray:
  """Non-overlapping [N, seq_len + 1] training windows (inputs plus the shifted labels)."""
  usable = (len(stream) - offset - 1) // seq_len
  if usable < 1:
    raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window "
                     f"of {seq_len + 1}")
  idx = offset + np.arange(usable)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


def batch_for_step(stream: np.ndarray, seq_len: int, batch_size: int, step: int,
                   seed: int) -> np.ndarray:
  """The [batch_size, seq_len + 1] batch of training step `step`: a pure function of its inputs.

  Each epoch cuts the stream into windows at a fresh random offset and shuffles them, so epochs
  see different window boundaries. Being a function of the step alone is what makes resumption
  exact: a resumed run draws the batches the killed run would have drawn.
  """
  n_windows = (len(stream) - seq_len - 1) // seq_len
  if n_windows < batch_size:
    raise ValueError(f"{len(stream)} training tokens give {n_windows} windows of {seq_len}; "
                     f"need at least batch_size={batch_size}")
  per_epoch = n_windows // batch_size
  epoch, index = divmod(step, per_epoch)
  rng = np.random.default_rng([seed, epoch])
  offset = int(rng.integers(seq_len))
  order = rng.permutation(n_windows)[index * batch_size:(index + 1) * batch_size]
  starts = offset + order * seq_len
  return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]]
