"""`kv_cache.compact_rows`: moves exactly the chosen rows, touches nothing else, donates the cache.

The expected cache is computed with a plain numpy loop (gather every source row first, then
write), so overlapping source/destination ranges are checked against their intended meaning.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from specedge_jax.models import kv_cache as kv
from specedge_jax.models.model_config import tiny_config

CONFIG = tiny_config(num_layers=2, num_kv_heads=2, head_dim=4)
SLOTS, MAX_LEN = 4, 16


def random_cache(seed: int) -> kv.KVCache:
  rng = np.random.default_rng(seed)
  shape = (CONFIG.num_layers, SLOTS, MAX_LEN, CONFIG.num_kv_heads, CONFIG.head_dim)
  return kv.KVCache(k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                    v=jnp.asarray(rng.standard_normal(shape), jnp.float32))


def expected_after(k, v, slots, src_rows, dst_start, lengths):
  k, v = np.array(k), np.array(v)
  for b, slot in enumerate(slots):
    n = lengths[b]
    moved_k = k[:, slot, src_rows[b, :n]].copy()  # all reads before any write
    moved_v = v[:, slot, src_rows[b, :n]].copy()
    k[:, slot, dst_start[b]:dst_start[b] + n] = moved_k
    v[:, slot, dst_start[b]:dst_start[b] + n] = moved_v
  return k, v


def run(cache, slots, src_rows, dst_start, lengths):
  args = [jnp.asarray(x, jnp.int32) for x in (slots, src_rows, dst_start, lengths)]
  return kv.compact_rows(cache, *args)


def test_moves_chosen_rows_and_nothing_else():
  cache = random_cache(0)
  before_k, before_v = np.asarray(cache.k), np.asarray(cache.v)
  # Lane 0: an accepted tree path scattered through the slot. Lane 1: overlapping ranges that
  # move rows down by one (row 6 -> 5, 7 -> 6, 8 -> 7). Lane 2: a padded lane (length 0)
  # pointing at a live slot with garbage rows. Slot 3 is in no lane at all.
  slots = np.array([0, 2, 1])
  src_rows = np.array([[5, 9, 12, 13], [6, 7, 8, 0], [3, 2, 1, 0]])
  dst_start = np.array([5, 5, 0])
  lengths = np.array([4, 3, 0])
  after = run(cache, slots, src_rows, dst_start, lengths)
  want_k, want_v = expected_after(before_k, before_v, slots, src_rows, dst_start, lengths)
  np.testing.assert_array_equal(np.asarray(after.k), want_k)
  np.testing.assert_array_equal(np.asarray(after.v), want_v)
  # Spot-check the meaning directly, independent of the reference loop.
  np.testing.assert_array_equal(np.asarray(after.k)[:, 0, 6], before_k[:, 0, 9])
  np.testing.assert_array_equal(np.asarray(after.k)[:, 2, 7], before_k[:, 2, 8])
  np.testing.assert_array_equal(np.asarray(after.k)[:, 2, 8], before_k[:, 2, 8])  # not a dst
  np.testing.assert_array_equal(np.asarray(after.k)[:, 1], before_k[:, 1])  # padded lane
  np.testing.assert_array_equal(np.asarray(after.v)[:, 3], before_v[:, 3])  # untouched slot


def test_overlap_moving_rows_up():
  """Destination after the source (rows 2,3,4 -> 3,4,5): a naive in-order copy would smear."""
  cache = random_cache(1)
  before_k = np.asarray(cache.k)
  after = run(cache, [1], [[2, 3, 4]], [3], [3])
  np.testing.assert_array_equal(np.asarray(after.k)[:, 1, 3:6], before_k[:, 1, 2:5])
  np.testing.assert_array_equal(np.asarray(after.k)[:, 1, :3], before_k[:, 1, :3])
  np.testing.assert_array_equal(np.asarray(after.k)[:, 1, 6:], before_k[:, 1, 6:])


def test_entries_past_length_are_ignored_even_if_out_of_range():
  cache = random_cache(2)
  before_k = np.asarray(cache.k)
  # Junk past the length (row 999, a destination past max_len) must not matter.
  after = run(cache, [0], [[4, 999, 999]], [MAX_LEN - 1], [1])
  want = before_k.copy()
  want[:, 0, MAX_LEN - 1] = before_k[:, 0, 4]
  np.testing.assert_array_equal(np.asarray(after.k), want)


def test_input_cache_is_donated():
  cache = random_cache(3)
  after = run(cache, [0], [[1]], [0], [1])
  jax.block_until_ready(after)
  assert cache.k.is_deleted() and cache.v.is_deleted()
  assert not after.k.is_deleted()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_matches_reference_on_random_batches(data):
  batch = data.draw(st.integers(1, 4))
  path = data.draw(st.integers(1, 6))
  slots = data.draw(st.lists(st.integers(0, SLOTS - 1), min_size=batch, max_size=batch,
                             unique=True))
  lengths = [data.draw(st.integers(0, path)) for _ in range(batch)]
  dst_start = [data.draw(st.integers(0, MAX_LEN - n)) for n in lengths]
  src_rows = [data.draw(st.lists(st.integers(0, MAX_LEN - 1), min_size=path, max_size=path))
              for _ in range(batch)]
  cache = random_cache(4)
  before_k, before_v = np.asarray(cache.k), np.asarray(cache.v)
  after = run(cache, slots, src_rows, dst_start, lengths)
  want_k, want_v = expected_after(before_k, before_v, np.array(slots), np.array(src_rows),
                                  np.array(dst_start), np.array(lengths))
  np.testing.assert_array_equal(np.asarray(after.k), want_k)
  np.testing.assert_array_equal(np.asarray(after.v), want_v)
