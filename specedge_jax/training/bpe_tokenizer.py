"""The embedded models' tokenizer: byte-level BPE with Qwen's special tokens and chat template.

Trained with `tokenizers` and saved so that `transformers.AutoTokenizer` loads it. This module
owns the special tokens, the chat template and the tokenizer's training; loading any tokenizer is
`data/tokenizers.py`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2 in every tokenizer trained here

# Qwen's `<|im_start|>role\n...<|im_end|>\n` turns, without Qwen's tool-calling branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def format_chat(messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
  """The text `CHAT_TEMPLATE` renders for (role, content) pairs; used to build training text."""
  text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
  return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
  """Trains a byte-level BPE tokenizer; returns a `transformers.PreTrainedTokenizerFast`.

  Byte-level means every string encodes (no unknown token) and decoding inverts encoding exactly.
  The special tokens are atomic: BPE never splits or merges across them.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  minimum = len(SPECIAL_TOKENS) + 256  # the byte alphabet must fit
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size must exceed {minimum} (specials + 256 bytes), got {vocab_size}")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
      additional_special_tokens=[IM_START, IM_END], model_max_length=32768,
      clean_up_tokenization_spaces=False)
  fast.chat_template = CHAT_TEMPLATE
  return fast


def save_tokenizer(tokenizer, folder: str) -> None:
  """`save_pretrained`, naming the class every transformers release knows.

  transformers 5 records its new `TokenizersBackend` class, which transformers 4 cannot import;
  `PreTrainedTokenizerFast` loads the same `tokenizer.json` under both.
  """
  tokenizer.save_pretrained(folder)
  config_path = os.path.join(folder, "tokenizer_config.json")
  with open(config_path) as f:
    tokenizer_config = json.load(f)
  tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
  for loading_detail in ("is_local", "local_files_only"):  # left by from_pretrained on a reload
    tokenizer_config.pop(loading_detail, None)
  with open(config_path, "w") as f:
    json.dump(tokenizer_config, f, indent=2)


def special_token_ids(tokenizer) -> dict[str, int]:
  ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
  if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
    raise ValueError(f"tokenizer lacks one of the special tokens {SPECIAL_TOKENS}: {ids}")
  return ids
