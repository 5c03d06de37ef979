"""Prefill snapshots for replayed benchmark prompts (the reference's `cache_prefill`).

Benchmarks replay the same prompts run after run; on a big target the prompt prefill is a large
share of server time that says nothing about speculation. `CachingTargetEngine` is a
`TargetEngine` that can snapshot a slot's prompt key/values after a prefill and restore them
into a fresh slot by copy. The verifier's `PrefillCache` keys the snapshots by prompt ids.

A snapshot holds the key/value rows of every prompt token but the last, padded to a power-of-two
row count (so the copy compiles once per bucket, not once per prompt length), in host memory. Restoring copies
those rows and then prefills the last prompt token alone: that one-token forward yields the
logits the first token is sampled from, exactly as `TargetEngine.open` samples it (same key,
same sampling parameters), so a restored session continues like a freshly prefilled one.

This module owns only the snapshot/restore path. It opens sessions through `TargetEngine`'s
extension point (`_checked_prompt`, `_open_slot(..., fill)`), so validation, slot bookkeeping and
first-token sampling are the engine's own; `tests/test_serving_engines` pins that a restored
session emits exactly what a prefilled one does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specedge_jax import engine as engine_lib
from specedge_jax.models import kv_cache as kv
from specedge_jax.spec.sampling import SamplingParams

_MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class PrefillSnapshot:
  prompt_ids: tuple[int, ...]
  # Host memory (numpy), as the reference offloads them: device memory is for live slots.
  k: np.ndarray  # [layers, bucket, kv_heads, head_dim]: rows of prompt_ids[:-1]
  v: np.ndarray  # [layers, bucket, kv_heads, head_dim]

  @property
  def rows(self) -> int:
    return len(self.prompt_ids) - 1

  def nbytes(self) -> int:
    return self.k.size * self.k.dtype.itemsize * 2


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
  return kv.KVCache(k=cache.k.at[:, slot, rows].set(k_rows.astype(cache.k.dtype), mode="drop"),
                    v=cache.v.at[:, slot, rows].set(v_rows.astype(cache.v.dtype), mode="drop"))


class CachingTargetEngine(engine_lib.TargetEngine):
  """A TargetEngine with `export_prefill` / `open_from_prefill`. Not thread-safe either."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._prompts: dict[int, tuple[int, ...]] = {}

  def open(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
           max_new_tokens: int) -> tuple[int, int, bool]:
    slot, first, finished = super().open(prompt_ids, sampling, seed, max_new_tokens)
    self._prompts[slot] = tuple(int(t) for t in prompt_ids)
    return slot, first, finished

  def export_prefill(self, slot: int) -> PrefillSnapshot:
    """Snapshots the prompt rows of a slot that was just opened (before any verify)."""
    session = self.session(slot)
    prompt = self._prompts.get(slot)
    if prompt is None or session.generated != 1 or session.prefix_len != len(prompt):
      raise ValueError(f"slot {slot} is not freshly prefilled; snapshot right after open()")
    k, v = jax.device_get(_read_rows(self.cache, jnp.int32(slot),
                                     min(_bucket(len(prompt) - 1), self.max_len)))
    return PrefillSnapshot(prompt_ids=prompt, k=k, v=v)

  def open_from_prefill(self, snapshot: PrefillSnapshot, prompt_ids: Sequence[int],
                        sampling: SamplingParams, seed: int,
                        max_new_tokens: int) -> tuple[int, int, bool]:
    """Like `open`, but copies the snapshot's rows instead of running the prompt forward."""
    prompt = tuple(int(t) for t in prompt_ids)
    if prompt != snapshot.prompt_ids:
      raise ValueError("the snapshot belongs to a different prompt")
    checked = self._checked_prompt(prompt, max_new_tokens)
    layers, _, _, kv_heads, head_dim = self.cache.k.shape
    for name, rows in (("k", snapshot.k), ("v", snapshot.v)):
      if (rows.ndim != 4 or rows.shape[0] != layers or rows.shape[2:] != (kv_heads, head_dim)
          or not snapshot.rows <= rows.shape[1] <= self.max_len):
        raise ValueError(f"snapshot {name} rows have shape {rows.shape}; this engine needs "
                         f"[{layers}, {snapshot.rows}..{self.max_len}, {kv_heads}, {head_dim}]")

    def restore(cache: kv.KVCache, slot: int):
      cache = _write_rows(cache, jnp.int32(slot), jnp.asarray(snapshot.k),
                          jnp.asarray(snapshot.v), jnp.int32(snapshot.rows))
      # The last prompt token alone: its forward gives the first-token logits.
      return engine_lib.prefill(self.graphdef, self.state, cache, slot, prompt[-1:],
                                snapshot.rows, self.chunk_sizes, self.clock)

    slot, first, finished = self._open_slot(checked, sampling, seed, max_new_tokens,
                                            fill=restore)
    self._prompts[slot] = prompt
    return slot, first, finished

  def close(self, slot: int) -> None:
    super().close(slot)
    self._prompts.pop(slot, None)

