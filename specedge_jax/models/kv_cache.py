"""The slot-based KV cache: a fixed-shape pytree, and the jitted functions that move its rows.

Layout. Keys and values of all layers are stacked into one array each:

    k, v: [L, M, S, K, H]   (layers, slots, max_len rows, kv heads, head dim)

A *slot* holds one live request. Row `r` of a slot holds the key/value of the token the request
placed at cache row `r`. Rows at or beyond a request's committed length are garbage and must be
masked out by whoever builds the attention mask; the cache itself keeps no lengths.

Dropped writes. Every write in this project uses `mode="drop"` scatters, so a write index of
`max_len` or more (see `DROP_ROW`) writes nothing. Padded tokens and padded batch lanes use it and
therefore never touch a live slot.

Shapes: see specedge_jax/shapes.py.

This module owns the layout and row movement. It never decides *which* rows are valid: the tree,
draft and verify modules do that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from specedge_jax.models.model_config import ModelConfig

# A row index past any cache length: scatters with mode="drop" ignore it. int32 max keeps it
# out of range for every cache size.
DROP_ROW = jnp.iinfo(jnp.int32).max


@struct.dataclass
class KVCache:
  k: jax.Array  # [L, M, S, K, H]
  v: jax.Array  # [L, M, S, K, H]

  @classmethod
  def init(cls, config: ModelConfig, num_slots: int, max_len: int,
           dtype: jnp.dtype = jnp.float32) -> "KVCache":
    shape = (config.num_layers, num_slots, max_len, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def num_slots(self) -> int:
    return self.k.shape[1]

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def nbytes(self) -> int:
    return self.k.size * self.k.dtype.itemsize * 2


def attend_buckets(max_len: int, min_rows: int) -> tuple[int, ...]:
  """The attended-row counts a cache of `max_len` rows compiles for: min_rows, 2 min_rows, 4 ...
  up to max_len (always included). `min_rows` >= max_len gives the single bucket max_len, i.e.
  attention over every row. A fixed, logarithmic set, so the compile count stays small."""
  if min_rows < 1:
    raise ValueError(f"the smallest attention bucket must be >= 1 rows, got {min_rows}")
  sizes, size = [], min_rows
  while size < max_len:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (max_len,)


def attend_rows(needed: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket that holds `needed` rows (the longest live prefix plus new tokens in a
  batch); the largest bucket when none does (writes past it are dropped anyway)."""
  return next((b for b in buckets if b >= needed), buckets[-1])


def reachable_buckets(buckets: tuple[int, ...], min_needed: int) -> tuple[int, ...]:
  """The buckets `attend_rows` can return when at least `min_needed` rows are needed (what an
  engine's warm-up compiles)."""
  return tuple(b for b in buckets if b >= min_needed) or buckets[-1:]


def write_layer(cache_layers: jax.Array, layer: jax.Array, slots: jax.Array, rows: jax.Array,
                values: jax.Array) -> jax.Array:
  """Writes new rows of one layer into a stacked cache array.

  Args:
    cache_layers: [L, M, S, K, H].
    layer: scalar int, the layer to write.
    slots: [B] slot of each batch lane.
    rows: [B, T] cache row of each new token; `DROP_ROW` (or any row >= max_len) writes nothing.
    values: [B, T, K, H].
  """
  return cache_layers.at[layer, slots[:, None], rows].set(
      values.astype(cache_layers.dtype), mode="drop")


@functools.partial(jax.jit, donate_argnames=("cache",))
def compact_rows(cache: KVCache, slots: jax.Array, src_rows: jax.Array, dst_start: jax.Array,
                 lengths: jax.Array) -> KVCache:
  """Moves chosen rows of each slot to contiguous rows, in place (the cache is donated).

  For each batch lane b, rows `src_rows[b, :lengths[b]]` of slot `slots[b]` move to rows
  `dst_start[b], dst_start[b] + 1, ...`. Entries past `lengths[b]` are ignored, as are lanes with
  length 0, so padded lanes touch nothing. Rows not written keep their values.

  Args:
    cache: the cache; donated, do not use it after the call.
    slots: [B] int32.
    src_rows: [B, A] int32, e.g. the cache rows of an accepted tree path.
    dst_start: [B] int32, first destination row.
    lengths: [B] int32, how many rows to move, at most A.

  Returns:
    The updated cache.
  """
  path_len = src_rows.shape[1]  # A
  steps = jnp.arange(path_len, dtype=jnp.int32)[None, :]
  dst_rows = jnp.where(steps < lengths[:, None], dst_start[:, None] + steps, DROP_ROW)
  # Gather every layer's rows before scattering any, so overlapping source and destination
  # ranges are safe. One gather and one scatter cover all layers: no loop over layers.
  src = jnp.clip(src_rows, 0, cache.max_len - 1)

  def move(layers):
    moved = layers[:, slots[:, None], src]  # [L, B, A, K, H]
    return layers.at[:, slots[:, None], dst_rows].set(moved, mode="drop")

  return KVCache(k=move(cache.k), v=move(cache.v))
