"""The published Qwen3 configs build models of exactly transformers' parameter count.

Both sides allocate nothing: our tree comes from `jax.eval_shape`, transformers' model is built
on the meta device. A mismatch means a missing/extra parameter or a wrong shape in our model
(e.g. a head that should be tied, or q/k norms that should be there).
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from specedge_jax.checkpoints import hf
from specedge_jax.models.model_config import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "hf")

# name -> (tied embeddings, parameters as rounded on the model cards)
PUBLISHED = {
    "qwen3_1_7b": (True, 1.7e9),
    "qwen3_14b": (False, 14.8e9),
    "qwen3_32b": (False, 32.8e9),
}


def transformers_count(path: str) -> int:
  hf_config = transformers.AutoConfig.from_pretrained(path)
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
  # parameters() yields a tied weight once, which is how it is stored and counted.
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_transformers(name, tmp_path):
  path = os.path.join(CONFIG_DIR, f"{name}.json")
  # AutoConfig reads a folder's config.json; point it at a copy of ours.
  os.symlink(os.path.abspath(path), tmp_path / "config.json")
  config = ModelConfig.from_hf_folder(tmp_path)
  abstract = hf.abstract_params(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert ours == transformers_count(str(tmp_path))
  tied, published = PUBLISHED[name]
  assert config.tie_word_embeddings == tied
  assert ("lm_head" in abstract) == (not tied)
  assert abs(ours - published) / published < 0.02


def test_qwen3_14b_fields():
  """The architecture numbers the server's memory plan depends on."""
  with open(os.path.join(CONFIG_DIR, "qwen3_14b.json")) as f:
    config = ModelConfig.from_hf_dict(json.load(f))
  assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
          config.head_dim, config.intermediate_size, config.vocab_size) == (
              5120, 40, 40, 8, 128, 17408, 151936)
  assert config.rope_theta == 1e6 and config.qk_norm and not config.attention_bias
  assert config.eos_token_ids == (151645,)
