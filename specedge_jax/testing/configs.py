"""Tiny HF (transformers) config presets of the random checkpoints that `checkpoints.py` builds.

This module owns the sizes and family-specific fields of those checkpoints, as keyword arguments
for transformers' `*Config` classes, and which transformers classes make each family. It is plain
data: it imports neither torch nor transformers, and never builds a model or writes a file.
"""

from __future__ import annotations

from typing import Any

HF_FAMILIES = ("qwen3", "qwen2", "llama")

# family -> (transformers config class, causal-LM class), by name.
HF_CLASSES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

# llama3 rope scaling with a small original context so the scaled band is exercised.
LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def hf_config_kwargs(family: str, *, vocab_size: int = 97, num_layers: int = 2,
                     tie: bool = False, hidden_size: int = 32, intermediate_size: int = 64,
                     num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                     max_position_embeddings: int = 512) -> dict[str, Any]:
  """The `*Config` keyword arguments of a model of `family` (the defaults: the tests' tiny one).

  Fields not named here keep transformers' defaults for the family; llama gets `LLAMA3_ROPE`.
  """
  if family not in HF_CLASSES:
    raise ValueError(family)
  kwargs: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                                intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                                head_dim=head_dim, tie_word_embeddings=tie,
                                max_position_embeddings=max_position_embeddings)
  if family == "llama":
    kwargs.update(LLAMA3_ROPE)
  return kwargs
