"""Loaders for the five SpecEdge benchmark prompt sets: c4, mtbench, oasst, wikitext, specbench.

The files live outside the project, in a folder the caller names (`--dataset_dir`; see
`/work/shared/datasets/README.md` for the formats). This module owns reading and validating them,
the reference's request sampling, and the Spec-Bench category split. It never tokenizes for the
model (except applying the chat template to Spec-Bench turns, which produces text) and never
decides request order across clients beyond the reference's per-client shuffle.

Sampling follows the reference client (`kaist-ina/specedge`, `src/script/client.py`):

    rows = range(len(file))[req_offset:max_request_num][::sample_req_cnt]

so `max_request_num` is an exclusive *end row* (-1 or None: the end of the file), not a count,
exactly as in the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Protocol, Sequence

from specedge_jax.data import tokenizers

DATASET_FILES = {
    "c4": "c4_prompts.json",
    "mtbench": "mtbench_prompts.json",
    "oasst": "oasst_prompts.json",
    "wikitext": "wikitext_prompts.json",
    "specbench": "specbench_prompts.jsonl",
}
DATASETS = tuple(DATASET_FILES)

# Spec-Bench categories in file order. Its first 80 rows are MT-bench, whose own sub-categories
# the reference's metric script reports together as one "multi-turn" category.
SPECBENCH_CATEGORIES = ("multi-turn", "translation", "summarization", "qa", "math_reasoning",
                        "rag")
MTBENCH_SUBCATEGORIES = frozenset({"writing", "roleplay", "reasoning", "math", "coding",
                                   "extraction", "stem", "humanities"})
SPECBENCH_ROWS_PER_CATEGORY = 80


# The prompt sets sit beside the checkout (`<repo>/../shared/datasets`) unless a flag says
# otherwise.
DEFAULT_DATASET_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "datasets"))


class DatasetError(ValueError):
  """A prompt file is missing or malformed; the message names the file and, if any, the row."""


class PromptFileMissing(DatasetError, FileNotFoundError):
  """A prompt file does not exist (a `DatasetError` that is also a `FileNotFoundError`)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One benchmark request.

  dataset: the prompt set's name (a key of `DATASET_FILES`).
  index: the row of the file (the reference's `req_idx`).
  text: the prompt text, chat template already applied for specbench.
  category: the Spec-Bench category (one of `SPECBENCH_CATEGORIES`, or the file's own label for
    a category this module does not know); None for the other sets.
  """

  dataset: str
  index: int
  text: str
  category: str | None = None


class ChatTokenizer(Protocol):
  """What the specbench loader needs of a tokenizer (a transformers tokenizer fits)."""

  chat_template: str | None

  def apply_chat_template(self, conversation, **kwargs) -> Any:
    ...


def sample_rows(num_rows: int, req_offset: int = 0, sample_req_cnt: int = 1,
                max_request_num: int | None = -1) -> list[int]:
  """The row indices the reference client sends: `range(n)[req_offset:end][::sample_req_cnt]`.

  `max_request_num` is the exclusive end row; -1 or None means the end of the file.
  """
  if req_offset < 0:
    raise ValueError(f"req_offset must be >= 0, got {req_offset}")
  if sample_req_cnt < 1:
    raise ValueError(f"sample_req_cnt must be >= 1, got {sample_req_cnt}")
  end = num_rows if max_request_num is None or max_request_num == -1 else max_request_num
  if end < 0:
    raise ValueError(f"max_request_num must be -1 (all rows) or >= 0, got {max_request_num}")
  return list(range(num_rows))[req_offset:end][::sample_req_cnt]


def client_order(prompts: Sequence[Prompt], client_idx: int) -> list[Prompt]:
  """The reference's per-client request order: `random.seed(client_idx); random.shuffle(...)`.

  Uses a private `random.Random`, which gives the same permutation without touching the
  process-wide generator.
  """
  order = list(prompts)
  random.Random(client_idx).shuffle(order)
  return order


def specbench_category(label: str) -> str:
  """Collapses MT-bench's sub-categories to 'multi-turn'; other labels pass through."""
  return "multi-turn" if label in MTBENCH_SUBCATEGORIES else label


def uses_enable_thinking(tokenizer: ChatTokenizer) -> bool:
  """Whether the tokenizer's chat template reads an `enable_thinking` variable (Qwen3 does)."""
  template = getattr(tokenizer, "chat_template", None)
  if isinstance(template, dict):  # named templates: check them all
    template = " ".join(str(t) for t in template.values())
  return bool(template) and "enable_thinking" in template


def apply_chat_template(tokenizer: ChatTokenizer, user_turn: str, reasoning: bool) -> str:
  """The text the reference sends for one Spec-Bench question: its first turn as a user message,
  with the generation prompt appended. `reasoning` becomes `enable_thinking` for templates that
  read it; other templates are called without it."""
  kwargs: dict[str, Any] = dict(tokenize=False, add_generation_prompt=True)
  if uses_enable_thinking(tokenizer):
    kwargs["enable_thinking"] = reasoning
  text = tokenizer.apply_chat_template([{"role": "user", "content": user_turn}], **kwargs)
  if not isinstance(text, str):
    raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
  return text


def _dataset_path(dataset: str, dataset_dir: str | os.PathLike) -> str:
  if dataset not in DATASET_FILES:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
  path = os.path.join(dataset_dir, DATASET_FILES[dataset])
  if not os.path.isfile(path):
    raise PromptFileMissing(
        f"{path}: prompt file for dataset {dataset!r} does not exist "
        f"(is --dataset_dir pointing at the folder of the SpecEdge prompt sets?)")
  return path


def read_index_text_rows(path: str | os.PathLike) -> list[str]:
  """Reads a JSON list of `[index, text]` rows (c4, mtbench, oasst, wikitext); returns the texts.

  The one reader of these files, for the benchmark loader here and for the training recipe.

  Raises:
    PromptFileMissing: the file does not exist.
    DatasetError: the file is not such a list, or a row is not such a pair (names file and row).
  """
  if not os.path.isfile(path):
    raise PromptFileMissing(f"{path}: prompt file does not exist (check --dataset_dir)")
  try:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(rows, list):
    raise DatasetError(f"{path}: expected a JSON list of [index, text] rows, "
                       f"got {type(rows).__name__}")
  texts = []
  for row_no, row in enumerate(rows):
    if not (isinstance(row, list) and len(row) == 2 and isinstance(row[1], str)):
      raise DatasetError(f"{path}: row {row_no} is not an [index, text] pair: {str(row)[:80]}")
    texts.append(row[1])
  return texts


def _read_specbench_rows(path: str) -> list[dict[str, Any]]:
  """Reads the Spec-Bench JSONL; row numbers in errors count non-empty lines from 0."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}: row {len(rows)} (line {line_no})"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e})") from e
      if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
      turns = row.get("turns")
      if not (isinstance(turns, list) and turns and isinstance(turns[0], str)):
        raise DatasetError(f"{where}: 'turns' must be a non-empty list of strings")
      if not isinstance(row.get("category"), str):
        raise DatasetError(f"{where}: 'category' must be a string")
      rows.append(row)
  return rows


def load_prompts(dataset: str, dataset_dir: str | os.PathLike, *, req_offset: int = 0,
                 sample_req_cnt: int = 1, max_request_num: int | None = -1,
                 tokenizer: ChatTokenizer | str | os.PathLike | None = None,
                 reasoning: bool = False) -> list[Prompt]:
  """Loads the sampled prompts of one prompt set.

  Args:
    dataset: one of `DATASETS`.
    dataset_dir: the folder holding the prompt files.
    req_offset, sample_req_cnt, max_request_num: the reference's sampling (see `sample_rows`).
    tokenizer: the target model's tokenizer, or the folder to load it from with transformers'
      `AutoTokenizer`; required for specbench, whose turns are wrapped in its chat template.
    reasoning: specbench only; `enable_thinking` for templates that read it (Qwen3).

  Raises:
    DatasetError: the file is missing or a row is malformed (the message names file and row).
  """
  path = _dataset_path(dataset, dataset_dir)
  if dataset != "specbench":
    texts = read_index_text_rows(path)
    return [Prompt(dataset, i, texts[i]) for i in
            sample_rows(len(texts), req_offset, sample_req_cnt, max_request_num)]
  if tokenizer is None:
    raise ValueError("specbench prompts need the target tokenizer (its chat template)")
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tokenizers.load_tokenizer(tokenizer)
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("specbench prompts need a chat template, and this tokenizer has no chat "
                     "template")
  rows = _read_specbench_rows(path)
  return [Prompt(dataset, i, apply_chat_template(tokenizer, rows[i]["turns"][0], reasoning),
                 specbench_category(rows[i]["category"]))
          for i in sample_rows(len(rows), req_offset, sample_req_cnt, max_request_num)]
