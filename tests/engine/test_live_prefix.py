"""Live-prefix attention (issue 13): verify and prefill read only a bucket of rows that holds the
batch's longest prefix plus its tree, and give the same results as attending over every row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specedge_jax import engine as E
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import prefill as spec_prefill
from specedge_jax.spec import verify as verify_lib
from specedge_jax.testing import tiny_models

VOCAB, MAX_LEN, NODES = 64, 96, 9


def test_buckets_are_powers_of_two_up_to_max_len():
  assert kv.attend_buckets(4096, 128) == (128, 256, 512, 1024, 2048, 4096)
  assert kv.attend_buckets(96, 16) == (16, 32, 64, 96)
  assert kv.attend_buckets(512, 512) == (512,) and kv.attend_buckets(512, 4096) == (512,)
  buckets = kv.attend_buckets(96, 16)
  assert [kv.attend_rows(n, buckets) for n in (1, 16, 17, 64, 65, 96, 200)] == \
      [16, 16, 32, 64, 96, 96, 96]
  assert kv.reachable_buckets(buckets, 20) == (32, 64, 96)
  assert kv.reachable_buckets(buckets, 500) == (96,)
  with pytest.raises(ValueError, match=">= 1 rows"):
    kv.attend_buckets(96, 0)


@pytest.fixture(scope="module")
def target():
  return tiny_models.make_pair(VOCAB)[0]


def random_trees(rng, batch):
  tokens = rng.integers(0, VOCAB, (batch, NODES)).astype(np.int32)
  parents = np.full((batch, NODES), -1, np.int32)
  for b in range(batch):
    for i in range(1, NODES):
      parents[b, i] = rng.integers(0, i)
    # Siblings need distinct tokens: make every node's token unique within its tree.
    tokens[b] = rng.permutation(VOCAB)[:NODES]
  return tokens, parents


def test_bucketed_verify_equals_full_attention(target):
  graphdef, state = split_model(target, layerwise=True)
  rng = np.random.default_rng(0)
  batch = 3
  cache = kv.KVCache.init(target.config, batch, MAX_LEN)
  # Fill every row with random keys and values: rows past the live prefix hold garbage that a
  # wrong mask or a wrong bucket would let through.
  cache = kv.KVCache(k=jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32),
                     v=jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32))
  prefix = np.array([5, 20, 37], np.int32)
  tokens, parents = random_trees(rng, batch)
  args = (np.arange(batch, dtype=np.int32), prefix, tokens, parents,
          np.array([NODES, 4, NODES], np.int32), np.zeros(batch, np.float32),
          np.ones(batch, np.float32), np.zeros(batch, np.int32),
          np.arange(batch, dtype=np.uint32), np.zeros(batch, np.int32))
  copy = lambda c: jax.tree.map(jnp.copy, c)
  full_cache, *full = verify_lib.verify(graphdef, state, copy(cache), *args)
  rows = kv.attend_rows(int(prefix.max()) + NODES, kv.attend_buckets(MAX_LEN, 16))
  assert rows == 64
  cut_cache, *cut = verify_lib.verify(graphdef, state, copy(cache), *args, attend_len=rows)
  for a, b in zip(full[:3], cut[:3]):  # accepted path, its length, the bonus
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The target's token at every valid node (padded nodes see no row: their output is noise).
  valid = np.arange(NODES)[None, :] < args[4][:, None]
  np.testing.assert_array_equal(np.asarray(full[3])[valid], np.asarray(cut[3])[valid])
  np.testing.assert_allclose(np.asarray(cut_cache.k), np.asarray(full_cache.k), atol=1e-6)


def test_bucketed_prefill_equals_full_attention(target):
  graphdef, state = split_model(target, layerwise=True)
  cache = kv.KVCache.init(target.config, 1, MAX_LEN)
  tokens = np.arange(8, dtype=np.int32) + 3
  full_cache, full = spec_prefill.prefill_chunk(graphdef, state, jax.tree.map(jnp.copy, cache),
                                                np.int32(0), tokens, np.int32(24), np.int32(8))
  _, cut = spec_prefill.prefill_chunk(graphdef, state, cache, np.int32(0), tokens, np.int32(24),
                                      np.int32(8), attend_len=32)
  np.testing.assert_allclose(np.asarray(cut), np.asarray(full), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # compiles every bucket it reaches (~15 s on 2 cores)
def test_speculative_greedy_across_buckets_equals_target_greedy(target):
  _, draft = tiny_models.make_pair(VOCAB)
  # Prompts from 3 to 40 tokens plus 20 new ones: lanes cross the 32 and 64 buckets, and a
  # batch mixes lanes of different buckets (the longest decides).
  prompts = tiny_models.prompts(4, VOCAB, seed=7, min_len=3, max_len=40)
  full = E.TargetEngine(target, num_slots=3, max_len=MAX_LEN, max_tree_nodes=NODES,
                        max_batch_size=3, attention_min_rows=MAX_LEN)
  reference = E.generate(full, prompts, max_new_tokens=20).tokens
  engine = E.TargetEngine(target, num_slots=3, max_len=MAX_LEN, max_tree_nodes=NODES,
                          max_batch_size=3, attention_min_rows=32)
  drafter = E.DraftEngine(draft, num_slots=3, max_len=MAX_LEN,
                          tree=E.TreeParams(max_n_beams=4, max_beam_len=3, max_branch_width=2,
                                            max_budget=8))
  assert E.generate(engine, prompts, draft=drafter, max_new_tokens=20).tokens == reference
  assert E.generate(engine, prompts, max_new_tokens=20).tokens == reference


def test_tree_buckets_run_small_trees_in_a_small_forward(target):
  """A batch of small trees uses the smallest tree bucket that holds them; the result equals
  the padded-to-the-largest forward's."""
  prompts = tiny_models.prompts(2, VOCAB, seed=3, min_len=4, max_len=10)
  parents = np.array([-1, 0, 0], np.int32)
  outs = []
  for buckets in ((), (4,)):
    engine = E.TargetEngine(target, num_slots=2, max_len=MAX_LEN, max_tree_nodes=NODES,
                            max_batch_size=2, attention_min_rows=MAX_LEN, tree_buckets=buckets)
    assert engine.tree_buckets == tuple(buckets) + (NODES,)
    slots = []
    for prompt in prompts:
      slot, first, _ = engine.open(prompt, E.GREEDY, 0, 8)
      slots.append((slot, first))
    requests = [(slot, E.DraftTree(tokens=np.array([first, 5, 6], np.int32),
                                   parents=parents)) for slot, first in slots]
    capacities = []
    run = engine._run
    engine._run = lambda reqs, capacity: capacities.append(capacity) or run(reqs, capacity)
    outs.append([(r.accepted, r.bonus) for r in engine.verify(requests)])
    assert capacities == [4 if buckets else NODES]
  assert outs[0] == outs[1]
