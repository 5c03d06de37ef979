"""Tokenizer fingerprints (data/tokenizer_fingerprint.py): equal for one tokenizer however it is
loaded, in any process; different, by name, for a changed special token or vocabulary."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from specedge_jax.data import assets
from specedge_jax.data import tokenizer_fingerprint as fp
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.serving.proto import specedge_pb2
from specedge_jax.training import bpe_tokenizer

SPECIALS = {"eos_token": 0, "pad_token": 0, "<|endoftext|>": 0, "<|im_start|>": 1,
            "<|im_end|>": 2}


def toy_vocab(size: int = 64) -> dict[str, int]:
  return {**{token: i for token, i in SPECIALS.items() if token.startswith("<")},
          **{f"t{i}": i for i in range(3, size)}}


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
  """A tiny byte-level BPE (the embedded recipe's special tokens, vocabulary 323), saved."""
  texts = ["The quick brown fox jumps over the lazy dog. " * 3,
           "def f(x):\n    return x ** 2\n", "Why is the sky blue? Rayleigh scattering."] * 8
  folder = str(tmp_path_factory.mktemp("tiny_tokenizer"))
  bpe_tokenizer.save_tokenizer(bpe_tokenizer.train_tokenizer(texts, vocab_size=323), folder)
  return folder


def test_one_tokenizer_loaded_twice_has_one_fingerprint():
  first = fp.of_tokenizer(load_tokenizer(assets.DEFAULT_TARGET_DIR))
  # The draft folder holds its own copy of the target's tokenizer files.
  assert fp.of_tokenizer(load_tokenizer(assets.DEFAULT_DRAFT_DIR)) == first
  assert fp.of_tokenizer(load_tokenizer(assets.DEFAULT_TARGET_DIR)) == first
  assert first.vocab_size == 4096
  assert first.special_token_ids == {"eos_token": 0, "pad_token": 0, "<|endoftext|>": 0,
                                     "<|im_start|>": 1, "<|im_end|>": 2}
  assert len(first.range_digests) == fp.RANGE_COUNT * fp.RANGE_DIGEST_BYTES
  assert not fp.differences(first, first) and not fp.mismatch_message(first, first)


def test_the_fingerprint_is_the_same_in_another_process():
  """Nothing in it depends on the process (str hashes are salted per process, and the vocabulary
  may come in any order): a drafter and a verifier compute the same bytes."""
  vocab = "{f't{i}': i for i in range(3, 64)}"
  here = fp.from_vocab(eval(vocab), SPECIALS)  # pylint: disable=eval-used
  code = (f"from specedge_jax.data import tokenizer_fingerprint as fp; v = {vocab}; "
          f"f = fp.from_vocab(dict(reversed(list(v.items()))), {SPECIALS!r}); "
          "print(f.vocab_sha256, f.range_digests.hex())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": "12345"})
  assert out.stdout.split() == [here.vocab_sha256, here.range_digests.hex()]


def test_a_changed_special_token_is_named(tiny_tokenizer_dir):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  ours = fp.of_tokenizer(load_tokenizer(tiny_tokenizer_dir))
  # The same vocabulary whose eos role points at the chat turn end instead of the document end.
  theirs = fp.of_tokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir,
                                                         eos_token=bpe_tokenizer.IM_END))
  assert theirs.vocab_sha256 == ours.vocab_sha256
  assert fp.differences(ours, theirs) == ["eos_token id 2 (drafter) vs 0 (target)"]
  # A special token moved to another id (its text is its key).
  moved = dict(ours.special_token_ids, **{"<|im_end|>": 7})
  drafter = dataclasses.replace(ours, special_tokens=tuple(sorted(moved.items())))
  assert fp.mismatch_message(ours, drafter) == (
      "the drafter's tokenizer is not the target's: special token '<|im_end|>' id 7 (drafter) "
      "vs 2 (target)")


def test_a_special_token_on_one_side_only_is_named():
  ours = fp.from_vocab(toy_vocab(), SPECIALS)
  theirs = fp.from_vocab(toy_vocab(), {**SPECIALS, "<tool_call>": 5})
  assert fp.differences(ours, theirs) == ["special token '<tool_call>' only on the drafter (id 5)"]
  assert fp.differences(theirs, ours) == ["special token '<tool_call>' only on the target (id 5)"]


def test_a_changed_vocabulary_is_located_by_id_range():
  ours = fp.from_vocab(toy_vocab(64), SPECIALS)
  swapped = toy_vocab(64)
  swapped["t5"], swapped["t60"] = 60, 5  # two tokens trade ids: same size, same specials
  found = fp.differences(ours, fp.from_vocab(swapped, SPECIALS))
  # 64 ids in 32 ranges of 2: ids 5 and 60 sit in ranges [4, 6) and [60, 62).
  assert found == ["vocabulary hash differs: token -> id entries differ in 2 of 32 id ranges "
                   "(ids [4, 6), [60, 62))"]


def test_another_vocabulary_names_its_size_and_hash(tiny_tokenizer_dir):
  target = fp.of_tokenizer(load_tokenizer(assets.DEFAULT_TARGET_DIR))
  tiny = fp.of_tokenizer(load_tokenizer(tiny_tokenizer_dir))
  found = fp.differences(target, tiny)
  # Sizes differ, so the id ranges do not line up and only the hash is named.
  assert found == [f"vocab size {tiny.vocab_size} (drafter) vs 4096 (target)",
                   "vocabulary hash differs"]


def test_the_fingerprint_survives_the_wire():
  ours = fp.of_tokenizer(load_tokenizer(assets.DEFAULT_TARGET_DIR))
  wire = specedge_pb2.TokenizerFingerprint.FromString(
      specedge_pb2.TokenizerFingerprint(**ours.to_fields()).SerializeToString())
  assert fp.TokenizerFingerprint.from_fields(
      vocab_size=wire.vocab_size, special_tokens=dict(wire.special_tokens),
      vocab_sha256=wire.vocab_sha256, range_digests=wire.range_digests) == ours


def test_a_model_smaller_than_its_tokenizer_is_refused():
  tokenizer = fp.from_vocab(toy_vocab(64), SPECIALS)
  fp.check_model_vocab(64, tokenizer, "the draft")
  fp.check_model_vocab(128, tokenizer, "the draft")  # padded embeddings (Qwen's) are fine
  with pytest.raises(ValueError, match="the draft has vocab_size 60, fewer rows than its "
                                       "tokenizer's 64 tokens"):
    fp.check_model_vocab(60, tokenizer, "the draft")
