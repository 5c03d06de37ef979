"""The speculation tree: a fixed-capacity pytree and the pure functions that reshape it.

A tree holds `N` node slots. Node 0 is the root: the last accepted token, whose key/value is not
yet in the verifier's cache. Valid nodes are kept **sorted by score, descending**. A child always
scores strictly below its parent (each level adds `log(0.9) + log p < 0`), so sorting by score is
also a topological order: `parents[i] < i` for every valid non-root node, and the root stays at
index 0. Invalid node slots trail the valid ones with score -inf.

Fields used only on the edge (the draft side): `expanded` (the node was forwarded through the
draft model), `cache_row` (where its draft key/value lives), and `child_tokens` / `child_logp`
(the draft's best next tokens at an expanded node, kept for proactive drafting). The verifier
gets only tokens and parents (`wire_arrays`) and rebuilds depth and ancestors itself.

Shapes: see specedge_jax/shapes.py (N tree nodes, C next-token candidates per node).

This module never calls a model and never touches a cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specedge_jax.models.kv_cache import DROP_ROW

NEG_INF = -jnp.inf


@struct.dataclass
class Tree:
  tokens: jax.Array  # [N] int32
  parents: jax.Array  # [N] int32; -1 for the root and for invalid slots
  depth: jax.Array  # [N] int32; 0 at the root
  score: jax.Array  # [N] float32; cumulative decayed draft log-prob, 0 at the root, -inf invalid
  valid: jax.Array  # [N] bool
  ancestors: jax.Array  # [N, N] bool; ancestors[i, j]: j is i or an ancestor of i
  expanded: jax.Array  # [N] bool; forwarded through the draft model
  cache_row: jax.Array  # [N] int32; draft cache row of an expanded node, DROP_ROW otherwise
  child_tokens: jax.Array  # [N, C] int32; the draft's top-C next tokens at an expanded node
  child_logp: jax.Array  # [N, C] float32; their log-probs (-inf where unknown)

  @property
  def capacity(self) -> int:
    return self.tokens.shape[-1]

  @property
  def num_child_candidates(self) -> int:
    return self.child_tokens.shape[-1]


@functools.partial(jax.jit, static_argnames=("capacity", "num_child_candidates"))
def root_only(token: jax.Array, capacity: int, num_child_candidates: int) -> Tree:
  """A tree holding just its root."""
  first = jnp.arange(capacity) == 0
  return Tree(
      tokens=jnp.where(first, jnp.asarray(token, jnp.int32), 0).astype(jnp.int32),
      parents=jnp.full((capacity,), -1, jnp.int32),
      depth=jnp.zeros((capacity,), jnp.int32),
      score=jnp.where(first, 0.0, NEG_INF).astype(jnp.float32),
      valid=first,
      ancestors=jnp.eye(capacity, dtype=bool) & first[:, None],
      expanded=jnp.zeros((capacity,), bool),
      cache_row=jnp.full((capacity,), DROP_ROW, jnp.int32),
      child_tokens=jnp.zeros((capacity, num_child_candidates), jnp.int32),
      child_logp=jnp.full((capacity, num_child_candidates), NEG_INF, jnp.float32),
  )


def ancestors_from_parents(parents: jax.Array, valid: jax.Array) -> jax.Array:
  """[N, N] ancestor-or-self mask from parent pointers with `parents[i] < i` (topological).

  One pass in index order: a node's row is its parent's row plus itself.
  """
  capacity = parents.shape[-1]
  eye = jnp.eye(capacity, dtype=bool)

  def body(i, anc):
    parent = parents[i]
    row = jnp.where(parent >= 0, anc[jnp.maximum(parent, 0)], False) | eye[i]
    return anc.at[i].set(row & valid[i])

  return jax.lax.fori_loop(0, capacity, body, jnp.zeros((capacity, capacity), bool))


def depth_from_ancestors(ancestors: jax.Array) -> jax.Array:
  return jnp.sum(ancestors, axis=-1).astype(jnp.int32) - 1


def select_nodes(tree: Tree, order: jax.Array, keep: jax.Array) -> Tree:
  """Rebuilds a tree from the nodes `order[k]` (k < N) of `tree`, dropping those with ~keep[k].

  `order` must list kept parents before their children. Parent pointers and ancestor columns
  are remapped to the new positions.
  """
  capacity = tree.capacity
  new_index = jnp.full((capacity,), -1, jnp.int32).at[order].set(
      jnp.where(keep, jnp.arange(capacity, dtype=jnp.int32), -1))
  old_parents = tree.parents[order]
  parents = jnp.where(keep & (old_parents >= 0), new_index[jnp.maximum(old_parents, 0)], -1)
  ancestors = tree.ancestors[order][:, order] & keep[:, None] & keep[None, :]
  return Tree(
      tokens=jnp.where(keep, tree.tokens[order], 0),
      parents=parents,
      depth=jnp.where(keep, tree.depth[order], 0),
      score=jnp.where(keep, tree.score[order], NEG_INF),
      valid=keep & tree.valid[order],
      ancestors=ancestors,
      expanded=keep & tree.expanded[order],
      cache_row=jnp.where(keep, tree.cache_row[order], DROP_ROW),
      child_tokens=tree.child_tokens[order],
      child_logp=jnp.where(keep[:, None], tree.child_logp[order], NEG_INF),
  )


def reroot(tree: Tree, new_root: jax.Array) -> Tree:
  """The subtree under `new_root` as a tree of its own (same capacity), root at index 0.

  Scores shift so the new root scores 0 and depths shift so it has depth 0; draft cache rows
  are kept, so the subtree's draft key/values are reused, not recomputed.
  """
  in_subtree = tree.ancestors[:, new_root] & tree.valid
  # A stable sort on ~in_subtree keeps the score order (hence topological order) of the kept
  # nodes, and puts the new root first because it scores highest in its own subtree.
  order = jnp.argsort(~in_subtree, stable=True)
  keep = in_subtree[order]
  shifted = tree.replace(score=tree.score - tree.score[new_root],
                         depth=tree.depth - tree.depth[new_root])
  out = select_nodes(shifted, order, keep)
  return out.replace(parents=out.parents.at[0].set(-1))


def path_to(tree: Tree, node: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Node indices on the root-to-`node` path, in depth order, padded with -1; and its length."""
  on_path = tree.ancestors[node] & tree.valid
  # Sorting by depth lists the path root first; padding (depth = capacity) goes last.
  key = jnp.where(on_path, tree.depth, tree.capacity)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  length = jnp.sum(on_path).astype(jnp.int32)
  return jnp.where(jnp.arange(tree.capacity) < length, order, -1), length


def wire_arrays(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, parents) of the valid nodes, as sent to the verifier. Host numpy."""
  valid = np.asarray(tree.valid)
  count = int(valid.sum())
  return (np.asarray(tree.tokens)[:count].astype(np.int32),
          np.asarray(tree.parents)[:count].astype(np.int32))
