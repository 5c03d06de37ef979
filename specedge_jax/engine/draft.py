"""`DraftEngine`: the edge's owner of the draft model, its KV cache and speculation trees.

It grows SpecExec trees (`spec.draft.grow`), grows a proactive tree while a tree is being
verified, and commits verification results: it compacts the accepted path's draft rows and, on a
proactive hit, re-roots the proactive tree so its draft key/values are reused. It implements
`api.DraftEngineProtocol`.

Draft cache rows: the committed sequence is contiguous at rows [0, committed). Tree nodes get
rows in one of two regions after `max_len`, alternating between rounds, so the proactive tree of
round r+1 is grown while round r's tree, whose rows it attends to, is still intact. Not
thread-safe: one owner thread.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from specedge_jax import api
from specedge_jax.api import DraftTree, ProactiveParams, TreeParams, VerifyResult
from specedge_jax.engine import prefill as prefill_lib
from specedge_jax.engine.clock import DeviceClock
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import draft as draft_lib
from specedge_jax.spec import tree as tree_lib


@dataclasses.dataclass
class _Proactive:
  tree: tree_lib.Tree  # grown proactive tree (path to leaf, then the guessed bonus subtree)
  next_row: int
  leaf: int  # index of the guessed last accepted node in the in-flight tree
  leaf_index: int  # the same node's index in `tree` (its children are the bonus guesses)
  steps: int  # growth steps spent on it


@dataclasses.dataclass
class _DraftSession:
  committed_len: int  # draft cache rows [0, committed_len) hold the accepted sequence
  round: int  # verification rounds done; selects the draft region (ping-pong)
  tree: tree_lib.Tree  # the tree to grow next (root-only, or a re-rooted proactive tree)
  next_row: int
  steps_done: int  # growth steps already in `tree` (for 'included' mode)
  round_start_row: int = -1  # next_row before this round's growth (to grow it again)
  inflight: tree_lib.Tree | None = None
  proactive: _Proactive | None = None


class DraftEngine:
  """The edge's engine. Not thread-safe: one owner thread."""

  def __init__(self, model, *, num_slots: int, max_len: int, tree: TreeParams = TreeParams(),
               proactive: ProactiveParams = ProactiveParams(), prefill_chunk: int = 64,
               cache_dtype=None):
    self.config = model.config
    self.graphdef, self.state = split_model(model, layerwise=True)  # see TargetEngine
    self.tree_params, self.proactive_params = tree, proactive
    widest = max(tree.max_branch_width,
                 proactive.max_branch_width if proactive.enabled else 0)
    if widest + 1 > self.config.vocab_size:
      raise ValueError(f"branch width {widest} must be below the draft vocabulary size "
                       f"({self.config.vocab_size})")
    self.capacity = tree.max_budget + 1
    if proactive.enabled:
      # A proactive tree holds the path to its end node plus the guessed bonus subtrees.
      self.capacity = max(self.capacity, tree.max_beam_len + 1 + proactive.max_budget + 1)
    self.num_child_candidates = widest + 1
    # Rows for one round's tree: its growth steps, then (proactive on) one forward of its
    # unexpanded leaves, plus the proactive tree grown here for the *next* round.
    self.region_size = tree.max_n_beams * tree.max_beam_len
    if proactive.enabled:
      self.region_size += self.capacity + proactive.max_n_beams * proactive.max_beam_len
    self.max_len = max_len  # committed rows; two draft regions follow
    self.cache = kv.KVCache.init(self.config, num_slots, max_len + 2 * self.region_size,
                                 cache_dtype or model.dtype)
    self.chunk_sizes = prefill_lib.chunk_sizes(prefill_chunk)
    self._free = list(range(num_slots))
    self._sessions: dict[int, _DraftSession] = {}
    self.last_steps = 0  # growth steps of the last draft() call
    self.clock = DeviceClock()
    # Running mean of accepted tree depth (bonus excluded), over all requests: where the
    # proactive guess expects verification to end.
    self.accepted_depth_ema = 1.0

  def _region_start(self, round_index: int) -> int:
    return self.max_len + (round_index % 2) * self.region_size

  def _root_tree(self, token: int) -> tree_lib.Tree:
    return self.clock(tree_lib.root_only, np.int32(token), capacity=self.capacity,
                      num_child_candidates=self.num_child_candidates)

  @property
  def num_free_slots(self) -> int:
    return len(self._free)

  def session(self, slot: int) -> _DraftSession:
    if slot not in self._sessions:
      raise KeyError(f"no open draft session in slot {slot}")
    return self._sessions[slot]

  def open(self, prompt_ids: Sequence[int], first_token: int) -> int:
    if not self._free:
      raise api.SlotsExhausted("all draft slots are busy")
    if len(prompt_ids) == 0 or len(prompt_ids) >= self.max_len:
      raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the draft cache "
                       f"({self.max_len} rows)")
    slot = self._free.pop(0)
    self.cache, _ = prefill_lib.prefill(self.graphdef, self.state, self.cache, slot, prompt_ids, 0,
                            self.chunk_sizes, self.clock)
    self._sessions[slot] = _DraftSession(committed_len=len(prompt_ids), round=0,
                                         tree=self._root_tree(first_token),
                                         next_row=self._region_start(0), steps_done=0)
    return slot

  def close(self, slot: int) -> None:
    self.session(slot)
    del self._sessions[slot]
    self._free.append(slot)
    self._free.sort()

  def _grow(self, session, slot, tree, *, next_row, budget, num_steps, params):
    self.cache, grown, next_row, steps = self.clock(
        draft_lib.grow, self.graphdef, self.state, self.cache, tree, slot=np.int32(slot),
        context_len=np.int32(session.committed_len),
        root_position=np.int32(session.committed_len), next_row=np.int32(next_row),
        budget=np.int32(budget), num_steps=np.int32(num_steps), n_beams=params.max_n_beams,
        branch_width=params.max_branch_width, max_steps=params.max_beam_len)
    next_row, steps = jax.device_get((next_row, steps))
    return grown, int(next_row), int(steps)

  def draft(self, slot: int, limits: api.TreeLimits | None = None) -> DraftTree:
    """Grows the slot's tree from its current root and returns it for verification.

    `limits` (the speculation controller's advice) caps this round's budget and growth steps
    below the configured tree, clipped to it; both are runtime arguments of the same compiled
    `grow`, so following the advice never recompiles."""
    session = self.session(slot)
    if session.committed_len + self.capacity > self.max_len:
      raise ValueError(f"draft slot {slot} is full ({session.committed_len} of "
                       f"{self.max_len} rows)")
    params = self.tree_params
    limits = (limits or api.TreeLimits(params.max_budget, params.max_beam_len)).within(params)
    steps = limits.depth
    if self.proactive_params.mode == "included":
      steps = max(limits.depth - session.steps_done, 0)
    if session.inflight is None:
      session.round_start_row = session.next_row
    else:  # drafting again without a commit: the tree in flight is dropped
      self.abandon_round(slot)
    grown, session.next_row, self.last_steps = self._grow(
        session, slot, session.tree, next_row=session.next_row, budget=limits.budget,
        num_steps=steps, params=params)
    session.inflight = grown
    session.proactive = None
    tokens, parents = tree_lib.wire_arrays(grown)
    return DraftTree(tokens=tokens, parents=parents)

  def abandon_round(self, slot: int) -> None:
    """Drops the tree in flight and its proactive tree, whose verification will never be
    answered (the verifier went away). The rows they used are free again; the root, the
    committed rows and a re-rooted tree's expanded nodes stay, so `draft` grows this round's
    tree again exactly."""
    session = self.session(slot)
    if session.inflight is None:
      return
    session.next_row = session.round_start_row
    session.inflight = None
    session.proactive = None

  def draft_proactive(self, slot: int) -> None:
    """Grows the proactive tree: from the node where verification of the in-flight tree most
    likely ends, with that node's most likely bonus tokens as the roots of the next tree."""
    if not self.proactive_params.enabled:
      return
    session = self.session(slot)
    if session.inflight is None:
      raise ValueError(f"draft slot {slot} has no tree in flight")
    # Forward the in-flight tree's leaves first: verification usually ends at a leaf, and its
    # bonus token is unknown until the leaf's next-token distribution is.
    self.cache, session.inflight, seed, plan = self.clock(
        draft_lib.plan_proactive, self.graphdef, self.state, self.cache, session.inflight, slot=np.int32(slot),
        context_len=np.int32(session.committed_len),
        root_position=np.int32(session.committed_len), next_row=np.int32(session.next_row),
        expected_depth=np.int32(round(self.accepted_depth_ema)))
    leaf, score, path_len, next_row = (v.item() for v in jax.device_get(plan))
    session.next_row = int(next_row)
    if not np.isfinite(score):
      return
    params = self.proactive_params
    grown, next_row, steps = self._grow(
        session, slot, seed, next_row=self._region_start(session.round + 1),
        budget=(path_len - 1) + params.max_budget, num_steps=params.max_beam_len, params=params)
    session.proactive = _Proactive(tree=grown, next_row=next_row, leaf=int(leaf),
                                   leaf_index=path_len - 1, steps=steps)

  def commit(self, slot: int, result: VerifyResult) -> bool | None:
    """Applies a verification result: compacts the accepted path and prepares the next root.

    Returns whether the proactive guess was hit (None when proactive drafting is off).
    """
    session = self.session(slot)
    inflight = session.inflight
    if inflight is None:
      raise ValueError(f"draft slot {slot} has no tree in flight")
    tokens, parents, valid, expanded, cache_row = (np.asarray(a) for a in jax.device_get(
        (inflight.tokens, inflight.parents, inflight.valid, inflight.expanded,
         inflight.cache_row)))
    path = [0]
    for token in result.accepted:
      children = np.nonzero(valid & (parents == path[-1]) & (tokens == token))[0]
      if children.size != 1:
        raise ValueError(f"accepted token {token} is not a child of node {path[-1]} in the tree")
      path.append(int(children[0]))
    # Every accepted node but the last has an accepted child, so it was expanded; the last one
    # may be an unexpanded leaf whose draft key/value must be computed now.
    num_expanded = len(path) if expanded[path[-1]] else len(path) - 1
    rows = np.zeros((1, self.capacity), np.int32)
    rows[0, :num_expanded] = cache_row[path[:num_expanded]]
    self.cache = self.clock(kv.compact_rows, self.cache, np.array([slot], np.int32), rows,
                            np.array([session.committed_len], np.int32),
                            np.array([num_expanded], np.int32))
    if num_expanded < len(path):
      self.cache, _ = prefill_lib.prefill(self.graphdef, self.state, self.cache, slot,
                              [int(tokens[path[-1]])], session.committed_len + num_expanded,
                              self.chunk_sizes, self.clock)
    session.committed_len += len(path)
    session.round += 1
    self.accepted_depth_ema += 0.1 * (len(result.accepted) - self.accepted_depth_ema)
    proactive = session.proactive
    hit = False
    if proactive is not None and proactive.leaf == path[-1]:
      # A hit: verification ended at the guessed node, with a bonus among the guessed children.
      p_tokens, p_parents, p_valid = (np.asarray(a) for a in jax.device_get(
          (proactive.tree.tokens, proactive.tree.parents, proactive.tree.valid)))
      guess = np.nonzero(p_valid & (p_parents == proactive.leaf_index)
                         & (p_tokens == result.bonus))[0]
      hit = guess.size == 1
    if hit:
      session.tree = self.clock(
          draft_lib.reroot_for_growth, proactive.tree, np.int32(guess[0]),
          budget=np.int32(self.tree_params.max_budget),
          branch_width=self.tree_params.max_branch_width)
      session.next_row = proactive.next_row
      session.steps_done = proactive.steps
    else:
      session.tree = self._root_tree(result.bonus)
      session.next_row = self._region_start(session.round)
      session.steps_done = 0
    session.inflight = None
    session.proactive = None
    return hit if self.proactive_params.enabled else None

  def proactive_hit_result(self, slot: int) -> VerifyResult | None:
    """A verification result that hits the slot's proactive guess (the in-flight path to the
    guessed node, then its first guessed bonus token), or None when there is no guess. For the
    warm-up, which must compile the re-rooting path, and for tests."""
    session = self.session(slot)
    proactive, inflight = session.proactive, session.inflight
    if proactive is None or inflight is None:
      return None
    tokens, parents = (np.asarray(a) for a in jax.device_get((inflight.tokens, inflight.parents)))
    path, node = [], int(proactive.leaf)
    while node > 0:
      path.append(int(tokens[node]))
      node = int(parents[node])
    path.reverse()
    p_tokens, p_parents, p_valid = (np.asarray(a) for a in jax.device_get(
        (proactive.tree.tokens, proactive.tree.parents, proactive.tree.valid)))
    children = np.nonzero(p_valid & (p_parents == proactive.leaf_index))[0]
    if not children.size:
      return None
    bonus = int(p_tokens[children[0]])
    return VerifyResult(accepted=path, bonus=bonus, emitted=path + [bonus], finished=False)

  def warmup(self) -> None:
    """Compiles the hot paths: both prefill chunk sizes, grow, proactive grow, commit on a miss
    and (when proactive drafting is on) on a hit, and a re-rooted grow."""
    for prompt_len in sorted({1, min(self.chunk_sizes) + 1}):
      slot = self.open([0] * prompt_len, 0)
      tree = self.draft(slot)
      self.draft_proactive(slot)
      miss = VerifyResult(accepted=[], bonus=int(tree.tokens[0]), emitted=[int(tree.tokens[0])],
                          finished=False)
      self.commit(slot, self.proactive_hit_result(slot) or miss)
      self.draft(slot)
      self.close(slot)
