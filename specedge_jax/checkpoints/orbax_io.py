"""Orbax checkpoints of our parameter tree, and the one loader the launchers call.

Layout of a converted checkpoint directory:

    <dir>/params/                     orbax PyTree checkpoint of the nested parameter dict
    <dir>/specedge_checkpoint.json    {"format", "version", "param_dtype", "model_config"}

The JSON file is written last, after orbax has finalized `params/` (orbax itself writes to a
temporary directory and renames), so a directory with the JSON file is a complete checkpoint.

Memory. Orbax's default numpy handler deep-copies every host array before writing ("a safety
measure against concurrent modification"), which would hold a second copy of the model. We save
through a private type-handler registry whose numpy handler does not copy (tensorstore is told it
may reference the source data) and we wait for the save before returning, so nothing can modify
the arrays meanwhile. Compression is off: weights are high-entropy floats, so zstd saves little
on them while its CPU time grows with the model.

Restore is against an abstract tree (`hf.abstract_params`), so no model is ever
initialized concretely; leaves arrive as host arrays and move to the device one at a time.

This module owns the orbax layout and `load_model`. It never touches HF file formats or the
name map (`hf.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from specedge_jax.checkpoints import hf
from specedge_jax.checkpoints.safetensors_io import CheckpointError, TensorEntry
from specedge_jax.models.model_config import ModelConfig, RopeScaling
from specedge_jax.models.transformer import Transformer

METADATA_FILE = "specedge_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "specedge_jax/orbax"
FORMAT_VERSION = 1

_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}


def _registry() -> Any:
  # A private registry, so the process-wide orbax defaults stay as other code expects them.
  return type_handlers.create_type_handler_registry(
      (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, type_handlers.ArrayHandler()),
  )


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      type_handler_registry=_registry(), use_compression=False))


# ------------------------------------------------------------------------------------------------
# ModelConfig <-> JSON.


def config_to_json(config: ModelConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def config_from_json(data: dict[str, Any]) -> ModelConfig:
  """Inverse of `config_to_json`; unknown or missing fields are an error naming them."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(data) - fields)
  if unknown:
    raise CheckpointError(f"model_config has unknown field(s) {unknown}")
  data = dict(data)
  if "rope_scaling" in data:
    data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
  if "eos_token_ids" in data:
    data["eos_token_ids"] = tuple(data["eos_token_ids"])
  try:
    return ModelConfig(**data)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"model_config is not a valid ModelConfig: {e}") from e


# ------------------------------------------------------------------------------------------------
# Save / restore.


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(path, METADATA_FILE))


def check_writable(path: str | os.PathLike, overwrite: bool) -> None:
  """Fails unless `path` is absent, empty, or (with `overwrite`) one of our checkpoints."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise CheckpointError(f"{path} exists and is not a directory")
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise CheckpointError(f"{path} exists and is not empty (overwrite it with overwrite=True / --overwrite)")
    if not is_orbax_checkpoint(path):
      raise CheckpointError(f"refusing to overwrite {path}: it is not a specedge orbax checkpoint")


def save(path: str | os.PathLike, config: ModelConfig, params: dict, *,
         overwrite: bool = False) -> None:
  """Writes `params` (nested dict of numpy or jax arrays, as from `load_hf_params`) and `config`.

  All leaves must share one floating dtype; it is recorded as the checkpoint's `param_dtype`.
  """
  path = os.path.abspath(path)
  dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
  if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_NAMES:
    raise CheckpointError(f"parameters must share one of {sorted(_DTYPE_NAMES.values())}; "
                          f"got {sorted(str(d) for d in dtypes)}")
  expected = jax.tree.map(lambda a: tuple(a.shape), hf.abstract_params(config))
  have = jax.tree.map(lambda a: tuple(a.shape), params)
  if expected != have:
    raise CheckpointError("parameter tree does not match the config's model "
                          f"(e.g. structure or shapes differ at {_first_difference(expected, have)})")
  check_writable(path, overwrite)
  if is_orbax_checkpoint(path):
    os.remove(os.path.join(path, METADATA_FILE))  # invalidate first: a crash leaves no marker
  os.makedirs(path, exist_ok=True)
  _checkpointer().save(os.path.join(path, PARAMS_DIR), args=ocp.args.PyTreeSave(params),
                       force=overwrite)
  metadata = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "param_dtype": _DTYPE_NAMES[next(iter(dtypes))],
      "model_config": config_to_json(config),
  }
  tmp = os.path.join(path, METADATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(metadata, f, indent=2)
  os.replace(tmp, os.path.join(path, METADATA_FILE))


def _first_difference(expected, have) -> str:
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_have = dict(jax.tree_util.tree_flatten_with_path(have)[0])
  for key in sorted(set(flat_expected) | set(flat_have), key=str):
    if flat_expected.get(key) != flat_have.get(key):
      return (f"{jax.tree_util.keystr(key)}: model {flat_expected.get(key)}, "
              f"given {flat_have.get(key)}")
  return "the tree structure"


def read_metadata(path: str | os.PathLike) -> tuple[ModelConfig, str]:
  """The (config, param dtype name) of an orbax checkpoint directory."""
  meta_path = os.path.join(path, METADATA_FILE)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(f"{path} is not a specedge orbax checkpoint (no {METADATA_FILE})") from e
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{meta_path} is not a {FORMAT} metadata file")
  if meta.get("version") != FORMAT_VERSION:
    raise CheckpointError(f"{meta_path} has format version {meta.get('version')!r}; this code "
                          f"reads version {FORMAT_VERSION}")
  if meta.get("param_dtype") not in _DTYPE_NAMES.values():
    raise CheckpointError(f"{meta_path}: unknown param_dtype {meta.get('param_dtype')!r}")
  return config_from_json(meta.get("model_config") or {}), meta["param_dtype"]


def restore_params(path: str | os.PathLike, dtype: str | None = None,
                   sharding: jax.sharding.Sharding | None = None,
                   sharding_for: ShardingFor | None = None) -> tuple[ModelConfig, dict]:
  """Restores (config, params as jax arrays) against an abstract tree; nothing is initialized.

  Leaves are read as host arrays and then moved to `sharding` one at a time, each host copy
  dropped as it goes. Restoring straight to jax arrays lets orbax hold a host buffer and a
  device buffer of every array at once, so its peak memory is well above this way's (figures:
  docs/notes/foundation.md).

  Args:
    path: a directory written by `save`.
    dtype: cast parameters to this dtype while reading (e.g. "bf16"); default: as saved.
    sharding: where the arrays live; default: the first local device.
    sharding_for: or a placement per leaf, `(config, key path, shape) -> Sharding`
      (`models.sharding.placement_for(mesh)`), so that a sharded target is never whole on one
      device.
  """
  path = os.path.abspath(path)
  config, saved_dtype = read_metadata(path)
  if (dtype or saved_dtype) not in hf.DTYPES:
    raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {sorted(hf.DTYPES)}")
  np_dtype = np.dtype(hf.DTYPES[dtype or saved_dtype])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np_dtype),
                          hf.abstract_params(config))
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np_dtype), abstract)
  try:
    params = _checkpointer().restore(
        os.path.join(path, PARAMS_DIR),
        args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"cannot restore {path} as a {config.model_type} model with "
                          f"{config.num_layers} layers: {e}") from e
  for (key, want), have in zip(jax.tree_util.tree_leaves_with_path(abstract),
                               jax.tree.leaves(params)):
    if tuple(have.shape) != tuple(want.shape):
      raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(key)} has shape "
                            f"{tuple(have.shape)}; the config's model expects {want.shape}")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return config, _to_device_consuming(params, sharding, _bound(sharding_for, config))


# ------------------------------------------------------------------------------------------------
# Conversion and the launchers' loader.


def convert_hf(hf_dir: str, out_dir: str, dtype: str = "bf16", *, overwrite: bool = False,
               on_tensor: Callable[[TensorEntry], None] | None = None,
               on_saving: Callable[[], None] | None = None) -> ModelConfig:
  """HF folder -> orbax checkpoint, holding one copy of the model (in `dtype`) at a time.

  `on_tensor(entry)` follows each tensor read; `on_saving()` marks the start of the orbax write.
  """
  check_writable(out_dir, overwrite)  # fail before reading tens of GB, not after
  config, params = hf.load_hf_params(hf_dir, dtype=dtype, on_tensor=on_tensor)
  if on_saving:
    on_saving()
  save(out_dir, config, params, overwrite=overwrite)
  return config


def checkpoint_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
  """(config, stored parameter dtype name) of an orbax dir or an HF folder, reading no weight:
  what the verifier's memory planner needs before it loads anything."""
  path = os.fspath(path)
  if is_orbax_checkpoint(path):
    return read_metadata(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return hf.hf_config(path), "fp32"  # load_model's default for HF folders
  raise CheckpointError(f"{path} is neither a specedge orbax checkpoint ({METADATA_FILE}) nor "
                        "an HF folder (config.json)")


def load_model(path: str | os.PathLike, dtype: str | None = None,
               compute_dtype: Any = None,
               sharding_for: ShardingFor | None = None) -> Transformer:
  """A live `Transformer` from EITHER an orbax checkpoint dir (ours) OR an HF folder.

  Args:
    path: a directory written by `save` / `launch.convert`, or an HF folder with config.json and
      model.safetensors (or an index and shards).
    dtype: parameter dtype ("fp32", "bf16", "fp16"); default: as stored (orbax) or fp32 (HF).
    compute_dtype: activation dtype; default: the parameter dtype.
    sharding_for: place each leaf as it is read (see `restore_params`); default: device 0.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  if is_orbax_checkpoint(path):
    config, params = restore_params(path, dtype=dtype, sharding_for=sharding_for)
  elif os.path.isfile(os.path.join(path, "config.json")):
    config, params = hf.load_hf_params(path, dtype=dtype or "fp32")
    # Move leaves to the device one at a time, dropping each host copy as we go.
    params = _to_device_consuming(params, None, _bound(sharding_for, config))
  else:
    raise CheckpointError(f"{path} is neither a specedge orbax checkpoint ({METADATA_FILE}) nor "
                          "an HF folder (config.json)")
  compute = compute_dtype or jax.tree.leaves(params)[0].dtype
  return hf.build_model(config, params, dtype=compute)


# (config, key path of a parameter leaf, its shape) -> where the leaf goes.
ShardingFor = Callable[[ModelConfig, tuple, tuple[int, ...]], jax.sharding.Sharding]


def _bound(sharding_for: ShardingFor | None, config: ModelConfig):
  return None if sharding_for is None else functools.partial(sharding_for, config)


def _to_device_consuming(tree: dict, sharding: jax.sharding.Sharding | None = None,
                         sharding_for=None, path: tuple = ()) -> dict:
  """Replaces each host leaf of `tree` (in place) by a device array, one leaf at a time, at
  `sharding_for(key path, shape)` when given, else at `sharding`.

  The caller must hold no other reference to the host arrays, or they are not freed.
  """
  for key, value in tree.items():
    key_path = path + (jax.tree_util.DictKey(key),)
    if isinstance(value, dict):
      tree[key] = _to_device_consuming(value, sharding, sharding_for, key_path)
    else:
      where = sharding_for(key_path, tuple(value.shape)) if sharding_for else sharding
      tree[key] = jax.device_put(value, where)
    del value
  return tree
