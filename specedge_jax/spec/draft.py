"""Edge-side drafting: SpecExec tree growth and the proactive (leaf, bonus) guess, jitted.

`grow` runs the whole SpecExec expansion of one request's tree as one jitted call. Each step
forwards the `n_beams` best not-yet-expanded nodes through the draft model in one call with a
tree attention mask, takes each one's top `branch_width` next tokens as children scored
`parent_score + log(0.9) + log p(child)`, and keeps the global top `budget` nodes. A
`lax.while_loop` stops early when no new child enters the budget; there is no Python loop and no
variable shape.

Draft cache layout for a request (one slot, rows):
  [0, context_len)            committed tokens (contiguous)
  region_start + ...          rows of expanded tree nodes, handed out `n_beams` per step from
                              `next_row`; the engine alternates two regions between rounds so
                              the proactive tree of round r+1 never overwrites round r's tree.
A node attends to the committed rows plus the rows of its own ancestors (and itself). RoPE
positions are `root_position + depth`.

Shapes: see specedge_jax/shapes.py (E beams per step, N tree nodes, C candidates, S rows).

This module owns the growth algorithm. It never decides which rows are committed (the engine
does) and never touches the verifier.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from specedge_jax.models.kv_cache import DROP_ROW, KVCache
from specedge_jax.models import transformer
from specedge_jax.spec import tree as tree_lib

LEVEL_DECAY = math.log(0.9)


@struct.dataclass
class GrowState:
  """Loop state of `grow`."""

  tree: tree_lib.Tree
  cache: KVCache
  next_row: jax.Array  # int32: first free draft cache row of the region
  step: jax.Array  # int32: expansion steps done
  done: jax.Array  # bool: no new child entered the budget, or nothing left to expand


def _forward_nodes(model, tree: tree_lib.Tree, cache: KVCache, beam, beam_live, next_row, *,
                   slot, context_len, root_position):
  """Forwards nodes `beam` of the tree through the draft model in one call.

  Each live beam gets cache row `next_row + j`, attends to the committed context plus its
  ancestors' rows (itself included), and records its top-C next tokens. Returns the updated
  (tree, cache) and the beams' top-C (log-probs, tokens).
  """
  capacity = tree.capacity
  n_beams = beam.shape[0]
  beam_rows = jnp.where(beam_live, next_row + jnp.arange(n_beams, dtype=jnp.int32), DROP_ROW)
  # Dead beams scatter to index `capacity` (dropped) so they never overwrite a live node.
  beam_or_drop = jnp.where(beam_live, beam, capacity)
  # Record the beams' rows before building the mask: a node attends to itself.
  cache_row = tree.cache_row.at[beam_or_drop].set(beam_rows, mode="drop")
  rows = jnp.arange(cache.max_len, dtype=jnp.int32)
  row_owner = cache_row[:, None] == rows[None, :]  # [N, S]: node i lives at row s
  ancestor_rows = jnp.einsum("EN,NS->ES", tree.ancestors[beam].astype(jnp.float32),
                             row_owner.astype(jnp.float32)) > 0
  mask = ((rows[None, :] < context_len) | ancestor_rows) & beam_live[:, None]  # [E, S]
  logits, cache = model(tree.tokens[beam][None, :], (root_position + tree.depth[beam])[None, :],
                        mask[None], cache, slot[None], beam_rows[None, :])
  log_probs = jax.nn.log_softmax(logits[0], axis=-1)  # [E, V]
  # The barrier keeps XLA from merging the callers' `[:, :branch_width]` slices into the top_k:
  # merged, XLA:CPU no longer matches its fast TopK kernel and sorts all [E, V] instead, which
  # then dominates a grow step (docs/notes/peers.md).
  top_logp, top_tokens = jax.lax.optimization_barrier(
      jax.lax.top_k(log_probs, tree.num_child_candidates))  # [E, C]
  top_tokens = top_tokens.astype(jnp.int32)
  tree = tree.replace(
      expanded=tree.expanded.at[beam_or_drop].set(True, mode="drop"),
      cache_row=cache_row,
      child_tokens=tree.child_tokens.at[beam_or_drop].set(top_tokens, mode="drop"),
      child_logp=tree.child_logp.at[beam_or_drop].set(top_logp, mode="drop"),
  )
  return tree, cache, top_logp, top_tokens


def _merge_children(tree: tree_lib.Tree, child_score, child_parent, child_tokens, budget
                    ) -> tuple[tree_lib.Tree, jax.Array]:
  """SpecExec's selection: the global top `budget + 1` (root included) of the tree's nodes and
  the candidate children (`child_parent` indexes the tree; score -inf = no candidate).

  Children score strictly below their parents, so the kept set is ancestor-closed; top_k
  returns it score-sorted, which is the tree's topological order. Returns the new tree and
  whether any candidate was kept.
  """
  capacity = tree.capacity
  num_children = child_score.shape[0]
  pool_score = jnp.concatenate([tree.score, child_score])
  kept_score, order = jax.lax.top_k(pool_score, capacity)
  keep = (kept_score > tree_lib.NEG_INF) & (jnp.arange(capacity) < budget + 1)
  is_child = order >= capacity
  child_index = jnp.clip(order - capacity, 0, num_children - 1)
  old_node = jnp.minimum(order, capacity - 1)  # meaningful where ~is_child
  # The old node a new node inherits its ancestry from: itself, or a child's parent.
  lineage = jnp.where(is_child, child_parent[child_index], old_node)
  # new_position[j]: where old node j landed (-1 if it was not selected).
  new_position = jnp.full((capacity,), -1, jnp.int32).at[
      jnp.where(is_child, capacity, order)].set(jnp.arange(capacity, dtype=jnp.int32),
                                                mode="drop")
  old_parent = tree.parents[old_node]
  parents = jnp.where(is_child, new_position[lineage],
                      jnp.where(old_parent >= 0, new_position[jnp.maximum(old_parent, 0)], -1))
  parents = jnp.where(keep, parents, -1)
  # Ancestor rows over old columns, then a one-hot matmul moves the columns to new positions;
  # a child adds itself.
  old_to_new = new_position[:, None] == jnp.arange(capacity, dtype=jnp.int32)[None, :]
  ancestors = (tree.ancestors[lineage].astype(jnp.float32)
               @ old_to_new.astype(jnp.float32)) > 0
  ancestors = ancestors | (jnp.eye(capacity, dtype=bool) & is_child[:, None])
  ancestors = ancestors & keep[:, None] & keep[None, :]
  depth = tree.depth[lineage] + is_child.astype(jnp.int32)
  old_kept = keep & ~is_child
  new_tree = tree_lib.Tree(
      tokens=jnp.where(keep, jnp.where(is_child, child_tokens[child_index],
                                       tree.tokens[old_node]), 0),
      parents=parents,
      depth=jnp.where(keep, depth, 0),
      score=jnp.where(keep, kept_score, tree_lib.NEG_INF),
      valid=keep,
      ancestors=ancestors,
      expanded=old_kept & tree.expanded[old_node],
      cache_row=jnp.where(old_kept, tree.cache_row[old_node], DROP_ROW),
      child_tokens=jnp.where(old_kept[:, None], tree.child_tokens[old_node], 0),
      child_logp=jnp.where(old_kept[:, None], tree.child_logp[old_node], tree_lib.NEG_INF),
  )
  return new_tree, jnp.any(keep & is_child)


def _expand_step(model, state: GrowState, *, slot, context_len, root_position, budget,
                 n_beams: int, branch_width: int) -> GrowState:
  tree = state.tree
  # 1. Beams: the best valid nodes not yet expanded.
  candidate_score = jnp.where(tree.valid & ~tree.expanded, tree.score, tree_lib.NEG_INF)
  beam_score, beam = jax.lax.top_k(candidate_score, n_beams)  # [E]
  beam_live = beam_score > tree_lib.NEG_INF
  # 2-3. Forward them; mark them expanded with their next-token candidates.
  tree, cache, top_logp, top_tokens = _forward_nodes(
      model, tree, state.cache, beam, beam_live, state.next_row, slot=slot,
      context_len=context_len, root_position=root_position)

  # 4. Children: the top branch_width tokens of each beam.
  child_score = (beam_score[:, None] + LEVEL_DECAY + top_logp[:, :branch_width]).reshape(-1)
  child_score = jnp.where(jnp.repeat(beam_live, branch_width), child_score, tree_lib.NEG_INF)
  child_parent = jnp.repeat(beam, branch_width)
  child_tokens = top_tokens[:, :branch_width].reshape(-1).astype(jnp.int32)

  # 5. Keep the global top `budget + 1` of tree nodes and children.
  new_tree, any_child_kept = _merge_children(tree, child_score, child_parent, child_tokens,
                                             budget)
  return GrowState(
      tree=new_tree,
      cache=cache,
      next_row=state.next_row + n_beams,
      step=state.step + 1,
      done=~any_child_kept | ~jnp.any(beam_live),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "n_beams", "branch_width", "max_steps"),
                   donate_argnames=("cache",))
def grow(graphdef, model_state, cache: KVCache, tree: tree_lib.Tree, *, slot, context_len,
         root_position, next_row, budget, num_steps, n_beams: int, branch_width: int,
         max_steps: int):
  """SpecExec growth of one request's tree on the draft model, as one jitted call.

  Args:
    graphdef, model_state: the draft model, from `model.split_model`.
    cache: the draft KV cache; donated (do not use it after the call).
    tree: the tree to grow (a root-only tree, or a re-rooted proactive tree).
    slot: int32 scalar, the request's cache slot.
    context_len: committed cache rows [0, context_len) every node attends to.
    root_position: RoPE position of the root; a node sits at root_position + depth.
    next_row: first free cache row for expanded nodes.
    budget: maximum non-root nodes kept (<= capacity - 1).
    num_steps: expansion steps to run at most (<= max_steps).
    n_beams, branch_width, max_steps: static shape parameters.

  Returns:
    (cache, tree, next_row, steps_run).
  """
  # The model is split outside jit and merged here: a traced state argument (instead of a static
  # module) keeps the compiled program independent of the parameter values.
  model = transformer.bind(graphdef, model_state)
  step_fn = functools.partial(_expand_step, model, slot=slot, context_len=context_len,
                              root_position=root_position, budget=budget, n_beams=n_beams,
                              branch_width=branch_width)

  def cond(state: GrowState):
    return (
        # the step budget of this call (max_beam_len, less in proactive 'included' mode)
        (state.step < jnp.minimum(num_steps, max_steps))
        # early stop: the last step added no child to the top-budget set
        & ~state.done)

  state = GrowState(tree=tree, cache=cache, next_row=jnp.asarray(next_row, jnp.int32),
                    step=jnp.int32(0), done=jnp.bool_(False))
  state = jax.lax.while_loop(cond, step_fn, state)
  return state.cache, state.tree, state.next_row, state.step


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def expand_leaves(graphdef, model_state, cache: KVCache, tree: tree_lib.Tree, *, slot,
                  context_len, root_position, next_row):
  """Forwards every valid, not-yet-expanded node of `tree` in one draft call.

  The tree's structure is unchanged (it is already in flight); its nodes gain cache rows and
  next-token candidates. Proactive drafting needs this: verification most often ends at a leaf,
  and the bonus there is unknown until the leaf is forwarded. Returns (cache, tree, next_row).
  """
  model = transformer.bind(graphdef, model_state)
  capacity = tree.capacity
  unexpanded = tree.valid & ~tree.expanded
  # Unexpanded nodes first, in index order; the rest are dead lanes.
  beam = jnp.argsort(~unexpanded, stable=True).astype(jnp.int32)
  beam_live = unexpanded[beam]
  tree, cache, _, _ = _forward_nodes(model, tree, cache, beam, beam_live, next_row, slot=slot,
                                     context_len=context_len, root_position=root_position)
  return cache, tree, next_row + capacity


def _non_child_candidates(tree: tree_lib.Tree) -> tuple[jax.Array, jax.Array]:
  """[N, C] mask of next-token candidates that are not already children of their node, and
  each candidate's score as a new child (score(n) + log 0.9 + log p(t|n))."""
  capacity = tree.capacity
  child_of = (tree.parents[None, :] == jnp.arange(capacity)[:, None]) & tree.valid[None, :]
  same_token = tree.child_tokens[:, :, None] == tree.tokens[None, None, :]  # [N, C, N]
  is_child = jnp.any(same_token & child_of[:, None, :], axis=-1)
  usable = (tree.valid & tree.expanded)[:, None] & ~is_child & (tree.child_logp > tree_lib.NEG_INF)
  return usable, tree.score[:, None] + LEVEL_DECAY + tree.child_logp


@jax.jit
def most_likely_end(tree: tree_lib.Tree, expected_depth: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The node where verification of `tree` is guessed to end, and its draft score.

  Verification ends at node n when the path to n is accepted and the target's token at n is
  none of n's children. The draft's own probabilities are poor judges of that: a small draft is
  under-confident (the embedded one bets on "ends at the root" even in trees where the target
  always accepts at least one token). So the depth is calibrated on what the target did: the
  caller passes the running mean of accepted depths, and the guess is the best-scoring node at
  that depth (the tree's best path), or the deepest level short of it. Only expanded nodes with
  a bonus candidate qualify (run `expand_leaves` first).
  """
  usable, _ = _non_child_candidates(tree)
  eligible = tree.valid & tree.expanded & jnp.any(usable, axis=-1)
  target_depth = jnp.minimum(expected_depth, jnp.max(jnp.where(eligible, tree.depth, 0)))
  at_depth = eligible & (tree.depth == target_depth)
  node = jnp.argmax(jnp.where(at_depth, tree.score, tree_lib.NEG_INF)).astype(jnp.int32)
  return node, jnp.where(jnp.any(at_depth), tree.score[node], tree_lib.NEG_INF)


@jax.jit
def proactive_seed(tree: tree_lib.Tree, leaf: jax.Array) -> tree_lib.Tree:
  """The start of a proactive tree: the path root..leaf (expanded, draft rows kept) plus every
  next-token candidate of `leaf` that is not already its child, as unexpanded children.

  Each such child is a guess of the bonus token in case verification ends at `leaf`; growing
  the seed explores what follows each guess, best first (the single most likely (leaf, bonus)
  pair is the first child). Children beyond the capacity are dropped, lowest score first.
  """
  capacity = tree.capacity
  usable, candidate_score = _non_child_candidates(tree)
  on_path = tree.ancestors[leaf] & tree.valid
  order = jnp.argsort(~on_path, stable=True)
  seed = tree_lib.select_nodes(tree, order, on_path[order])
  path_len = jnp.sum(on_path).astype(jnp.int32)
  leaf_new = path_len - 1
  # The leaf's candidates, best first; slot k of the seed gets candidate k - path_len.
  scores = jnp.where(usable[leaf], candidate_score[leaf], tree_lib.NEG_INF)
  ranked_score, ranked = jax.lax.top_k(scores, scores.shape[0])
  idx = jnp.arange(capacity)
  k = jnp.clip(idx - path_len, 0, scores.shape[0] - 1)
  is_new = (idx >= path_len) & (idx - path_len < scores.shape[0]) & (ranked_score[k] >
                                                                      tree_lib.NEG_INF)
  leaf_row = seed.ancestors[leaf_new]
  return seed.replace(
      tokens=jnp.where(is_new, tree.child_tokens[leaf, ranked[k]], seed.tokens),
      parents=jnp.where(is_new, leaf_new, seed.parents),
      depth=jnp.where(is_new, seed.depth[leaf_new] + 1, seed.depth),
      score=jnp.where(is_new, ranked_score[k], seed.score),
      valid=seed.valid | is_new,
      ancestors=seed.ancestors | (is_new[:, None] & (leaf_row[None, :]
                                                     | (is_new[:, None] & (idx[:, None] == idx[None, :])))),
  )


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def plan_proactive(graphdef, model_state, cache: KVCache, tree: tree_lib.Tree, *, slot,
                   context_len, root_position, next_row, expected_depth):
  """`expand_leaves`, `most_likely_end` and `proactive_seed` fused into one call.

  Returns (cache, expanded in-flight tree, proactive seed tree, plan) where plan is
  (end node, its log-prob, path_len, next_row); the caller fetches it with one host sync.
  """
  cache, tree, next_row = expand_leaves(graphdef, model_state, cache, tree, slot=slot,
                                        context_len=context_len, root_position=root_position,
                                        next_row=next_row)
  node, end_score = most_likely_end(tree, expected_depth)
  seed = proactive_seed(tree, node)
  path_len = tree.depth[node] + 1
  return cache, tree, seed, (node, end_score, path_len, next_row)


@functools.partial(jax.jit, static_argnames=("branch_width",))
def reroot_for_growth(tree: tree_lib.Tree, new_root: jax.Array, *, budget,
                      branch_width: int) -> tree_lib.Tree:
  """The next round's tree after a proactive hit: the subtree under `new_root` (the verified
  bonus token), re-rooted, with every expanded node's stored next-token candidates re-admitted.

  Why the re-admission: the proactive tree was grown under its own small budget, shared among
  several bonus guesses, so the nodes of the one guess that hit were expanded but lost most of
  their children to the budget. `grow` forwards only unexpanded nodes, so without this step it
  could not give them children again, and the trees that followed a hit were a fraction of a
  fresh tree's size and emitted far fewer tokens per step (WORKSPACE_NOTES.md, "A hit re-admits
  the candidates ...").
  The stored candidates (`child_tokens`, `child_logp`) re-enter exactly as a growth step would
  have scored them, `score + log 0.9 + log p`, under the main tree's `budget` and
  `branch_width`; no draft forward is needed.
  """
  tree = tree_lib.reroot(tree, new_root)
  usable, candidate_score = _non_child_candidates(tree)
  capacity = tree.capacity
  child_score = jnp.where(usable[:, :branch_width], candidate_score[:, :branch_width],
                          tree_lib.NEG_INF).reshape(-1)
  child_parent = jnp.repeat(jnp.arange(capacity, dtype=jnp.int32), branch_width)
  child_tokens = tree.child_tokens[:, :branch_width].reshape(-1)
  tree, _ = _merge_children(tree, child_score, child_parent, child_tokens, budget)
  return tree
