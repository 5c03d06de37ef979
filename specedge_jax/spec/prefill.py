"""Prompt prefill: one pure jitted chunk forward over the slot KV cache, used by both engines.

A prompt is written in fixed-size chunks (the chunk size is the static shape), causally, after the
rows already written; the host-side driver that walks a prompt chunk by chunk is
`engine/prefill.py`. This module never decides slots or rows.

Shapes: see specedge_jax/shapes.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from specedge_jax.models import kv_cache as kv
from specedge_jax.models import sharding
from specedge_jax.models import transformer


@functools.partial(jax.jit, static_argnames=("graphdef", "attend_len"),
                   donate_argnames=("cache",))
def prefill_chunk(graphdef, model_state, cache: kv.KVCache, slot, tokens, start, count,
                  attend_len: int | None = None):
  """Writes `count` tokens (of a fixed-size chunk) at rows start.. of `slot`, causally.

  The chunk size is the static shape (the engine uses a few bucketed sizes), so prompts of any
  length reuse the same compiled function. Rows before `start` are the already-written prefix.

  Args:
    slot: int32 scalar; tokens: [T] int32 (padded); start, count: int32 scalars.
    attend_len: static; attention reads rows [0, attend_len) only (default: all max_len rows).
      It must cover start + count.

  Returns:
    (cache, logits [V] at the last valid token of the chunk).
  """
  model = transformer.bind(graphdef, model_state)
  chunk = tokens.shape[0]
  attend_len = min(attend_len or cache.max_len, cache.max_len)
  offset = jnp.arange(chunk, dtype=jnp.int32)
  live = offset < count
  positions = start + offset
  write_rows = jnp.where(live, positions, kv.DROP_ROW)
  mask = jnp.arange(attend_len)[None, :] <= positions[:, None]
  logits, cache = model(tokens[None], positions[None], mask[None], cache, slot[None],
                        write_rows[None], logits_at=jnp.maximum(count - 1, 0)[None, None])
  return sharding.constrain_cache(cache), logits[0, 0]
