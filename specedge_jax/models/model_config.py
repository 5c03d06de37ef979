"""Model configuration: one frozen dataclass for the Qwen3, Qwen2 and Llama decoder families.

This module owns the mapping from an HF `config.json` to `ModelConfig`, and the tiny presets the
tests use. It never touches weights (see `checkpoint.py`) or arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

# The `model_type` values of HF configs we can run, and the architecture switches each implies.
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency scaling. `rope_type == 'default'` means no scaling."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer of the Qwen3 / Qwen2 / Llama families.

  The trailing letters are the axes' names in shape comments (see specedge_jax/shapes.py).
  """

  model_type: str
  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # Q
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biased q/k/v projections (Qwen2; optional in Llama)
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
      )
    if self.rope_scaling.rope_type not in ("default", "llama3"):
      raise ValueError(f"rope_type {self.rope_scaling.rope_type!r} is not supported")

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  def rope_inverse_frequencies(self) -> np.ndarray:
    """The RoPE inverse frequencies [H / 2], float64, with llama3 scaling applied."""
    exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
    inv_freq = 1.0 / (self.rope_theta**exponents)
    scaling = self.rope_scaling
    if scaling.rope_type == "llama3":
      # Same piecewise rule as transformers' `_compute_llama3_parameters`: long wavelengths are
      # divided by `factor`, short ones are kept, and the band in between is interpolated.
      low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
      high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
      wavelen = 2 * np.pi / inv_freq
      scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
      smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
          scaling.high_freq_factor - scaling.low_freq_factor)
      smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
      is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
      inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq

  # ----------------------------------------------------------------------------------------------
  # HF interop

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from the contents of an HF `config.json` (old or new rope format)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"config.json has model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
      if key not in hf:
        raise ValueError(f"config.json is missing required field {key!r}")
    if hf.get("use_sliding_window"):
      raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    # transformers >= 5 writes `rope_parameters`; published checkpoints use `rope_theta` and
    # `rope_scaling` at the top level. Accept both.
    rope = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling_src = rope if rope.get("rope_type", "default") != "default" else legacy_scaling
    rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) or "default"
    if rope_type == "llama3":
      scaling = RopeScaling(
          rope_type="llama3",
          factor=float(scaling_src["factor"]),
          low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
          high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(
              scaling_src.get("original_max_position_embeddings", 8192)),
      )
    elif rope_type == "default":
      scaling = RopeScaling()
    else:
      raise ValueError(f"config.json rope type {rope_type!r} is not supported")
    num_heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    attention_bias = hf.get("attention_bias", model_type == "qwen2")
    if model_type == "qwen2":
      attention_bias = True  # Qwen2 always has q/k/v biases; its config has no such field.
    return cls(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(attention_bias),
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )

  @classmethod
  def from_hf_folder(cls, path: str | os.PathLike) -> "ModelConfig":
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"no config.json in {path}")
    try:
      with open(config_path) as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    return cls.from_hf_dict(hf)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` contents for this architecture (used when exporting)."""
    architectures = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "llama": "LlamaForCausalLM"}
    rope_parameters: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling.rope_type == "llama3":
      rope_parameters.update(dataclasses.asdict(self.rope_scaling))
    out: dict[str, Any] = {
        "architectures": [architectures[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if self.model_type != "qwen2":
      out["attention_bias"] = self.attention_bias
    if self.bos_token_id is not None:
      out["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      out["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids))
    return out


# ------------------------------------------------------------------------------------------------
# Presets


def tiny_config(model_type: str = "qwen3", **overrides) -> ModelConfig:
  """A few-thousand-parameter model of the given family, for tests."""
  base = dict(
      model_type=model_type,
      vocab_size=97,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      rope_theta=10000.0,
      qk_norm=model_type == "qwen3",
      attention_bias=model_type == "qwen2",
      max_position_embeddings=512,
  )
  if model_type == "llama":
    base["rope_scaling"] = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    base["rope_theta"] = 500000.0
  base.update(overrides)
  return ModelConfig(**base)
