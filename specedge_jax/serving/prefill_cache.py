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

This module owns only the snapshot/restore path. It relies on `TargetEngine` internals (the free
slot list, the per-slot session record, the chunked prefill helper); `tests/test_serving_engines`
pins that a restored session emits exactly what a prefilled one does. The natural home of these
two methods is `TargetEngine` itself.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specedge_jax import engine as engine_lib
from specedge_jax import kv_cache as kv
from specedge_jax import sampling as sampling_lib
from specedge_jax import verify as verify_lib
from specedge_jax.sampling import SamplingParams

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
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    needed = len(prompt) + max_new_tokens + self.max_tree_nodes
    if needed > self.max_len:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) + "
                       f"tree ({self.max_tree_nodes}) needs {needed} cache rows; this server "
                       f"has {self.max_len}")
    if not self._free:
      raise engine_lib.SlotsExhausted(f"all {self.num_slots} slots are busy")
    slot = self._free.pop(0)
    start = time.perf_counter()
    self.cache = _write_rows(self.cache, jnp.int32(slot), jnp.asarray(snapshot.k),
                             jnp.asarray(snapshot.v), jnp.int32(snapshot.rows))
    # pylint: disable=protected-access (see the module docstring)
    self.cache, logits = engine_lib._prefill(self.graphdef, self.state, self.cache, slot,
                                             prompt[-1:], snapshot.rows, self.chunk_sizes)
    # The first token exactly as TargetEngine.open samples it: stream `seed`, step 0.
    seed = int(seed) & 0xFFFFFFFF
    params = sampling_lib.stack_params([sampling])
    keys = verify_lib.request_keys(np.array([seed], np.uint32), np.array([0], np.int32))
    first = sampling_lib.sample_tokens(logits[None, None], keys, params["temperature"],
                                       params["top_p"], params["top_k"])
    first = int(first[0, 0])
    self.last_forward_s = time.perf_counter() - start
    finished = first in self.eos_token_ids or max_new_tokens == 1
    self._sessions[slot] = engine_lib._TargetSession(
        prefix_len=len(prompt), root=first, sampling=sampling, seed=seed, step=1, generated=1,
        max_new_tokens=max_new_tokens, finished=finished)
    self._prompts[slot] = prompt
    return slot, first, finished

  def close(self, slot: int) -> None:
    super().close(slot)
    self._prompts.pop(slot, None)

