"""Engines: the host-side owners of models, KV caches and per-request state.

`TargetEngine` (server) owns the target model and its slot cache. It prefills prompts, verifies
batches of trees with one jitted call (`verify.verify`), and runs plain autoregressive decoding
(a root-only tree per request) for the server-only baseline. It enforces EOS and
`max_new_tokens` and derives each request's PRNG key from its seed and step.

`DraftEngine` (edge) owns the draft model and its cache. It grows SpecExec trees (`draft.grow`),
grows proactive trees while a tree is being verified, and commits verification results: it
compacts the accepted path's draft rows and, on a proactive hit, re-roots the proactive tree so
its draft key/values are reused.

`generate` is the in-process loop over both (speculative) or the target alone (autoregressive).

Neither engine is thread-safe: exactly one thread may call an engine. The serving layer gives
each engine one owner thread.

Shapes are fixed per engine: batch sizes are padded to power-of-two buckets up to
`max_batch_size`, trees to `max_tree_nodes`, prompt chunks to two bucket sizes; `warmup()`
compiles every variant so steady-state serving never recompiles.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from specedge_jax.spec import draft as draft_lib
from specedge_jax.models import kv_cache as kv
from specedge_jax.spec import sampling as sampling_lib
from specedge_jax.spec import tree as tree_lib
from specedge_jax.spec import verify as verify_lib
from specedge_jax.models.transformer import split_model
from specedge_jax.spec.sampling import SamplingParams

PROACTIVE_MODES = ("disabled", "excluded", "included")


@dataclasses.dataclass(frozen=True)
class TreeParams:
  """SpecExec tree shape. Defaults are the reference's."""

  max_n_beams: int = 32  # nodes forwarded per step
  max_beam_len: int = 4  # steps (depth)
  max_branch_width: int = 16  # children taken per forwarded node
  max_budget: int = 32  # nodes kept, root excluded

  def __post_init__(self):
    for name in ("max_n_beams", "max_beam_len", "max_branch_width", "max_budget"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ProactiveParams:
  """Proactive drafting: grow a small tree from the most likely (leaf, bonus) while waiting."""

  mode: str = "disabled"  # 'disabled' | 'excluded' | 'included'
  max_n_beams: int = 8
  max_beam_len: int = 2
  # As wide as the main tree: a hit's re-rooted root keeps the children it got here (a node
  # is expanded once), so a narrower proactive tree would narrow the next tree's first level.
  max_branch_width: int = 16
  max_budget: int = 16

  def __post_init__(self):
    if self.mode not in PROACTIVE_MODES:
      raise ValueError(f"proactive mode must be one of {PROACTIVE_MODES}, got {self.mode!r}")
    for name in ("max_n_beams", "max_beam_len", "max_branch_width", "max_budget"):
      if getattr(self, name) < 1:
        raise ValueError(f"proactive {name} must be >= 1, got {getattr(self, name)}")

  @property
  def enabled(self) -> bool:
    return self.mode != "disabled"


class SlotsExhausted(RuntimeError):
  """No free KV slot for a new request."""


@dataclasses.dataclass
class DraftTree:
  """A tree as it travels edge -> server."""

  tokens: np.ndarray  # int32 [n]; tokens[0] is the root
  parents: np.ndarray  # int32 [n]; parents[0] == -1, 0 <= parents[i] < i


@dataclasses.dataclass
class VerifyResult:
  """A verification answer as it travels server -> edge."""

  accepted: list[int]  # tree tokens accepted below the root, in order
  bonus: int  # the target's token after the accepted path: the next root
  emitted: list[int]  # tokens for the user: accepted + [bonus], cut at EOS / max_new_tokens
  finished: bool


class DeviceClock:
  """Optional accounting of time spent in device calls, for the host-overhead benchmark.

  Disabled (the default), it only forwards the call, so serving keeps JAX's asynchronous
  dispatch. Enabled, it blocks on each call's outputs and adds the dispatch-to-completion time
  to `seconds`; everything else a step spends is host overhead.
  """

  def __init__(self):
    self.enabled = False
    self.seconds = 0.0

  def __call__(self, fn, *args, **kwargs):
    if not self.enabled:
      return fn(*args, **kwargs)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    self.seconds += time.perf_counter() - start
    return out


def _bucket(n: int, limit: int) -> int:
  size = 1
  while size < n:
    size *= 2
  return min(size, limit)


def prefill(graphdef, state, cache, slot: int, token_ids: Sequence[int], start: int,
            chunk_sizes: tuple[int, ...], clock: DeviceClock | None = None):
  """Writes `token_ids` at rows start.. of `slot` in fixed-size chunks; returns last logits."""
  token_ids = np.asarray(token_ids, np.int32)
  position = start
  logits = None
  while position < start + len(token_ids):
    remaining = start + len(token_ids) - position
    chunk = next((c for c in chunk_sizes if c >= remaining), chunk_sizes[-1])
    count = min(chunk, remaining)
    buffer = np.zeros(chunk, np.int32)
    buffer[:count] = token_ids[position - start:position - start + count]
    cache, logits = (clock or DeviceClock())(
        verify_lib.prefill_chunk, graphdef, state, cache, np.int32(slot), buffer,
        np.int32(position), np.int32(count))
    position += count
  return cache, logits


# ================================================================================================
# Server side.


@dataclasses.dataclass
class _TargetSession:
  prefix_len: int  # committed cache rows
  root: int  # the last emitted token: root of the next tree, not yet in the cache
  sampling: SamplingParams
  seed: int  # uint32: the request's PRNG stream is fold_in(PRNGKey(seed), step)
  step: int
  generated: int
  max_new_tokens: int
  finished: bool = False


class TargetEngine:
  """The verifier's engine. Not thread-safe: one owner thread."""

  def __init__(self, model, *, num_slots: int, max_len: int, max_tree_nodes: int,
               max_batch_size: int, prefill_chunk: int = 64, eos_token_ids: Sequence[int] = (),
               cache_dtype=None):
    if max_tree_nodes < 1 or max_batch_size < 1 or num_slots < 1:
      raise ValueError("num_slots, max_tree_nodes and max_batch_size must be >= 1")
    self.config = model.config
    self.graphdef, self.state = split_model(model)
    dtype = cache_dtype or model.dtype
    self.cache = kv.KVCache.init(self.config, num_slots, max_len, dtype)
    self.num_slots, self.max_len = num_slots, max_len
    self.max_tree_nodes, self.max_batch_size = max_tree_nodes, max_batch_size
    self.chunk_sizes = tuple(sorted({min(8, prefill_chunk), prefill_chunk}))
    self.eos_token_ids = frozenset(int(t) for t in (eos_token_ids or self.config.eos_token_ids))
    self._free = list(range(num_slots))
    self._sessions: dict[int, _TargetSession] = {}
    self.last_forward_s = 0.0  # wall time of the last verify/decode/prefill device call
    self.clock = DeviceClock()

  @property
  def num_free_slots(self) -> int:
    return len(self._free)

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  def session(self, slot: int) -> _TargetSession:
    if slot not in self._sessions:
      raise KeyError(f"no open session in slot {slot}")
    return self._sessions[slot]

  def validate_tree(self, tree: DraftTree) -> None:
    tree_lib.validate_wire_tree(tree.tokens, tree.parents, max_nodes=self.max_tree_nodes,
                                vocab_size=self.vocab_size)

  def open(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
           max_new_tokens: int) -> tuple[int, int, bool]:
    """Prefills a prompt into a free slot and samples the first token.

    Returns (slot, first_token, finished). Raises SlotsExhausted or ValueError.
    """
    prompt = self._checked_prompt(prompt_ids, max_new_tokens)
    return self._open_slot(
        prompt, sampling, seed, max_new_tokens,
        fill=lambda cache, slot: prefill(self.graphdef, self.state, cache, slot, prompt, 0,
                                         self.chunk_sizes, self.clock))

  def _checked_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> np.ndarray:
    """The prompt as int64 ids; ValueError naming what is wrong with it or with the budget."""
    prompt = np.asarray(prompt_ids, np.int64)
    if prompt.ndim != 1 or prompt.size == 0:
      raise ValueError("prompt must be a non-empty list of token ids")
    if np.any((prompt < 0) | (prompt >= self.vocab_size)):
      bad = int(prompt[(prompt < 0) | (prompt >= self.vocab_size)][0])
      raise ValueError(f"prompt token {bad} is outside the vocabulary [0, {self.vocab_size})")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    needed = prompt.size + max_new_tokens + self.max_tree_nodes
    if needed > self.max_len:
      raise ValueError(f"prompt ({prompt.size} tokens) + max_new_tokens ({max_new_tokens}) + "
                       f"tree ({self.max_tree_nodes}) needs {needed} cache rows; this server "
                       f"has {self.max_len}")
    return prompt

  def _open_slot(self, prompt: np.ndarray, sampling: SamplingParams, seed: int,
                 max_new_tokens: int, fill) -> tuple[int, int, bool]:
    """Takes a free slot, fills its rows, samples the first token and opens the session.

    `fill(cache, slot) -> (cache, logits [V])` writes rows [0, len(prompt)) of the slot and
    returns the logits after the last prompt token: `open` prefills, the verifier's prefill
    cache (`serving/prefill_cache.py`) restores a snapshot. This is the one place a session
    starts, so the first token is sampled the same way whichever way the rows were filled. If
    `fill` raises, the slot goes back to the free list.
    """
    if not self._free:
      raise SlotsExhausted(f"all {self.num_slots} slots are busy")
    slot = self._free.pop(0)
    start = time.perf_counter()
    try:
      self.cache, logits = fill(self.cache, slot)
    except BaseException:
      self._free.append(slot)
      self._free.sort()
      raise
    seed = int(seed) & 0xFFFFFFFF
    params = sampling_lib.stack_params([sampling])
    keys = verify_lib.request_keys(np.array([seed], np.uint32), np.array([0], np.int32))
    # sample_tokens is jitted at its definition: called eagerly here, a `lax.cond` over fresh
    # closures would otherwise recompile on every open (~1.5 s each on a 2-core CPU).
    first = sampling_lib.sample_tokens(logits[None, None], keys, params["temperature"],
                                       params["top_p"], params["top_k"])
    first = int(first[0, 0])
    self.last_forward_s = time.perf_counter() - start
    finished = first in self.eos_token_ids or max_new_tokens == 1
    self._sessions[slot] = _TargetSession(prefix_len=int(prompt.size), root=first,
                                          sampling=sampling, seed=seed, step=1, generated=1,
                                          max_new_tokens=max_new_tokens, finished=finished)
    return slot, first, finished

  def close(self, slot: int) -> None:
    if slot not in self._sessions:
      raise KeyError(f"no open session in slot {slot}")
    del self._sessions[slot]
    self._free.append(slot)
    self._free.sort()

  def _run(self, requests: Sequence[tuple[int, DraftTree]], capacity: int) -> list[VerifyResult]:
    if not requests:
      return []
    if len(requests) > self.max_batch_size:
      raise ValueError(f"batch of {len(requests)} exceeds max_batch_size {self.max_batch_size}")
    batch = _bucket(len(requests), self.max_batch_size)
    slots = np.zeros(batch, np.int32)
    prefix_len = np.zeros(batch, np.int32)
    tokens = np.zeros((batch, capacity), np.int32)
    parents = np.full((batch, capacity), -1, np.int32)
    num_nodes = np.zeros(batch, np.int32)
    seeds = np.zeros(batch, np.uint32)
    steps = np.zeros(batch, np.int32)
    sessions, params = [], []
    for lane, (slot, tree) in enumerate(requests):
      session = self.session(slot)
      if session.finished:
        raise ValueError(f"session in slot {slot} has finished")
      if int(tree.tokens[0]) != session.root:
        raise ValueError(f"tree root {int(tree.tokens[0])} is not the last emitted token "
                         f"{session.root}")
      n = len(tree.tokens)
      slots[lane], prefix_len[lane], num_nodes[lane] = slot, session.prefix_len, n
      tokens[lane, :n], parents[lane, :n] = tree.tokens, tree.parents
      seeds[lane], steps[lane] = session.seed, session.step
      sessions.append(session)
      params.append(session.sampling)
    params += [sampling_lib.GREEDY] * (batch - len(requests))
    stacked = sampling_lib.stack_params(params)
    start = time.perf_counter()
    self.cache, path_nodes, path_len, bonus, _ = self.clock(
        verify_lib.verify, self.graphdef, self.state, self.cache, slots, prefix_len, tokens, parents, num_nodes,
        stacked["temperature"], stacked["top_p"], stacked["top_k"], seeds, steps)
    path_nodes, path_len, bonus = jax.device_get((path_nodes, path_len, bonus))
    self.last_forward_s = time.perf_counter() - start
    results = []
    for lane, session in enumerate(sessions):
      length = int(path_len[lane])
      accepted = [int(tokens[lane, i]) for i in path_nodes[lane, 1:length]]
      emitted = accepted + [int(bonus[lane])]
      remaining = session.max_new_tokens - session.generated
      finished = False
      for i, token in enumerate(emitted):
        if token in self.eos_token_ids:
          emitted, finished = emitted[:i + 1], True
          break
      if len(emitted) >= remaining:
        emitted, finished = emitted[:remaining], True
      session.prefix_len += length
      session.root = int(bonus[lane])
      session.step += 1
      session.generated += len(emitted)
      session.finished = finished
      results.append(VerifyResult(accepted=accepted, bonus=int(bonus[lane]), emitted=emitted,
                                  finished=finished))
    return results

  def verify(self, requests: Sequence[tuple[int, DraftTree]]) -> list[VerifyResult]:
    """Verifies (slot, tree) requests in one batched forward. Trees must pass validate_tree."""
    return self._run(requests, self.max_tree_nodes)

  def decode(self, slots: Sequence[int]) -> list[VerifyResult]:
    """One autoregressive step for each slot: a root-only tree, i.e. plain decoding."""
    requests = [(slot, DraftTree(np.array([self.session(slot).root], np.int32),
                                 np.array([-1], np.int32))) for slot in slots]
    return self._run(requests, 1)

  def warmup(self, decode: bool = True) -> None:
    """Compiles every batch bucket of verify (and decode) plus both prefill chunk sizes."""
    sizes = sorted({_bucket(b, self.max_batch_size) for b in range(1, self.max_batch_size + 1)})
    # Lanes with num_nodes 0 and prefill chunks with count 0 write nothing (all rows dropped),
    # so warm-up compiles every variant without touching any slot.
    for capacity in ([self.max_tree_nodes, 1] if decode else [self.max_tree_nodes]):
      for size in sizes:
        zeros = np.zeros(size, np.int32)
        self.cache, *_ = verify_lib.verify(
            self.graphdef, self.state, self.cache, zeros, zeros,
            np.zeros((size, capacity), np.int32), np.full((size, capacity), -1, np.int32),
            zeros, np.zeros(size, np.float32), np.ones(size, np.float32), zeros,
            np.zeros(size, np.uint32), zeros)
    for chunk in self.chunk_sizes:
      self.cache, _ = verify_lib.prefill_chunk(self.graphdef, self.state, self.cache,
                                               np.int32(0), np.zeros(chunk, np.int32),
                                               np.int32(0), np.int32(0))


# ================================================================================================
# Edge side.


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
  inflight: tree_lib.Tree | None = None
  proactive: _Proactive | None = None


class DraftEngine:
  """The edge's engine. Not thread-safe: one owner thread."""

  def __init__(self, model, *, num_slots: int, max_len: int, tree: TreeParams = TreeParams(),
               proactive: ProactiveParams = ProactiveParams(), prefill_chunk: int = 64,
               cache_dtype=None):
    self.config = model.config
    self.graphdef, self.state = split_model(model)
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
    self.chunk_sizes = tuple(sorted({min(8, prefill_chunk), prefill_chunk}))
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

  def session(self, slot: int) -> _DraftSession:
    if slot not in self._sessions:
      raise KeyError(f"no open draft session in slot {slot}")
    return self._sessions[slot]

  def open(self, prompt_ids: Sequence[int], first_token: int) -> int:
    if not self._free:
      raise SlotsExhausted("all draft slots are busy")
    if len(prompt_ids) == 0 or len(prompt_ids) >= self.max_len:
      raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the draft cache "
                       f"({self.max_len} rows)")
    slot = self._free.pop(0)
    self.cache, _ = prefill(self.graphdef, self.state, self.cache, slot, prompt_ids, 0,
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

  def draft(self, slot: int) -> DraftTree:
    """Grows the slot's tree from its current root and returns it for verification."""
    session = self.session(slot)
    if session.committed_len + self.capacity > self.max_len:
      raise ValueError(f"draft slot {slot} is full ({session.committed_len} of "
                       f"{self.max_len} rows)")
    params = self.tree_params
    steps = params.max_beam_len
    if self.proactive_params.mode == "included":
      steps = max(params.max_beam_len - session.steps_done, 0)
    grown, session.next_row, self.last_steps = self._grow(
        session, slot, session.tree, next_row=session.next_row, budget=params.max_budget,
        num_steps=steps, params=params)
    session.inflight = grown
    session.proactive = None
    tokens, parents = tree_lib.wire_arrays(grown)
    return DraftTree(tokens=tokens, parents=parents)

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
      self.cache, _ = prefill(self.graphdef, self.state, self.cache, slot,
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


# ================================================================================================
# In-process generation.


@dataclasses.dataclass
class StepStats:
  active: int  # requests in the step
  requests: list[int]  # their indices in the prompt list; the lists below follow this order
  emitted: list[int]  # tokens emitted per request
  tree_sizes: list[int]
  draft_s: float
  verify_s: float
  proactive_hits: list[bool | None]


@dataclasses.dataclass
class GenerationOutput:
  tokens: list[list[int]]  # generated tokens per prompt (first token included)
  steps: list[StepStats]
  wall_s: float

  @property
  def mean_accepted(self) -> float:
    """Mean tokens emitted per verification (bonus included)."""
    counts = [n for s in self.steps for n in s.emitted]
    return float(np.mean(counts)) if counts else 0.0

  @property
  def num_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  def split_by_proactive_hit(self) -> dict[str, tuple[int, float | None, float | None]]:
    """Steps whose tree followed a proactive hit of the same request, and the others:
    {'after_hit' | 'fresh': (steps, mean tree size, mean tokens emitted)}; (0, None, None) when
    a group is empty. Shows whether a hit's re-rooted tree is as good as a freshly grown one."""
    groups = {"after_hit": ([], []), "fresh": ([], [])}
    last_hit: dict[int, bool] = {}
    for step in self.steps:
      for request, size, emitted, hit in zip(step.requests, step.tree_sizes, step.emitted,
                                             step.proactive_hits):
        sizes, tokens = groups["after_hit" if last_hit.get(request) else "fresh"]
        sizes.append(size)
        tokens.append(emitted)
        last_hit[request] = bool(hit)
    return {name: (len(sizes), float(np.mean(sizes)) if sizes else None,
                   float(np.mean(tokens)) if tokens else None)
            for name, (sizes, tokens) in groups.items()}


def generate(target: TargetEngine, prompts: Sequence[Sequence[int]], *,
             draft: DraftEngine | None = None, sampling: SamplingParams = sampling_lib.GREEDY,
             max_new_tokens: int = 32, seed: int = 0) -> GenerationOutput:
  """Generates for all prompts, batched: speculative with `draft`, else autoregressive.

  Requests run in waves of at most `target.max_batch_size` (and the free slots). Each request's
  PRNG key is `seed + its index`, so outputs do not depend on how requests are batched.
  """
  outputs: list[list[int]] = [[] for _ in prompts]
  stats: list[StepStats] = []
  start = time.perf_counter()
  wave = min(target.max_batch_size, target.num_free_slots)
  for first in range(0, len(prompts), wave):
    indices = list(range(first, min(first + wave, len(prompts))))
    target_slot, draft_slot = {}, {}
    for i in indices:
      slot, token, finished = target.open(prompts[i], sampling, seed + i, max_new_tokens)
      target_slot[i] = slot
      outputs[i].append(token)
      if finished:
        target.close(slot)
        del target_slot[i]
      elif draft is not None:
        draft_slot[i] = draft.open(prompts[i], token)
    while target_slot:
      active = sorted(target_slot)
      t0 = time.perf_counter()
      if draft is not None:
        trees = [draft.draft(draft_slot[i]) for i in active]
        for i in active:  # in process there is no wait to hide it in; it still must be exact
          draft.draft_proactive(draft_slot[i])
        t1 = time.perf_counter()
        results = target.verify([(target_slot[i], t) for i, t in zip(active, trees)])
        hits = [draft.commit(draft_slot[i], r) for i, r in zip(active, results)]
        sizes = [len(t.tokens) for t in trees]
      else:
        t1 = time.perf_counter()
        results = target.decode([target_slot[i] for i in active])
        hits, sizes = [None] * len(active), [1] * len(active)
      t2 = time.perf_counter()
      stats.append(StepStats(active=len(active), requests=list(active),
                             emitted=[len(r.emitted) for r in results],
                             tree_sizes=sizes, draft_s=t1 - t0, verify_s=t2 - t1,
                             proactive_hits=hits))
      for i, result in zip(active, results):
        outputs[i].extend(result.emitted)
        if result.finished:
          target.close(target_slot.pop(i))
          if draft is not None:
            draft.close(draft_slot.pop(i))
  return GenerationOutput(tokens=outputs, steps=stats, wall_s=time.perf_counter() - start)
