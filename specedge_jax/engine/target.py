"""`TargetEngine`: the server's owner of the target model, its slot KV cache and sessions.

It prefills prompts (or restores a prompt's snapshot, `prefix_cache.py`), verifies batches of
trees with one jitted call (`spec.verify.verify`), and runs plain autoregressive decoding (a
root-only tree per request) for the server-only baseline. It enforces EOS and `max_new_tokens`
and derives each request's PRNG key from its seed and step, so a request's samples do not depend
on how it is batched. It implements `api.TargetEngineProtocol`.

Shapes are fixed: batch sizes are padded to power-of-two buckets up to `max_batch_size`, trees to
`max_tree_nodes`, prompt chunks to two sizes; `warmup()` compiles every variant, so steady-state
serving never recompiles. Not thread-safe: one owner thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from specedge_jax import api
from specedge_jax.api import DraftTree, SamplingParams, VerifyResult
from specedge_jax.engine import prefill as prefill_lib
from specedge_jax.engine import prefix_cache
from specedge_jax.engine.clock import DeviceClock
from specedge_jax.models import kv_cache as kv
from specedge_jax.models import sharding as sharding_lib
from specedge_jax.models.transformer import split_model
from specedge_jax.spec import prefill as spec_prefill
from specedge_jax.spec import sampling as sampling_lib
from specedge_jax.spec import verify as verify_lib

# Decode runs as a root-only tree padded to two nodes, not one: at one node XLA:CPU fuses the
# cache write into whole-cache fusions, and the step is slower than at two (WORKSPACE_NOTES,
# "Decode at two nodes"); the padding node is masked out and writes nothing.
DECODE_CAPACITY = 2


@dataclasses.dataclass
class _TargetSession:
  prompt_ids: tuple[int, ...]
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
               cache_dtype=None, attention_min_rows: int = 128,
               mesh: jax.sharding.Mesh | None = None, consume_model: bool = False,
               tree_buckets: Sequence[int] = ()):
    """`attention_min_rows`: the smallest live-prefix bucket (`kv_cache.attend_buckets`); a
    value >= max_len attends over every row, as before buckets. `mesh`: shard the weights and
    the cache over it (`models/sharding.py`); None keeps everything on one device.
    `tree_buckets`: tree sizes below `max_tree_nodes` that verify also compiles for, so a
    batch of small (or truncated) trees runs a smaller forward; () pads every tree to
    max_tree_nodes. `consume_model`: delete the model's stacked weights while splitting them per layer (peak
    memory: the weights once, not twice); the model is unusable afterwards."""
    if max_tree_nodes < 1 or max_batch_size < 1 or num_slots < 1:
      raise ValueError("num_slots, max_tree_nodes and max_batch_size must be >= 1")
    self.config = model.config
    dtype = cache_dtype or model.dtype
    # Per-layer weight arrays: the compiled verify then slices no weight out of a stacked array
    # inside a layer loop (models/hlo.py; tests/models/test_hlo.py).
    self.graphdef, self.state = split_model(model, layerwise=True, consume=consume_model)
    self.cache = kv.KVCache.init(self.config, num_slots, max_len, dtype)
    self.mesh = mesh
    if mesh is not None:
      self.state, self.cache = sharding_lib.shard_engine_arrays(self.config, mesh, self.state,
                                                                self.cache)
    self.attend_buckets = kv.attend_buckets(max_len, attention_min_rows)
    if any(b < 1 for b in tree_buckets):
      raise ValueError(f"tree buckets must be >= 1, got {tuple(tree_buckets)}")
    self.tree_buckets = tuple(sorted({int(b) for b in tree_buckets if b < max_tree_nodes})
                              ) + (max_tree_nodes,)
    self.num_slots, self.max_len = num_slots, max_len
    self.max_tree_nodes, self.max_batch_size = max_tree_nodes, max_batch_size
    self.chunk_sizes = prefill_lib.chunk_sizes(prefill_chunk)
    self.eos_token_ids = frozenset(int(t) for t in (eos_token_ids or self.config.eos_token_ids))
    self._free = list(range(num_slots))
    self._sessions: dict[int, _TargetSession] = {}
    self.last_forward_s = 0.0  # wall time of the last verify/decode/prefill device call
    self.clock = DeviceClock()

  def _placement(self):
    """The context device calls run in: the mesh, so jitted code pins the cache's sharding
    (`sharding.constrain_cache`); nothing without one."""
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

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

  def open(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
           max_new_tokens: int) -> tuple[int, int, bool]:
    """Prefills a prompt into a free slot and samples the first token.

    Returns (slot, first_token, finished). Raises SlotsExhausted or ValueError.
    """
    prompt = self._checked_prompt(prompt_ids, max_new_tokens)
    return self._open_slot(
        prompt, sampling, seed, max_new_tokens,
        fill=lambda cache, slot: prefill_lib.prefill(self.graphdef, self.state, cache, slot,
                                                     prompt, 0, self.chunk_sizes, self.clock,
                                                     self.attend_buckets))

  def open_resumed(self, prompt_ids: Sequence[int], generated_ids: Sequence[int], rounds: int,
                   sampling: SamplingParams, seed: int, max_new_tokens: int) -> int:
    """Re-opens a request that an earlier session (on this server or one that went away) had
    served: prefills the prompt and every generated token but the last, which becomes the root
    of the next tree. `rounds` verifications were applied, so the PRNG stream continues at step
    rounds + 1 exactly as the earlier session would have. Returns the slot.
    """
    prompt = self._checked_prompt(prompt_ids, max_new_tokens)
    generated = np.asarray(generated_ids, np.int64)
    if generated.ndim != 1 or not 1 <= generated.size < max_new_tokens:
      raise ValueError(f"a resumed request needs 1 to {max_new_tokens - 1} generated tokens "
                       f"(max_new_tokens {max_new_tokens}), got {generated.size}")
    if np.any((generated < 0) | (generated >= self.vocab_size)):
      raise ValueError(f"generated tokens must be in the vocabulary [0, {self.vocab_size})")
    # The first token (or a speculative first round), then >= 1 token per round.
    if not 0 <= rounds <= generated.size:
      raise ValueError(f"{generated.size} generated tokens come from at most "
                       f"{generated.size} verify rounds, got {rounds}")
    if self.eos_token_ids & {int(t) for t in generated}:
      raise ValueError("a resumed request's generated tokens already hold an EOS token")
    known = np.concatenate([prompt, generated[:-1]])
    start = time.perf_counter()
    slot, _ = self._fill_free_slot(
        lambda cache, slot: prefill_lib.prefill(self.graphdef, self.state, cache, slot, known, 0,
                                                self.chunk_sizes, self.clock,
                                                self.attend_buckets))
    self.last_forward_s = time.perf_counter() - start
    self._sessions[slot] = _TargetSession(
        prompt_ids=tuple(int(t) for t in prompt), prefix_len=int(known.size),
        root=int(generated[-1]), sampling=sampling, seed=int(seed) & 0xFFFFFFFF, step=rounds + 1,
        generated=int(generated.size), max_new_tokens=max_new_tokens)
    return slot

  def open_speculative(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
                       max_new_tokens: int) -> int:
    """Opens a request whose first round is speculative: prefills every prompt token but the
    last, which is the root of the first tree (drafted on the edge meanwhile); nothing is
    sampled here. The first `verify` then emits the first tokens, at PRNG step 1 as the first
    round of any session. Returns the slot."""
    prompt = self._checked_prompt(prompt_ids, max_new_tokens)
    if prompt.size < 2:
      raise ValueError("a speculative first round needs a prompt of at least 2 tokens (the last "
                       "one roots the tree)")
    known = prompt[:-1]
    start = time.perf_counter()
    slot, _ = self._fill_free_slot(
        lambda cache, slot: prefill_lib.prefill(self.graphdef, self.state, cache, slot, known, 0,
                                                self.chunk_sizes, self.clock,
                                                self.attend_buckets))
    self.last_forward_s = time.perf_counter() - start
    self._sessions[slot] = _TargetSession(
        prompt_ids=tuple(int(t) for t in prompt), prefix_len=int(known.size),
        root=int(prompt[-1]), sampling=sampling, seed=int(seed) & 0xFFFFFFFF, step=1,
        generated=0, max_new_tokens=max_new_tokens)
    return slot

  def export_prefill(self, slot: int) -> prefix_cache.PrefillSnapshot:
    """Snapshots the prompt rows of a slot that was just opened (before any verify)."""
    session = self.session(slot)
    if session.generated != 1 or session.prefix_len != len(session.prompt_ids):
      raise ValueError(f"slot {slot} is not freshly prefilled; snapshot right after open()")
    return prefix_cache.read_snapshot(self.cache, slot, session.prompt_ids, self.max_len)

  def open_from_prefill(self, snapshot: api.PrefillSnapshot, prompt_ids: Sequence[int],
                        sampling: SamplingParams, seed: int,
                        max_new_tokens: int) -> tuple[int, int, bool]:
    """Like `open`, but copies the snapshot's rows instead of running the prompt forward.

    The last prompt token is still forwarded alone: its logits give the first token, sampled
    exactly as `open` samples it, so a restored session continues like a prefilled one.
    """
    if not isinstance(snapshot, prefix_cache.PrefillSnapshot):
      raise ValueError(f"a {type(snapshot).__name__} is not a snapshot of this engine's cache")
    if tuple(int(t) for t in prompt_ids) != snapshot.prompt_ids:
      raise ValueError("the snapshot belongs to a different prompt")
    prompt = self._checked_prompt(prompt_ids, max_new_tokens)
    prefix_cache.check_snapshot_fits(snapshot, self.cache, self.max_len)

    def restore(cache, slot: int):
      cache = prefix_cache.write_snapshot(cache, slot, snapshot)
      return prefill_lib.prefill(self.graphdef, self.state, cache, slot, prompt[-1:],
                                 snapshot.rows, self.chunk_sizes, self.clock,
                                 self.attend_buckets)

    return self._open_slot(prompt, sampling, seed, max_new_tokens, fill=restore)

  def _checked_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> np.ndarray:
    """The prompt as int64 ids; ValueError naming what is wrong with it or with the budget."""
    prompt = np.asarray(prompt_ids, np.int64)
    if prompt.ndim != 1 or prompt.size == 0:
      raise ValueError("prompt must be a non-empty list of token ids")
    if np.any((prompt < 0) | (prompt >= self.vocab_size)):
      bad = int(prompt[(prompt < 0) | (prompt >= self.vocab_size)][0])
      raise ValueError(f"prompt token {bad} is outside the vocabulary [0, {self.vocab_size})")
    api.check_cache_room(int(prompt.size), max_new_tokens, max_tree_nodes=self.max_tree_nodes,
                         max_len=self.max_len)
    return prompt

  def _fill_free_slot(self, fill) -> tuple[int, object]:
    """Takes the lowest free slot and runs `fill(cache, slot) -> (cache, out)` on it; returns
    (slot, out). If `fill` raises, the slot goes back to the free list."""
    if not self._free:
      raise api.SlotsExhausted(f"all {self.num_slots} slots are busy")
    slot = self._free.pop(0)
    try:
      with self._placement():
        self.cache, out = fill(self.cache, slot)
    except BaseException:
      self._free.append(slot)
      self._free.sort()
      raise
    return slot, out

  def _open_slot(self, prompt: np.ndarray, sampling: SamplingParams, seed: int,
                 max_new_tokens: int, fill) -> tuple[int, int, bool]:
    """Takes a free slot, fills its rows, samples the first token and opens the session.

    `fill(cache, slot) -> (cache, logits [V])` writes rows [0, len(prompt)) of the slot and
    returns the logits after the last prompt token: `open` prefills, `open_from_prefill`
    restores a snapshot. This is the one place a session
    starts, so the first token is sampled the same way whichever way the rows were filled. If
    `fill` raises, the slot goes back to the free list.
    """
    start = time.perf_counter()
    slot, logits = self._fill_free_slot(fill)
    seed = int(seed) & 0xFFFFFFFF
    params = sampling_lib.stack_params([sampling])
    keys = verify_lib.request_keys(np.array([seed], np.uint32), np.array([0], np.int32))
    # sample_tokens is jitted at its definition: called eagerly here, a `lax.cond` over fresh
    # closures would otherwise recompile on every open.
    first = sampling_lib.sample_tokens(logits[None, None], keys, params["temperature"],
                                       params["top_p"], params["top_k"])
    first = int(first[0, 0])
    self.last_forward_s = time.perf_counter() - start
    finished = first in self.eos_token_ids or max_new_tokens == 1
    self._sessions[slot] = _TargetSession(prompt_ids=tuple(int(t) for t in prompt),
                                          prefix_len=int(prompt.size), root=first,
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
    batch = prefill_lib.bucket(len(requests), self.max_batch_size)
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
    params += [api.GREEDY] * (batch - len(requests))
    stacked = sampling_lib.stack_params(params)
    attend_len = kv.attend_rows(int(prefix_len.max()) + capacity, self.attend_buckets)
    start = time.perf_counter()
    with self._placement():
      self.cache, path_nodes, path_len, bonus, _ = self.clock(
          verify_lib.verify, self.graphdef, self.state, self.cache, slots, prefix_len, tokens,
          parents, num_nodes, stacked["temperature"], stacked["top_p"], stacked["top_k"], seeds,
          steps, attend_len=attend_len)
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
    """Verifies (slot, tree) requests in one batched forward. Trees must pass api.validate_tree.
    The batch's trees are padded to the smallest tree bucket that holds the largest of them."""
    largest = max((len(tree.tokens) for _, tree in requests), default=1)
    return self._run(requests, next(b for b in self.tree_buckets if b >= largest)
                     if largest <= self.max_tree_nodes else self.max_tree_nodes)

  def decode(self, slots: Sequence[int]) -> list[VerifyResult]:
    """One autoregressive step for each slot: a root-only tree, i.e. plain decoding."""
    requests = [(slot, DraftTree.root_only(self.session(slot).root)) for slot in slots]
    return self._run(requests, DECODE_CAPACITY)

  def warmup(self, decode: bool = True, prefill_snapshots: bool = False) -> None:
    """Compiles every batch bucket of verify (and decode) at every attention bucket, both
    prefill chunk sizes at every attention bucket they reach, and first-token sampling; with
    `prefill_snapshots`, the snapshot copies in both directions."""
    with self._placement():
      self._warmup(decode, prefill_snapshots)

  def _warmup(self, decode: bool, prefill_snapshots: bool) -> None:
    sizes = sorted({prefill_lib.bucket(b, self.max_batch_size)
                    for b in range(1, self.max_batch_size + 1)})
    # Lanes with num_nodes 0 and prefill chunks with count 0 write nothing (all rows dropped),
    # so warm-up compiles every variant without touching any slot.
    capacities = set(self.tree_buckets) | ({DECODE_CAPACITY} if decode else set())
    for capacity in sorted(capacities):
      for attend_len in kv.reachable_buckets(self.attend_buckets, capacity):
        for size in sizes:
          zeros = np.zeros(size, np.int32)
          self.cache, *_ = verify_lib.verify(
              self.graphdef, self.state, self.cache, zeros, zeros,
              np.zeros((size, capacity), np.int32), np.full((size, capacity), -1, np.int32),
              zeros, np.zeros(size, np.float32), np.ones(size, np.float32), zeros,
              np.zeros(size, np.uint32), zeros, attend_len=attend_len)
    for chunk in self.chunk_sizes:
      for attend_len in kv.reachable_buckets(self.attend_buckets, chunk):
        self.cache, _ = spec_prefill.prefill_chunk(self.graphdef, self.state, self.cache,
                                                   np.int32(0), np.zeros(chunk, np.int32),
                                                   np.int32(0), np.int32(0),
                                                   attend_len=attend_len)
    # One real open compiles the rest of the open path (first-token sampling).
    slot, _, _ = self.open([0], api.GREEDY, 0, 1)
    if prefill_snapshots:
      snapshot = self.export_prefill(slot)
      self.close(slot)
      slot, _, _ = self.open_from_prefill(snapshot, [0], api.GREEDY, 0, 1)
    self.close(slot)
