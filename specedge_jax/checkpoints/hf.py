"""HF checkpoint interop: a declarative tensor-name map, HF folder loading, and export.

HF folders (`config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`) map onto our stacked parameter tree by the rules in `NAME_MAP`.
Reading is streaming: each tensor is located from the safetensors header, shape-checked, and read
with plain file reads straight into a preallocated stacked buffer of the target dtype (through a
one-tensor buffer when it needs a transpose or a cast), so conversion never holds two copies of
the model. Unknown, missing and mis-shaped tensors, and shards that disagree with their index,
fail with a `CheckpointError` that names the tensor.

This module owns the name map and the HF folder layout (config, shards, index); the safetensors
file format is `safetensors_io.py`, orbax save/restore `orbax_io.py`. Building a live
`Transformer` from a parameter tree lives here (`build_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from specedge_jax.checkpoints.safetensors_io import (
  CheckpointError,
  TensorEntry,
  read_into,
  read_tensor,
  safetensors_entries,
  write_safetensors,
)
from specedge_jax.models.model_config import ModelConfig
from specedge_jax.models.transformer import Transformer

DTYPES = {"fp32": np.float32, "float32": np.float32, "bf16": ml_dtypes.bfloat16,
          "bfloat16": ml_dtypes.bfloat16, "fp16": np.float16, "float16": np.float16}

# HF tensors that carry no parameters (recomputed buffers in older checkpoints).
IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")



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


def _read_index(index: str) -> dict[str, str]:
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index} is malformed (want {{\"weight_map\": {{name: file}}}}): "
                          f"{e!r}") from e
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
  return weight_map


def hf_weight_files(folder: str) -> list[str]:
  """The safetensors files of an HF folder: single file, or the shards of the index."""
  if not os.path.isdir(folder):
    raise CheckpointError(f"HF folder {folder} does not exist or is not a directory")
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.isfile(index):
    files = sorted(set(_read_index(index).values()))
    paths = [os.path.join(folder, name) for name in files]
    for p in paths:
      if not os.path.isfile(p):
        raise CheckpointError(f"shard {p} listed in {index} does not exist")
    return paths
  if os.path.isfile(single):
    return [single]
  raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def hf_tensor_entries(folder: str) -> list[TensorEntry]:
  """Every tensor of an HF folder (headers only). Shards must agree with the index."""
  entries = [e for path in hf_weight_files(folder) for e in safetensors_entries(path)]
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_index(index)
    found = set()
    for e in entries:
      listed = weight_map.get(e.name)
      if listed != os.path.basename(e.path):
        where = f"lists it in {listed}" if listed else "does not list it"
        raise CheckpointError(f"tensor {e.name!r} is in {e.path} but {index} {where}")
      found.add(e.name)
    absent = sorted(set(weight_map) - found)
    if absent:
      raise CheckpointError(f"tensor {absent[0]!r} is listed in {index} ({weight_map[absent[0]]})"
                            f" but is not in that shard" + (f" (and {len(absent) - 1} more)"
                                                            if len(absent) > 1 else ""))
  return entries


def hf_config(folder: str) -> ModelConfig:
  """The `ModelConfig` of an HF folder; a missing or malformed config.json is a CheckpointError."""
  try:
    return ModelConfig.from_hf_folder(folder)
  except FileNotFoundError as e:
    raise CheckpointError(str(e)) from e
  except (ValueError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{os.path.join(folder, 'config.json')} is not a usable model config: "
                          f"{e}") from e


def _shape_after(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  # Apply the transform to a zero-stride stand-in, so shapes are checked before any byte is read.
  stand_in = np.broadcast_to(np.zeros((), np.uint8), shape)
  return tuple((rule.to_ours(stand_in) if rule.to_ours else stand_in).shape)


def load_hf_params(
    folder: str,
    config: ModelConfig | None = None,
    dtype: str | np.dtype = "fp32",
    on_tensor: Callable[[TensorEntry], None] | None = None,
) -> tuple[ModelConfig, dict]:
  """Reads an HF folder into our stacked parameter tree (nested dict of numpy arrays).

  Streaming: each output array is allocated once in the target dtype, and each HF tensor is read
  straight into its slot there (or, when it needs a transpose or a dtype cast, through a buffer of
  that one tensor). Peak memory is therefore one model in the target dtype plus one tensor.

  Every tensor is checked against the name map and the expected shape before it is read, and
  every expected tensor must be present; otherwise `CheckpointError` names the tensor.
  `on_tensor(entry)` is called after each tensor is placed (progress reporting).
  """
  config = config or hf_config(folder)
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    np_dtype = np.dtype(DTYPES[dtype])
  else:
    np_dtype = np.dtype(dtype)
  rules = active_rules(config)
  expected = jax.tree.map(lambda a: tuple(a.shape), abstract_params(config))
  params: dict[str, Any] = {}
  seen: set[str] = set()
  entries = hf_tensor_entries(folder)
  open_files: dict[str, Any] = {}
  try:
    for entry in entries:
      name = entry.name
      if IGNORED_HF_TENSORS.match(name) or (config.tie_word_embeddings
                                            and name == "lm_head.weight"):
        # Tied: the head is the embedding; some exports (Qwen3-1.7B) store a copy anyway.
        if on_tensor:
          on_tensor(entry)
        continue
      match = match_hf_name(name, rules)
      if match is None:
        raise CheckpointError(f"unknown tensor {name!r} in {entry.path}: no rule in the name map "
                              f"for model_type={config.model_type!r}")
      rule, layer = match
      if name in seen:
        raise CheckpointError(f"tensor {name!r} appears twice")
      seen.add(name)
      full_shape = _get(expected, rule.ours)
      if rule.per_layer:
        if not 0 <= layer < config.num_layers:
          raise CheckpointError(f"tensor {name!r}: layer {layer} is out of range "
                                f"(model has {config.num_layers} layers)")
        want = full_shape[1:]
      else:
        want = full_shape
      if _shape_after(rule, entry.shape) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {entry.shape}; expected "
                              f"{tuple(want)} after transform (model shape {full_shape})")
      try:
        dest = _get(params, rule.ours)
      except KeyError:
        dest = np.empty(full_shape, np_dtype)
        _set(params, rule.ours, dest)
      target = dest[layer] if rule.per_layer else dest  # a contiguous view
      if entry.path not in open_files:
        open_files[entry.path] = open(entry.path, "rb", buffering=0)
      file = open_files[entry.path]
      if rule.to_ours is None and entry.dtype == np_dtype:
        read_into(file, entry, target)  # no transform, no cast: straight into the output
      else:
        array = read_tensor(file, entry)
        target[...] = rule.to_ours(array) if rule.to_ours else array
        del array
      if on_tensor:
        on_tensor(entry)
  finally:
    for file in open_files.values():
      file.close()
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
  """Yields (HF name, array in HF layout) for every tensor of `params`, one at a time."""
  for rule in active_rules(config):
    stacked = np.asarray(_get(params, rule.ours))
    layers = range(config.num_layers) if rule.per_layer else [None]
    for layer in layers:
      value = stacked[layer] if rule.per_layer else stacked
      value = rule.to_hf(value) if rule.to_hf else value
      name = rule.hf.format(layer=layer) if rule.per_layer else rule.hf
      yield name, np.ascontiguousarray(value)




def save_hf(folder: str, config: ModelConfig, params: dict, dtype: str = "fp32") -> None:
  """Writes `config.json` and `model.safetensors` that transformers can load (streaming)."""
  os.makedirs(folder, exist_ok=True)
  np_dtype = np.dtype(DTYPES[dtype])
  specs = [(name, value.shape, np_dtype) for name, value in
           hf_shapes(config, jax.tree.map(lambda a: tuple(a.shape), params))]
  write_safetensors(os.path.join(folder, "model.safetensors"), specs, hf_tensors(config, params),
                    metadata={"format": "pt"})
  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                              np.dtype(ml_dtypes.bfloat16): "bfloat16"}[np_dtype]
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)


def hf_shapes(config: ModelConfig, shapes: dict) -> Iterator[tuple[str, np.ndarray]]:
  """Like `hf_tensors`, on zero-stride stand-ins: HF names and shapes, nothing allocated."""
  stand_ins = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.uint8), s), shapes,
                           is_leaf=lambda x: isinstance(x, tuple))
  for rule in active_rules(config):
    stacked = _get(stand_ins, rule.ours)
    for layer in (range(config.num_layers) if rule.per_layer else [None]):
      value = stacked[layer] if rule.per_layer else stacked
      yield (rule.hf.format(layer=layer) if rule.per_layer else rule.hf,
             rule.to_hf(value) if rule.to_hf else value)
