"""The embedded default models (`specedge_jax/data/assets`) and the recipe that trains them.

The committed target and drafts (the draft and the smaller draft_small) must load in transformers
and in our loader with the same logits, share one tokenizer that round-trips text and renders the
chat template, and fit the size budget. `launch/train_tiny.py` must run end to end at toy sizes,
a run stopped after a checkpoint and resumed must export exactly the weights of a run that never
stopped, and `--teacher` must distil a draft alone for an existing target, with its tokenizer.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl.testing import flagsaver

from specedge_jax.checkpoints import hf
from specedge_jax.data.assets import (DEFAULT_DRAFT_DIR, DEFAULT_PROMPTS, DEFAULT_TARGET_DIR,
                                      SMALL_DRAFT_DIR)
from specedge_jax.models.transformer import causal_mask, count_parameters
from specedge_jax.training import bpe_tokenizer, corpus

MODEL_DIRS = {"target": DEFAULT_TARGET_DIR, "draft": DEFAULT_DRAFT_DIR,
              "draft_small": SMALL_DRAFT_DIR}
ATOL = 1e-4


def _our_logits(model, ids):
  tokens = jnp.asarray(np.asarray(ids, np.int32)[None])
  logits, _ = model(tokens, jnp.arange(len(ids))[None], causal_mask(jnp.array([len(ids)]),
                                                                     len(ids)))
  return np.asarray(logits[0])


def _hf_logits(folder, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(DEFAULT_TARGET_DIR)


@pytest.mark.parametrize("name", sorted(MODEL_DIRS))
def test_embedded_model_loads_in_transformers_and_ours_with_equal_logits(name, tokenizer):
  folder = MODEL_DIRS[name]
  text = tokenizer.apply_chat_template(
      [{"role": "user", "content": "Why is the sky blue?"}], tokenize=False,
      add_generation_prompt=True) + "The sky looks blue because"
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  ours = hf.load_hf_model(folder)
  np.testing.assert_allclose(_our_logits(ours, ids), _hf_logits(folder, ids), atol=ATOL)
  # EOS: both the document end and the chat turn end stop generation.
  specials = bpe_tokenizer.special_token_ids(tokenizer)
  assert set(ours.config.eos_token_ids) == {specials[bpe_tokenizer.END_OF_TEXT],
                                            specials[bpe_tokenizer.IM_END]}
  assert ours.config.vocab_size == len(tokenizer)


def test_embedded_models_sizes_and_shared_tokenizer():
  target = hf.load_hf_model(DEFAULT_TARGET_DIR)
  draft = hf.load_hf_model(DEFAULT_DRAFT_DIR)
  assert target.config.model_type == draft.config.model_type == "qwen3"
  assert 3e6 <= count_parameters(target) <= 10e6
  assert 0.3e6 <= count_parameters(draft) <= 1.5e6
  small = hf.load_hf_model(SMALL_DRAFT_DIR)
  assert small.config.model_type == "qwen3" and small.config.num_layers == 1
  assert 0.3e6 <= count_parameters(small) < count_parameters(draft)
  with open(os.path.join(DEFAULT_TARGET_DIR, "tokenizer.json"), "rb") as f:
    target_tokenizer = f.read()
  for folder in (DEFAULT_DRAFT_DIR, SMALL_DRAFT_DIR):
    with open(os.path.join(folder, "tokenizer.json"), "rb") as f:
      assert f.read() == target_tokenizer, f"{folder} must share the target's vocabulary"
  total = sum(os.path.getsize(os.path.join(d, f)) for d in MODEL_DIRS.values()
              for f in os.listdir(d))
  assert total <= 25 * 2**20, f"embedded models take {total / 2**20:.1f} MiB, budget 25 MiB"


def test_tokenizer_round_trips_and_renders_chat_template(tokenizer):
  samples = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines  ",
             "Unicode: café, naïve, 東京, emoji 🙂", "def f(x):\n    return x ** 2\n",
             "<|im_start|>user\nhi<|im_end|>\n"]
  for text in samples:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
  for special in bpe_tokenizer.SPECIAL_TOKENS:
    assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 2 + 2?"},
              {"role": "assistant", "content": "4."},
              {"role": "user", "content": "And 3 + 3?"}]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == bpe_tokenizer.format_chat(
      [(m["role"], m["content"]) for m in messages], add_generation_prompt=True)
  assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_set_is_well_formed(tokenizer):
  with open(DEFAULT_PROMPTS) as f:
    prompts = json.load(f)
  assert 32 <= len(prompts) <= 48
  assert len({p["id"] for p in prompts}) == len(prompts)
  kinds = {p["kind"] for p in prompts}
  assert kinds == {"completion", "chat"}
  for p in prompts:
    if p["kind"] == "chat":
      text = tokenizer.apply_chat_template(p["messages"], tokenize=False,
                                           add_generation_prompt=True)
    else:
      text = p["text"]
    assert 3 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 128


def test_llama2_chat_markup_becomes_turns():
  text = ("[INST] <<SYS>>\nBe nice.\n<</SYS>\n\n\nWhat is a cat? [\\INST]\nAn animal.\n"
          "[INST] And a dog? [\\INST]\n")
  assert corpus.llama2_chat_to_messages(text) == [
      ("user", "What is a cat?"), ("assistant", "An animal."), ("user", "And a dog?")]
  with pytest.raises(ValueError, match="no \\[INST\\]"):
    corpus.llama2_chat_to_messages("plain text")


# ------------------------------------------------------------------------------------------------
# The training recipe at toy sizes.


@pytest.fixture(scope="module")
def toy_dataset_dir(tmp_path_factory):
  """wikitext- and oasst-format files made from the stdlib's bundled Python docs."""
  from pydoc_data import topics

  names = sorted(topics.topics)[:24]
  folder = tmp_path_factory.mktemp("toy_datasets")
  wiki = [[i, topics.topics[n][:1500]] for i, n in enumerate(names[:16])]
  chat = [[i, f"[INST] <<SYS>>\nsys\n<</SYS>\n\n\nWhat is {n}? [\\INST]\n"
              f"{topics.topics[n][:600]}\n[INST] More? [\\INST]\n"] for i, n in enumerate(names[16:])]
  (folder / "wikitext_prompts.json").write_text(json.dumps(wiki))
  (folder / "oasst_prompts.json").write_text(json.dumps(chat))
  return str(folder)


def _train_tiny_flags(dataset_dir, work_dir, **overrides):
  flags = dict(dataset_dir=dataset_dir, work_dir=work_dir,
               target_out=os.path.join(work_dir, "target"),
               draft_out=os.path.join(work_dir, "draft"), use_pydoc=False, vocab_size=300,
               seq_len=32, batch_size=4, target_steps=4, draft_steps=4, target_hidden=32,
               target_layers=2, draft_hidden=16, draft_layers=1, checkpoint_every=2,
               eval_every=4, progress=False)
  flags.update(overrides)
  return flags


@pytest.mark.slow
def test_train_tiny_end_to_end_and_exact_resume(toy_dataset_dir, tmp_path):
  from launch import train_tiny

  straight = str(tmp_path / "straight")
  with flagsaver.flagsaver(**_train_tiny_flags(toy_dataset_dir, straight)):
    train_tiny.main([])
  stopped = str(tmp_path / "stopped")
  with flagsaver.flagsaver(**_train_tiny_flags(toy_dataset_dir, stopped, stop_after_step=3)):
    train_tiny.main([])
  assert not os.path.exists(os.path.join(stopped, "target")), "a stopped run must not export"
  with flagsaver.flagsaver(**_train_tiny_flags(toy_dataset_dir, stopped)):
    train_tiny.main([])
  with open(os.path.join(stopped, "summary.json")) as f:
    summary = json.load(f)
  assert summary["target"]["resumed_from"] == 3 and summary["target"]["steps_run"] == 1
  assert summary["draft"]["resumed_from"] is None and summary["finished"]

  for name in ("target", "draft"):
    with open(os.path.join(straight, name, "model.safetensors"), "rb") as f:
      expected = f.read()
    with open(os.path.join(stopped, name, "model.safetensors"), "rb") as f:
      assert f.read() == expected, f"resumed {name} differs from the uninterrupted run"
  folder = os.path.join(stopped, "draft")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  ids = tokenizer("What is a lambda?", add_special_tokens=False)["input_ids"]
  np.testing.assert_allclose(_our_logits(hf.load_hf_model(folder), ids),
                             _hf_logits(folder, ids), atol=ATOL)

  # A draft variant for the trained target: only a draft is trained, with the target's tokenizer.
  variant = str(tmp_path / "variant")
  with flagsaver.flagsaver(**_train_tiny_flags(toy_dataset_dir, variant, draft_hidden=8,
                                               teacher=os.path.join(straight, "target"))):
    train_tiny.main([])
  with open(os.path.join(variant, "summary.json")) as f:
    summary = json.load(f)
  assert summary["finished"] and "target" not in summary and summary["draft"]["steps_run"] == 4
  assert not os.path.exists(os.path.join(variant, "target"))
  assert not os.path.exists(os.path.join(variant, "tokenizer")), "no tokenizer is trained"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(straight, "target", name), "rb") as f:
      with open(os.path.join(variant, "draft", name), "rb") as g:
        assert g.read() == f.read(), name
  assert hf.load_hf_model(os.path.join(variant, "draft")).config.hidden_size == 8


def test_batches_are_a_function_of_the_step():
  stream = np.arange(1000, dtype=np.int32)
  first = corpus.batch_for_step(stream, 16, 4, step=7, seed=0)
  np.testing.assert_array_equal(first, corpus.batch_for_step(stream, 16, 4, step=7, seed=0))
  assert first.shape == (4, 17)
  # Every row is a contiguous slice of the stream (inputs plus the next-token labels).
  assert (np.diff(first, axis=1) == 1).all()
  assert not np.array_equal(first, corpus.batch_for_step(stream, 16, 4, step=8, seed=0))
  with pytest.raises(ValueError, match="batch_size"):
    corpus.batch_for_step(stream[:40], 16, 4, step=0, seed=0)
