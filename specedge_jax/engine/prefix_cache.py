"""Prompt prefill snapshots and their cache (the reference's `cache_prefill`).

Benchmarks replay the same prompts run after run; on a big target the prompt prefill is a large
share of server time that says nothing about speculation. A `PrefillSnapshot` holds the key/value
rows of every prompt token but the last, in host memory, padded to a power-of-two row count (so
the copy compiles once per bucket, not once per prompt length). `TargetEngine.export_prefill`
reads one after an open; `TargetEngine.open_from_prefill` copies it into a fresh slot and then
prefills the last prompt token alone, whose logits give the first token exactly as `open` samples
it. The verifier keeps the snapshots in its LRU (`serving/engine_worker.py`), keyed by prompt ids.

This module owns the snapshot format (and its host arrays, `to_arrays` / `from_arrays`, which the
verifier's on-disk store keeps: `serving/prefill_store.py`) and the jitted row copies; it never
opens a session (the engine does, through its one `_open_slot`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from specedge_jax.models import kv_cache as kv
from specedge_jax.models import sharding

_MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class PrefillSnapshot:
  prompt_ids: tuple[int, ...]
  # Host memory (numpy), as the reference offloads them: device memory is for live slots.
  k: np.ndarray  # [L, S, K, H], S a power-of-two bucket: the rows of prompt_ids[:-1]
  v: np.ndarray  # [L, S, K, H]

  @property
  def rows(self) -> int:
    return len(self.prompt_ids) - 1

  def nbytes(self) -> int:
    return self.k.size * self.k.dtype.itemsize * 2

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The host arrays that, with `prompt_ids`, are the whole snapshot (for a store on disk)."""
    return {"k": self.k, "v": self.v}

  @classmethod
  def from_arrays(cls, prompt_ids, arrays: dict[str, np.ndarray]) -> PrefillSnapshot:
    """Inverse of `to_arrays`; ValueError unless the arrays are a snapshot of `prompt_ids`.

    Only the layout is checked here; whether the rows fit an engine's cache is
    `check_snapshot_fits`, at restore time, as for a snapshot made in this process.
    """
    prompt_ids = tuple(int(t) for t in prompt_ids)
    if set(arrays) != {"k", "v"}:
      raise ValueError(f"a prefill snapshot has arrays k and v, got {sorted(arrays)}")
    k, v = np.asarray(arrays["k"]), np.asarray(arrays["v"])
    if k.ndim != 4 or k.shape != v.shape or k.dtype != v.dtype:
      raise ValueError(f"snapshot k {k.shape} {k.dtype} and v {v.shape} {v.dtype} must be equal "
                       "[L, S, K, H] arrays")
    if not len(prompt_ids) - 1 <= k.shape[1]:
      raise ValueError(f"snapshot has {k.shape[1]} rows; a {len(prompt_ids)}-token prompt needs "
                       f"{len(prompt_ids) - 1}")
    return cls(prompt_ids=prompt_ids, k=k, v=v)


def _bucket(rows: int) -> int:
  size = _MIN_BUCKET
  while size < rows:
    size *= 2
  return size


@functools.partial(jax.jit, static_argnames=("bucket",))
def _read_rows(cache: kv.KVCache, slot: jax.Array, bucket: int) -> tuple[jax.Array, jax.Array]:
  """Rows [0, bucket) of one slot, all layers: ([L, bucket, K, H], [L, bucket, K, H])."""
  return (jax.lax.dynamic_slice_in_dim(cache.k[:, slot], 0, bucket, axis=1),
          jax.lax.dynamic_slice_in_dim(cache.v[:, slot], 0, bucket, axis=1))


@functools.partial(jax.jit, donate_argnames=("cache",))
def _write_rows(cache: kv.KVCache, slot: jax.Array, k_rows: jax.Array, v_rows: jax.Array,
                count: jax.Array) -> kv.KVCache:
  """Writes rows [0, count) of k_rows/v_rows into `slot`, in place (the cache is donated)."""
  bucket = k_rows.shape[1]
  index = jnp.arange(bucket, dtype=jnp.int32)
  rows = jnp.where(index < count, index, kv.DROP_ROW)
  return sharding.constrain_cache(kv.KVCache(k=cache.k.at[:, slot, rows].set(k_rows.astype(cache.k.dtype), mode="drop"),
                    v=cache.v.at[:, slot, rows].set(v_rows.astype(cache.v.dtype), mode="drop")))


def read_snapshot(cache: kv.KVCache, slot: int, prompt_ids: tuple[int, ...],
                  max_len: int) -> PrefillSnapshot:
  """The rows of prompt_ids[:-1] in `slot`, copied to host memory."""
  k, v = jax.device_get(_read_rows(cache, jnp.int32(slot),
                                   min(_bucket(len(prompt_ids) - 1), max_len)))
  return PrefillSnapshot(prompt_ids=tuple(prompt_ids), k=k, v=v)


def check_snapshot_fits(snapshot: PrefillSnapshot, cache: kv.KVCache, max_len: int) -> None:
  """ValueError unless the snapshot's rows have this cache's layer and head shape."""
  layers, _, _, kv_heads, head_dim = cache.k.shape
  for name, rows in (("k", snapshot.k), ("v", snapshot.v)):
    if (rows.ndim != 4 or rows.shape[0] != layers or rows.shape[2:] != (kv_heads, head_dim)
        or not snapshot.rows <= rows.shape[1] <= max_len):
      raise ValueError(f"snapshot {name} rows have shape {rows.shape}; this engine needs "
                       f"[{layers}, {snapshot.rows}..{max_len}, {kv_heads}, {head_dim}]")


def write_snapshot(cache: kv.KVCache, slot: int, snapshot: PrefillSnapshot) -> kv.KVCache:
  """Copies the snapshot's rows into rows [0, snapshot.rows) of `slot` (the cache is donated)."""
  return _write_rows(cache, jnp.int32(slot), jnp.asarray(snapshot.k), jnp.asarray(snapshot.v),
                     jnp.int32(snapshot.rows))
