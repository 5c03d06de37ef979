"""Tree invariants under hypothesis: what `grow`, `reroot` and `verify` produce is a tree.

Grown trees are ancestor-closed, score-sorted (so parents precede children), within budget,
with distinct sibling tokens and strictly decreasing scores along edges; expanded nodes own
distinct draft cache rows; the accepted path of verification is a root path.
"""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specedge_jax import api
from specedge_jax.engine import prefill as engine_prefill
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.kv_cache import DROP_ROW
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import draft as draft_lib
from specedge_jax.spec import tree as tree_lib
from specedge_jax.spec import verify as verify_lib
from specedge_jax.testing import tiny_models

VOCAB = 32
CAPACITY = 13
SHAPES = [(4, 3, 3), (2, 2, 4)]  # (n_beams, branch_width, max_steps): few static variants
CONTEXT = 6
ROWS = 64


@pytest.fixture(scope="module")
def draft_model():
  _, draft = tiny_models.make_pair(VOCAB, sharpen=4.0, noise=0.1, seed=4)
  return (*split_model(draft), draft.config)


def grow_tree(draft_model, *, shape, budget, steps, root, seed):
  graphdef, state, config = draft_model
  n_beams, branch_width, max_steps = shape
  cache = kv.KVCache.init(config, 1, ROWS)
  rng = np.random.default_rng(seed)
  cache, _ = engine_prefill.prefill(graphdef, state, cache, 0, list(rng.integers(0, VOCAB, CONTEXT)), 0,
                       (8,))
  tree = tree_lib.root_only(np.int32(root), capacity=CAPACITY, num_child_candidates=branch_width + 1)
  cache, tree, next_row, steps_run = draft_lib.grow(
      graphdef, state, cache, tree, slot=np.int32(0), context_len=np.int32(CONTEXT),
      root_position=np.int32(CONTEXT), next_row=np.int32(CONTEXT + 8), budget=np.int32(budget),
      num_steps=np.int32(steps), n_beams=n_beams, branch_width=branch_width, max_steps=max_steps)
  return jax.device_get(tree), int(steps_run)




def check_tree(tree, budget):
  valid = np.asarray(tree.valid)
  n = int(valid.sum())
  assert valid[:n].all() and not valid[n:].any(), "valid nodes must come first"
  assert 1 <= n <= budget + 1
  parents, tokens, depth = np.asarray(tree.parents), np.asarray(tree.tokens), np.asarray(tree.depth)
  score, anc = np.asarray(tree.score), np.asarray(tree.ancestors)
  assert parents[0] == -1 and depth[0] == 0 and score[0] == 0
  for i in range(1, n):
    p = parents[i]
    assert 0 <= p < i, "parents precede children"
    assert depth[i] == depth[p] + 1
    assert score[i] < score[p], "a child scores strictly below its parent"
    expected = anc[p].copy()
    expected[i] = True
    np.testing.assert_array_equal(anc[i], expected)
  assert np.all(np.diff(score[:n]) <= 0), "score-sorted"
  siblings = set()
  for i in range(1, n):
    assert (parents[i], tokens[i]) not in siblings, "sibling tokens are distinct"
    siblings.add((parents[i], tokens[i]))
  rows = np.asarray(tree.cache_row)[:n][np.asarray(tree.expanded)[:n]]
  assert len(set(rows.tolist())) == len(rows) and np.all(rows != DROP_ROW)
  assert not anc[n:].any() and not anc[:, n:].any()


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(SHAPES), budget=st.integers(1, CAPACITY - 1),
       steps=st.integers(0, 4), root=st.integers(0, VOCAB - 1), seed=st.integers(0, 1000))
def test_grown_trees_are_well_formed(draft_model, shape, budget, steps, root, seed):
  tree, steps_run = grow_tree(draft_model, shape=shape, budget=budget, steps=steps, root=root,
                              seed=seed)
  check_tree(tree, budget)
  assert steps_run <= min(steps, shape[2])
  assert int(np.asarray(tree.depth).max()) <= steps_run
  # Re-rooting at any node gives a well-formed tree of its subtree.
  n = int(np.asarray(tree.valid).sum())
  new_root = seed % n
  rerooted = jax.device_get(tree_lib.reroot(tree, np.int32(new_root)))
  check_tree(rerooted, CAPACITY - 1)
  assert int(np.asarray(rerooted.valid).sum()) == int(np.asarray(tree.ancestors)[:, new_root].sum())
  assert int(rerooted.tokens[0]) == int(tree.tokens[new_root])


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(small_budget=st.integers(2, 6), budget=st.integers(1, CAPACITY - 1),
       seed=st.integers(0, 1000))
def test_reroot_for_growth_readmits_the_stored_candidates(draft_model, small_budget, budget,
                                                          seed):
  """After a proactive hit: the subtree under the hit node, plus every expanded node's stored
  next-token candidates that are not its children, cut to the best `budget` (root aside),
  exactly as a growth step would score them; a well-formed tree either way."""
  shape = SHAPES[0]
  branch_width = shape[1]
  # A proactive-like tree: several steps under a small budget, so expanded nodes lose children.
  tree, _ = grow_tree(draft_model, shape=shape, budget=small_budget, steps=3, root=2, seed=seed)
  n = int(np.asarray(tree.valid).sum())
  rerooted = jax.device_get(tree_lib.reroot(tree, np.int32(seed % n)))
  out = jax.device_get(draft_lib.reroot_for_growth(tree, np.int32(seed % n),
                                                   budget=np.int32(budget),
                                                   branch_width=branch_width))
  check_tree(out, budget)
  # Reference in numpy: the pool of subtree nodes and re-admittable candidates.
  valid = np.asarray(rerooted.valid)
  parents, tokens = np.asarray(rerooted.parents), np.asarray(rerooted.tokens)
  score, expanded = np.asarray(rerooted.score), np.asarray(rerooted.expanded)
  pool = [score[i] for i in range(len(valid)) if valid[i]]
  for node in np.flatnonzero(valid & expanded):
    children = {tokens[c] for c in np.flatnonzero(valid & (parents == node))}
    for k in range(branch_width):
      logp = float(rerooted.child_logp[node, k])
      if np.isfinite(logp) and int(rerooted.child_tokens[node, k]) not in children:
        pool.append(score[node] + draft_lib.LEVEL_DECAY + logp)
  expected = np.sort(np.asarray(pool, np.float32))[::-1][:budget + 1]
  kept = int(np.asarray(out.valid).sum())
  assert kept == len(expected)
  np.testing.assert_allclose(np.asarray(out.score)[:kept], expected, rtol=1e-6, atol=1e-6)
  assert int(out.tokens[0]) == int(rerooted.tokens[0])
  # Re-admitted nodes are new leaves (unexpanded, no draft row); old nodes keep their rows.
  old_rows = set(np.asarray(rerooted.cache_row)[valid & expanded].tolist())
  out_expanded = np.asarray(out.expanded)[:kept]
  assert set(np.asarray(out.cache_row)[:kept][out_expanded].tolist()) <= old_rows
  assert np.all(np.asarray(out.cache_row)[:kept][~out_expanded] == DROP_ROW)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, CAPACITY - 1), seed=st.integers(0, 1000),
       temperature=st.sampled_from([0.0, 1.0]))
def test_accepted_path_is_a_root_path(draft_model, budget, seed, temperature):
  tree, _ = grow_tree(draft_model, shape=SHAPES[0], budget=budget, steps=3, root=1, seed=seed)
  tokens, parents = tree_lib.wire_arrays(tree)
  api.validate_tree(tokens, parents, max_nodes=CAPACITY, vocab_size=VOCAB)
  target, _ = tiny_models.make_pair(VOCAB, sharpen=4.0, seed=4)
  graphdef, state = split_model(target)
  cache = kv.KVCache.init(target.config, 2, ROWS)
  n = len(tokens)
  pad = lambda a, fill: np.pad(a, (0, CAPACITY - n), constant_values=fill)[None].repeat(2, 0)
  cache, path, path_len, bonus, sampled = verify_lib.verify(
      graphdef, state, cache, np.array([0, 1], np.int32), np.array([4, 4], np.int32),
      pad(tokens, 0), pad(parents, -1), np.array([n, 0], np.int32),
      np.full(2, temperature, np.float32), np.ones(2, np.float32), np.zeros(2, np.int32),
      np.array([seed, 0], np.uint32), np.zeros(2, np.int32))
  path, length, sampled = np.asarray(path[0]), int(path_len[0]), np.asarray(sampled[0])
  assert path[0] == 0 and 1 <= length <= n and np.all(path[length:] == -1)
  for d in range(1, length):
    assert parents[path[d]] == path[d - 1]
    assert tokens[path[d]] == sampled[path[d - 1]], "accepted nodes match the target's sample"
  last = path[length - 1]
  children = [i for i in range(1, n) if parents[i] == last]
  assert all(tokens[c] != sampled[last] for c in children), "no matching child was skipped"
  assert int(bonus[0]) == sampled[last]
  assert int(path_len[1]) == 0, "a padded lane accepts nothing"


@pytest.mark.parametrize("tokens,parents,message", [
    ([], [], "empty"),
    ([1, 2], [-1], "parents"),
    ([1, 2], [0, 0], "root parent"),
    ([1, 2, 3], [-1, 0, 2], "precede"),
    ([1, 2, 99], [-1, 0, 0], "vocabulary"),
    ([1, 2, 2], [-1, 0, 0], "siblings"),
    (list(range(20)), [-1] + list(range(19)), "at most"),
])
def test_validate_tree_names_the_problem(tokens, parents, message):
  with pytest.raises(ValueError, match=message):
    api.validate_tree(np.array(tokens, np.int32), np.array(parents, np.int32),
                                max_nodes=CAPACITY, vocab_size=VOCAB)
