"""Server-side tree verification: a pure jitted function over the slot KV cache.

`verify` checks B requests' trees in one target forward. For lane b, the tree's node i is
written to cache row `prefix_len[b] + i` at RoPE position `prefix_len[b] + depth[i]`, and
attends to the committed prefix plus its own ancestors. The target then samples one token at
every node (argmax when greedy), and the accepted path is the chain of nodes whose token equals
the target's sample at their parent. The target's sample at the last accepted node is the bonus
token. Every emitted token is thus a true target sample for *any* tree: speculation changes
speed, never output.

Lossless by construction, no sequential walk: node i is accepted iff every non-root node on its
root path matches; siblings carry distinct tokens (the verifier validates it), so the accepted
nodes form one chain. The chain's rows are then compacted to `prefix_len + [0, len)` in the same
jitted call, with the cache donated.

Padded lanes have `num_nodes = 0`: all their writes go to `DROP_ROW` and their compaction length
is 0, so they touch no live slot (their reads of slot 0 are discarded).

Shapes: see specedge_jax/shapes.py.

This module never decides slots, lengths or EOS; `engine.TargetEngine` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from specedge_jax.models import kv_cache as kv
from specedge_jax.models import sharding
from specedge_jax.models import transformer
from specedge_jax.spec import sampling
from specedge_jax.spec import tree as tree_lib


@jax.jit
def request_keys(seeds, steps):
  """[B] PRNG keys: one stream per request seed, one key per step of it."""
  return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(
      seeds, steps)


@functools.partial(jax.jit, static_argnames=("graphdef", "attend_len"),
                   donate_argnames=("cache",))
def verify(graphdef, model_state, cache: kv.KVCache, slots, prefix_len, tokens, parents,
           num_nodes, temperature, top_p, top_k, seeds, steps, attend_len: int | None = None):
  """Verifies a batch of trees in one target forward and compacts the accepted paths.

  Args:
    graphdef, model_state: the target model, from `model.split_model`.
    cache: the target KV cache; donated (do not use it after the call).
    slots: [B] int32 cache slot per lane (any valid slot for padded lanes).
    prefix_len: [B] int32 committed rows per lane; the root goes to row prefix_len.
    tokens, parents: [B, N] int32 trees (root at 0, parents[i] < i), padded past num_nodes.
    num_nodes: [B] int32 valid nodes per lane; 0 marks a padded lane.
    temperature, top_p, top_k: [B] sampling parameters (temperature 0 = greedy).
    seeds, steps: [B] uint32 request seed and int32 step; the lane's PRNG key is
      fold_in(PRNGKey(seed), step), so a request's randomness does not depend on batching.
    attend_len: static; attention reads cache rows [0, attend_len) only (default: all max_len
      rows). It must cover every live lane's prefix and tree: max(prefix_len) + N <= attend_len
      (`kv_cache.attend_rows` picks a bucket); rows past it are neither read nor written.

  Returns:
    cache; path_nodes [B, N] (accepted node indices in depth order, root first, -1 padded);
    path_len [B] (root included); bonus [B]; target_tokens [B, N] (the target's sample at every
    node, for statistics and tests).
  """
  model = transformer.bind(graphdef, model_state)
  keys = request_keys(seeds, steps)
  batch, capacity = tokens.shape
  attend_len = min(attend_len or cache.max_len, cache.max_len)
  node = jnp.arange(capacity, dtype=jnp.int32)
  valid = node[None, :] < num_nodes[:, None]  # [B, N]
  ancestors = jax.vmap(tree_lib.ancestors_from_parents)(parents, valid)  # [B, N, N]
  depth = jax.vmap(tree_lib.depth_from_ancestors)(ancestors)

  write_rows = jnp.where(valid, prefix_len[:, None] + node[None, :], kv.DROP_ROW)
  rows = jnp.arange(attend_len, dtype=jnp.int32)
  relative = rows[None, :] - prefix_len[:, None]  # [B, S]: tree node held by row, if any
  in_tree = (relative >= 0) & (relative < capacity)
  tree_part = jnp.take_along_axis(
      ancestors, jnp.broadcast_to(jnp.clip(relative, 0, capacity - 1)[:, None, :],
                                  (batch, capacity, attend_len)), axis=2)
  mask = (rows[None, None, :] < prefix_len[:, None, None]) | (in_tree[:, None, :] & tree_part)
  mask = mask & valid[:, :, None]
  logits, cache = model(tokens, prefix_len[:, None] + depth, mask, cache, slots, write_rows)

  target_tokens = sampling.sample_tokens(logits, keys, temperature, top_p, top_k)  # [B, N]
  sample_at_parent = jnp.take_along_axis(target_tokens, jnp.maximum(parents, 0), axis=1)
  matches = (tokens == sample_at_parent) | (node[None, :] == 0)
  # accepted[i]: every node on the root path of i matches.
  accepted = valid & ~jnp.any(ancestors & ~matches[:, None, :], axis=-1)
  path_len = jnp.sum(accepted, axis=-1).astype(jnp.int32)  # root included
  # The chain ordered by depth: accepted node at depth d goes to position d.
  path_nodes = jnp.full((batch, capacity), -1, jnp.int32).at[
      jnp.arange(batch)[:, None], jnp.where(accepted, depth, capacity)].set(
          jnp.broadcast_to(node, (batch, capacity)), mode="drop")
  last = jnp.take_along_axis(path_nodes, jnp.maximum(path_len - 1, 0)[:, None], axis=1)[:, 0]
  bonus = jnp.take_along_axis(target_tokens, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]

  # A jitted callee inside this jit is inlined; the donation is this function's own.
  cache = kv.compact_rows(cache, slots, prefix_len[:, None] + jnp.maximum(path_nodes, 0),
                          prefix_len, path_len)
  return sharding.constrain_cache(cache), path_nodes, path_len, bonus, target_tokens
