"""Shared fixtures: tiny random HF checkpoints built locally (no hub), and absl flag pre-parsing."""

import os

# Keep JAX on CPU with deterministic float32 matmuls, and let XLA use both cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
from absl import flags

# Launchers define absl flags at import. Mark them parsed so tests can import launchers and read
# defaults without absl trying to parse pytest's own argv.
flags.FLAGS.mark_as_parsed()

HF_FAMILIES = ("qwen3", "qwen2", "llama")


def make_hf_model(family: str, *, seed: int = 0, vocab_size: int = 97, num_layers: int = 2,
                  tie: bool = False, hidden_size: int = 32, intermediate_size: int = 64):
  """A random-init tiny HF model of the family (PyTorch), in eval mode."""
  import torch
  import transformers

  torch.manual_seed(seed)
  common = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                tie_word_embeddings=tie, max_position_embeddings=512)
  if family == "qwen3":
    config, cls = transformers.Qwen3Config(**common), transformers.Qwen3ForCausalLM
  elif family == "qwen2":
    config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
  elif family == "llama":
    # llama3 rope scaling with a small original context so the scaled band is exercised.
    config = transformers.LlamaConfig(
        **common, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cls = transformers.LlamaForCausalLM
  else:
    raise ValueError(family)
  model = cls(config).eval()
  # Random init leaves norms at 1; perturb them so the test sees a wrong norm mapping.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory):
  """Returns a function family -> (folder, torch model) that caches saved tiny checkpoints."""
  cache = {}

  def get(family: str, tie: bool = False):
    key = (family, tie)
    if key not in cache:
      folder = tmp_path_factory.mktemp(f"hf_{family}_{'tied' if tie else 'untied'}")
      model = make_hf_model(family, tie=tie)
      model.save_pretrained(folder)
      cache[key] = (str(folder), model)
    return cache[key]

  return get


@pytest.fixture(scope="session")
def served_pair_dirs(tmp_path_factory):
  """HF folders {'target', 'draft'} of a tiny Qwen3 target and a close draft, with a byte-level
  BPE tokenizer trained on the embedded prompts (so the embedded prompt set and its chat template
  work): the pair that the process-level tests (local cluster, sweep) serve."""
  import spec_models
  from specedge_jax.checkpoints import hf as checkpoint
  from specedge_jax.data import prompts
  from specedge_jax.training import recipe as training

  records = prompts.load_records()
  texts = [r["text"] if "text" in r else " ".join(m["content"] for m in r["messages"])
           for r in records]
  tokenizer = training.train_tokenizer(texts * 4, vocab_size=len(training.SPECIAL_TOKENS) + 320)
  target, draft = spec_models.make_pair(len(tokenizer), noise=0.005)
  root = tmp_path_factory.mktemp("served_pair")
  dirs = {}
  for name, model in (("target", target), ("draft", draft)):
    folder = str(root / name)
    checkpoint.save_hf(folder, model.config, checkpoint.params_of(model))
    training.save_tokenizer(tokenizer, folder)
    dirs[name] = folder
  return dirs
