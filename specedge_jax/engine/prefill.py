"""The host-side prompt prefill driver shared by both engines.

It feeds a prompt through `spec.prefill.prefill_chunk` in fixed-size chunks, so prompts of any
length reuse a few compiled shapes, and `bucket` pads batch sizes to powers of two for the same
reason. It never decides which slot or rows to use: the engines do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from specedge_jax.engine.clock import DeviceClock
from specedge_jax.models import kv_cache as kv
from specedge_jax.spec import prefill as prefill_lib


def bucket(n: int, limit: int) -> int:
  """The smallest power of two >= n, capped at limit: the padded batch size for n lanes."""
  size = 1
  while size < n:
    size *= 2
  return min(size, limit)


def chunk_sizes(prefill_chunk: int) -> tuple[int, ...]:
  """The two compiled prefill chunk sizes: a short one for the last tokens, and the full one."""
  return tuple(sorted({min(8, prefill_chunk), prefill_chunk}))


def prefill(graphdef, state, cache, slot: int, token_ids: Sequence[int], start: int,
            chunk_sizes: tuple[int, ...], clock: DeviceClock | None = None,
            attend_buckets: tuple[int, ...] | None = None):
  """Writes `token_ids` at rows start.. of `slot` in fixed-size chunks; returns last logits.

  With `attend_buckets` (`kv_cache.attend_buckets`), each chunk attends over the smallest bucket
  of rows that holds it instead of the whole slot."""
  token_ids = np.asarray(token_ids, np.int32)
  position = start
  logits = None
  while position < start + len(token_ids):
    remaining = start + len(token_ids) - position
    chunk = next((c for c in chunk_sizes if c >= remaining), chunk_sizes[-1])
    count = min(chunk, remaining)
    buffer = np.zeros(chunk, np.int32)
    buffer[:count] = token_ids[position - start:position - start + count]
    attend_len = kv.attend_rows(position + chunk, attend_buckets) if attend_buckets else None
    cache, logits = (clock or DeviceClock())(
        prefill_lib.prefill_chunk, graphdef, state, cache, np.int32(slot), buffer,
        np.int32(position), np.int32(count), attend_len=attend_len)
    position += count
  return cache, logits
