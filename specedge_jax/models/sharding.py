"""Tensor-parallel placement of the target's weights and KV cache on a `jax.sharding.Mesh`.

The verifier shards with XLA's own SPMD partitioner: this module only says where each array
lives (a `NamedSharding` per leaf), and the jitted verify and prefill, unchanged, are partitioned
by XLA from those input shardings. The mesh has two named axes:

- `model`: tensor parallelism, Megatron-style. The column-parallel projections (q, k, v, gate,
  up) split their output features, i.e. whole attention heads and slices of the MLP's hidden
  dimension; the row-parallel ones (o, down) split their input features, so each layer needs
  one all-reduce after attention and one after the MLP. The untied LM head splits the vocabulary.
  The KV cache splits its kv-head axis the same way, so a device attends only with the heads
  it owns and no key or value ever crosses devices. Query head i uses kv head i // G, and both
  splits are contiguous, so a device's query heads map to its own kv heads whenever
  num_kv_heads is a multiple of the axis size (checked).
- `data`: the cache's slot axis, for more slots than one device holds; weights are replicated
  over it. Lanes are not yet placed on the device that holds their slot, so XLA gathers the
  lanes' rows across this axis (see WORKSPACE_NOTES.md, "Sharded verifier").

Norm scales, the embedding table and biases of row-parallel layers are replicated. Stacked
([L, ...]) and per-layer (`transformer.LayerwiseState`) weights get the same placement, with a
replicated layer axis.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specedge_jax.mesh_shape import AXES, MeshError, parse_mesh_shape  # noqa: F401 (re-exported)
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.model_config import ModelConfig

_COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
_ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
CACHE_SPEC = P(None, "data", None, "model", None)  # [L, M, S, K, H]


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
  """A ('data', 'model') mesh over the first data * model devices (default: jax.devices())."""
  devices = list(jax.devices() if devices is None else devices)
  needed = shape["data"] * shape["model"]
  if needed > len(devices):
    raise MeshError(f"mesh {dict(shape)} needs {needed} devices, but {len(devices)} "
                     f"{devices[0].platform if devices else ''} device(s) are visible")
  grid = np.asarray(devices[:needed], dtype=object).reshape(shape["data"], shape["model"])
  return Mesh(grid, AXES)


def mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
  if isinstance(mesh, Mesh):
    return {axis: int(mesh.shape.get(axis, 1)) for axis in AXES}
  return {axis: int(mesh.get(axis, 1)) for axis in AXES}


def check_config(config: ModelConfig, mesh: Mesh | Mapping[str, int],
                 num_slots: int | None = None) -> None:
  """ValueError naming every dimension the mesh does not divide."""
  sizes = mesh_sizes(mesh)
  model, data = sizes["model"], sizes["data"]
  problems = [f"{name} {value} is not a multiple of the model axis {model}"
              for name, value in (("num_attention_heads", config.num_heads),
                                  ("num_key_value_heads", config.num_kv_heads),
                                  ("intermediate_size", config.intermediate_size))
              if value % model]
  if num_slots is not None and num_slots % data:
    problems.append(f"num_slots {num_slots} is not a multiple of the data axis {data}")
  if problems:
    raise MeshError(f"the model cannot be sharded over mesh {sizes}: "
                     + "; ".join(problems))


def _path_names(path) -> list[str]:
  """The string keys of a state leaf's path, without the Variable's own trailing `value`."""
  names = []
  for entry in path:
    name = getattr(entry, "key", getattr(entry, "name", None))
    if isinstance(name, str):
      names.append(name)
  return names[:-1] if names[-1:] == ["value"] else names


def param_spec(path, shape: tuple[int, ...], config: ModelConfig,
               mesh: Mesh | Mapping[str, int]) -> P:
  """The PartitionSpec of one weight, from its path's last two names and its rank."""
  names = _path_names(path)
  module, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", "")
  model = mesh_sizes(mesh)["model"]
  if module in _COLUMN_PARALLEL:
    base = (None, "model") if leaf == "kernel" else ("model",)
  elif module in _ROW_PARALLEL and leaf == "kernel":
    base = ("model", None)
  elif module == "lm_head" and leaf == "kernel" and config.vocab_size % model == 0:
    base = (None, "model")
  else:
    return P()
  if len(shape) < len(base) or math.prod(shape) == 0:  # a LayerwiseState placeholder
    return P()
  return P(*((None,) * (len(shape) - len(base)) + base))


def state_shardings(state, config: ModelConfig, mesh: Mesh):
  """A NamedSharding for every leaf of a model state (nnx.State or LayerwiseState)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, param_spec(path, leaf.shape, config, mesh)), state)


def placement_for(mesh: Mesh):
  """A checkpoint loader's per-leaf placement (`orbax_io.load_model(sharding_for=...)`): each
  weight goes straight to its shards as it is read, so a target too large for one device loads."""

  def sharding_for(config: ModelConfig, path, shape) -> NamedSharding:
    return NamedSharding(mesh, param_spec(path, shape, config, mesh))

  return sharding_for


def cache_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, CACHE_SPEC)


def constrain_cache(cache: kv.KVCache) -> kv.KVCache:
  """Inside jit, under `jax.set_mesh(mesh)` of a ('data', 'model') mesh: pins the cache to its
  input placement. Without it XLA may pick an equivalent but differently written sharding for
  the output (e.g. dropping a size-1 axis), and the next call, seeing new input shardings, would
  compile again; with it, the donated input and the output match buffer for buffer. Without a
  mesh in context it returns the cache untouched."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return cache
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, CACHE_SPEC), cache)


def shard_engine_arrays(config: ModelConfig, mesh: Mesh, state, cache: kv.KVCache):
  """(state, cache) placed on the mesh; the inputs are not used afterwards (device_put may
  alias them)."""
  check_config(config, mesh, cache.num_slots)
  state = jax.device_put(state, state_shardings(state, config, mesh))
  sharding = cache_sharding(mesh)
  cache = kv.KVCache(k=jax.device_put(cache.k, sharding), v=jax.device_put(cache.v, sharding))
  return state, cache


def shard_shape(shape: tuple[int, ...], spec: P, mesh: Mesh | Mapping[str, int]) -> tuple:
  """The per-device shape of an array of `shape` placed with `spec` (even splits, checked by
  `check_config` for the dimensions this module splits)."""
  sizes = mesh_sizes(mesh)
  out = list(shape)
  for dim, axis in enumerate(tuple(spec)):
    for name in (axis if isinstance(axis, tuple) else (axis,)):
      if name is not None:
        out[dim] = -(-out[dim] // sizes[name])
  return tuple(out)
