"""Random-weight HF (transformers, PyTorch) checkpoints, for the tests and the benchmarks.

This module owns the one builder of such checkpoints: a family's `*ForCausalLM` from a
`configs.py` preset, initialised from a torch seed, its norm scales perturbed (random init leaves
them at 1, which would hide a wrong norm mapping), saved with `save_pretrained`. torch and
transformers are imported inside the functions only (torch is an optional extra). It never loads
or converts a checkpoint into our model (`specedge_jax.checkpoints` does) and never writes
tokenizer files.
"""

from __future__ import annotations

import os

from specedge_jax.testing.configs import HF_CLASSES, HF_FAMILIES, hf_config_kwargs

__all__ = ["HF_FAMILIES", "make_hf_model", "save_hf_model"]


def make_hf_model(family: str = "qwen3", *, seed: int = 0, **sizes):
  """A random-init HF model of the family (PyTorch, float32), in eval mode.

  `sizes`: the keyword arguments of `configs.hf_config_kwargs` (vocab_size, num_layers, tie,
  hidden_size, ...); the defaults give the tests' tiny model.
  """
  import torch
  import transformers

  config = hf_config_kwargs(family, **sizes)  # raises ValueError for an unknown family
  config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[family])
  torch.manual_seed(seed)
  model = model_class(config_class(**config)).eval()
  # Random init leaves norms at 1; perturb them so a wrong norm mapping shows in the logits.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  return model


def save_hf_model(folder: str | os.PathLike, family: str = "qwen3", *, seed: int = 0, **sizes):
  """`make_hf_model(family, seed=seed, **sizes)` saved into `folder`; returns the torch model."""
  model = make_hf_model(family, seed=seed, **sizes)
  model.save_pretrained(folder)
  return model
