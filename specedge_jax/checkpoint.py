"""HF checkpoint interop: a declarative tensor-name map, streaming safetensors reads, and export.

HF folders (`config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`) map onto our stacked parameter tree by the rules in `NAME_MAP`.
Reading is streaming: each tensor is memory-mapped from its file, transformed, and copied into a
preallocated stacked buffer of the target dtype, so conversion never holds two copies of the
model. Unknown, missing and mis-shaped tensors fail with an error that names the tensor.

This module owns the name map and the HF file formats. Orbax save/restore lives in
`orbax_io.py`; building a live `Transformer` from a parameter tree lives here (`build_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from specedge_jax.config import ModelConfig
from specedge_jax.model import Transformer

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPES = {"fp32": np.float32, "float32": np.float32, "bf16": ml_dtypes.bfloat16,
          "bfloat16": ml_dtypes.bfloat16, "fp16": np.float16, "float16": np.float16}

# HF tensors that carry no parameters (recomputed buffers in older checkpoints).
IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
  """A checkpoint does not match the model: names the offending tensor or file."""


# ------------------------------------------------------------------------------------------------
# The declarative name map.


def _transpose(x: np.ndarray) -> np.ndarray:
  return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor name pattern and where it goes in our parameter tree.

  `hf` may contain `{layer}`; such tensors are stacked along a leading layer axis of `ours`.
  `to_ours` transforms the HF array into our layout (e.g. torch Linear [out, in] -> [in, out]);
  `to_hf` is its inverse, used on export.
  """

  hf: str
  ours: tuple[str, ...]
  to_ours: Callable[[np.ndarray], np.ndarray] | None = None
  to_hf: Callable[[np.ndarray], np.ndarray] | None = None
  when: Callable[[ModelConfig], bool] = lambda c: True

  @property
  def per_layer(self) -> bool:
    return "{layer}" in self.hf


_LINEAR = dict(to_ours=_transpose, to_hf=_transpose)
_qk_norm = lambda c: c.qk_norm  # noqa: E731
_biased = lambda c: c.attention_bias  # noqa: E731
_untied = lambda c: not c.tie_word_embeddings  # noqa: E731

NAME_MAP: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed", "embedding")),
    Rule("model.norm.weight", ("final_norm", "scale")),
    Rule("lm_head.weight", ("lm_head", "kernel"), **_LINEAR, when=_untied),
    Rule("model.layers.{layer}.input_layernorm.weight", ("layers", "input_norm", "scale")),
    Rule("model.layers.{layer}.post_attention_layernorm.weight",
         ("layers", "post_attn_norm", "scale")),
    *(Rule(f"model.layers.{{layer}}.self_attn.{p}.weight", ("layers", "attn", p, "kernel"),
           **_LINEAR) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(Rule(f"model.layers.{{layer}}.self_attn.{p}.bias", ("layers", "attn", p, "bias"),
           when=_biased) for p in ("q_proj", "k_proj", "v_proj")),
    *(Rule(f"model.layers.{{layer}}.self_attn.{p}.weight", ("layers", "attn", p, "scale"),
           when=_qk_norm) for p in ("q_norm", "k_norm")),
    *(Rule(f"model.layers.{{layer}}.mlp.{p}.weight", ("layers", "mlp", p, "kernel"), **_LINEAR)
      for p in ("gate_proj", "up_proj", "down_proj")),
)


def active_rules(config: ModelConfig) -> list[Rule]:
  return [r for r in NAME_MAP if r.when(config)]


def _rule_regex(rule: Rule) -> re.Pattern:
  return re.compile("^" + re.escape(rule.hf).replace(r"\{layer\}", r"(\d+)") + "$")


def match_hf_name(name: str, rules: list[Rule]) -> tuple[Rule, int | None] | None:
  for rule in rules:
    m = _rule_regex(rule).match(name)
    if m:
      return rule, (int(m.group(1)) if rule.per_layer else None)
  return None


# ------------------------------------------------------------------------------------------------
# Parameter-tree helpers.


def abstract_params(config: ModelConfig, param_dtype=jnp.float32) -> dict:
  """The parameter tree as ShapeDtypeStructs (nested dict), built without allocating."""
  abstract = nnx.eval_shape(lambda: Transformer(config, param_dtype=param_dtype,
                                                rngs=nnx.Rngs(0)))
  return nnx.state(abstract, nnx.Param).to_pure_dict()


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def params_of(model: Transformer) -> dict:
  """The model's parameters as a nested dict of arrays."""
  return nnx.state(model, nnx.Param).to_pure_dict()


def build_model(config: ModelConfig, params: dict, *, dtype=jnp.float32) -> Transformer:
  """A live `Transformer` holding `params` (nested dict as from `load_hf_params`)."""
  param_dtype = jax.tree.leaves(params)[0].dtype
  abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, param_dtype=param_dtype,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = nnx.state(abstract, nnx.Param).to_pure_dict()
  if jax.tree.structure(expected) != jax.tree.structure(params):
    raise CheckpointError("parameter tree does not match the model's structure")
  for (path, exp), have in zip(jax.tree_util.tree_leaves_with_path(expected),
                               jax.tree.leaves(params)):
    if tuple(exp.shape) != tuple(have.shape):
      raise CheckpointError(f"parameter {jax.tree_util.keystr(path)} has shape "
                            f"{tuple(have.shape)}, model expects {tuple(exp.shape)}")
  state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------
# Reading safetensors, streaming.


def _read_safetensors_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw_len = f.read(8)
    if len(raw_len) != 8:
      raise CheckpointError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw_len)
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} has a malformed safetensors header: {e}") from e
  header.pop("__metadata__", None)
  return header, 8 + header_len


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for each tensor of a safetensors file, memory-mapped, one at a time.

  Memory-mapping reads pages on demand, so a caller that copies each array into its destination
  and drops it holds at most one tensor beyond its output. bf16 is read through `ml_dtypes`
  (safetensors' numpy backend cannot return bf16).
  """
  header, data_start = _read_safetensors_header(path)
  mapped = np.memmap(path, dtype=np.uint8, mode="r")
  for name, info in header.items():
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    yield name, mapped[data_start + begin:data_start + end].view(dtype).reshape(info["shape"])


def hf_weight_files(folder: str) -> list[str]:
  """The safetensors files of an HF folder: single file, or the shards of the index."""
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is malformed: {e}") from e
    files = sorted(set(weight_map.values()))
    paths = [os.path.join(folder, name) for name in files]
    for p in paths:
      if not os.path.isfile(p):
        raise CheckpointError(f"shard {p} listed in {index} does not exist")
    return paths
  if os.path.isfile(single):
    return [single]
  raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def load_hf_params(folder: str, config: ModelConfig | None = None,
                   dtype: str | np.dtype = "fp32") -> tuple[ModelConfig, dict]:
  """Reads an HF folder into our stacked parameter tree (nested dict of numpy arrays).

  Every tensor is checked against the name map and the expected shape; every expected tensor
  must be present. Raises `CheckpointError` naming the tensor otherwise.
  """
  config = config or ModelConfig.from_hf_folder(folder)
  np_dtype = DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
  rules = active_rules(config)
  expected = jax.tree.map(lambda a: tuple(a.shape), abstract_params(config))
  params: dict[str, Any] = {}
  seen: set[str] = set()
  for path in hf_weight_files(folder):
    for name, array in iter_safetensors(path):
      if IGNORED_HF_TENSORS.match(name):
        continue
      if config.tie_word_embeddings and name == "lm_head.weight":
        continue  # tied: the head is the embedding; some exports store a copy anyway.
      match = match_hf_name(name, rules)
      if match is None:
        raise CheckpointError(f"unknown tensor {name!r} in {path}: no rule in the name map "
                              f"for model_type={config.model_type!r}")
      rule, layer = match
      if name in seen:
        raise CheckpointError(f"tensor {name!r} appears twice")
      seen.add(name)
      full_shape = _get(expected, rule.ours)
      value = rule.to_ours(array) if rule.to_ours else array
      if rule.per_layer:
        if not 0 <= layer < config.num_layers:
          raise CheckpointError(f"tensor {name!r}: layer {layer} is out of range "
                                f"(model has {config.num_layers} layers)")
        want = full_shape[1:]
      else:
        want = full_shape
      if tuple(value.shape) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}; expected "
                              f"{tuple(want)} after transform (model shape {full_shape})")
      try:
        dest = _get(params, rule.ours)
      except KeyError:
        dest = np.empty(full_shape, np_dtype)
        _set(params, rule.ours, dest)
      if rule.per_layer:
        dest[layer] = value
      else:
        dest[...] = value
  missing = []
  for rule in rules:
    layers = range(config.num_layers) if rule.per_layer else [None]
    for layer in layers:
      name = rule.hf.format(layer=layer) if rule.per_layer else rule.hf
      if name not in seen:
        missing.append(name)
  if missing:
    shown = ", ".join(repr(m) for m in missing[:5])
    raise CheckpointError(f"{len(missing)} tensor(s) missing from {folder}: {shown}"
                          + (" ..." if len(missing) > 5 else ""))
  return config, params


def load_hf_model(folder: str, dtype: str = "fp32", compute_dtype=None) -> Transformer:
  """Loads an HF folder straight into a live model (no orbax step)."""
  config, params = load_hf_params(folder, dtype=dtype)
  compute = compute_dtype or jax.tree.leaves(params)[0].dtype
  return build_model(config, params, dtype=compute)


# ------------------------------------------------------------------------------------------------
# Export.


def hf_tensors(config: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array in HF layout) for every tensor of `params`."""
  for rule in active_rules(config):
    stacked = np.asarray(_get(params, rule.ours))
    layers = range(config.num_layers) if rule.per_layer else [None]
    for layer in layers:
      value = stacked[layer] if rule.per_layer else stacked
      value = rule.to_hf(value) if rule.to_hf else value
      name = rule.hf.format(layer=layer) if rule.per_layer else rule.hf
      yield name, np.ascontiguousarray(value)


def save_hf(folder: str, config: ModelConfig, params: dict, dtype: str = "fp32") -> None:
  """Writes `config.json` and `model.safetensors` that transformers can load."""
  from safetensors.numpy import save_file  # local: only export needs the writer

  os.makedirs(folder, exist_ok=True)
  np_dtype = DTYPES[dtype]
  tensors = {name: value.astype(np_dtype) for name, value in hf_tensors(config, params)}
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = {np.float32: "float32", np.float16: "float16",
                              ml_dtypes.bfloat16: "bfloat16"}[np_dtype]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
