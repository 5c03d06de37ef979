"""Engines whose outputs can be worked out by hand, for the serving tests.

The fake target's greedy continuation of token t is `successor(t) = (3 t + 1) mod vocab`, so a
request's output is the chain successor(p), successor(successor(p)), ... from its last prompt
token p. The fake draft proposes the true chain to a fixed depth and a wrong sibling at every
level, so each verification accepts exactly `correct_depth` nodes (until max_new_tokens cuts).
Both implement the engine contract (`specedge_jax.api`: `TargetEngineProtocol` and
`DraftEngineProtocol`): slots, SlotsExhausted, EOS and max_new_tokens handling, VerifyResult
fields, prefill snapshots. The type check in the suite holds them to it, and they load no JAX.
Each asserts that only one thread ever calls it, as the contract demands.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Sequence

import numpy as np

from specedge_jax import api
from specedge_jax.api import DraftTree, SamplingParams, SlotsExhausted, VerifyResult


def _check_single_owner(owner: threading.Thread | None, engine: str) -> threading.Thread:
  """The contract: exactly one thread calls an engine. Fails loudly if serving breaks it;
  returns the owner (the first caller)."""
  current = threading.current_thread()
  assert owner is None or owner is current, f"{engine} called from two threads"
  return current


def successor(token: int, vocab_size: int) -> int:
  return (3 * token + 1) % vocab_size


def expected_output(prompt_ids, max_new_tokens: int, vocab_size: int,
                    eos_token_ids=()) -> list[int]:
  out: list[int] = []
  token = prompt_ids[-1]
  while len(out) < max_new_tokens:
    token = successor(token, vocab_size)
    out.append(token)
    if token in eos_token_ids:
      break
  return out


@dataclasses.dataclass(frozen=True)
class FakeSnapshot:
  """The fake's prefill snapshot: its prompt is all a fake session needs."""

  prompt_ids: tuple[int, ...]

  def nbytes(self) -> int:
    return 0

  def to_arrays(self) -> dict[str, np.ndarray]:
    # The prompt itself: something for a store on disk to write, read back and check.
    return {"prompt": np.asarray(self.prompt_ids, np.int64)}

  @classmethod
  def from_arrays(cls, prompt_ids: Sequence[int], arrays: dict[str, np.ndarray]) -> FakeSnapshot:
    prompt = tuple(int(t) for t in prompt_ids)
    if set(arrays) != {"prompt"} or tuple(int(t) for t in arrays["prompt"]) != prompt:
      raise ValueError("the arrays are not a fake snapshot of this prompt")
    return cls(prompt_ids=prompt)


class FakeTargetEngine:
  """Deterministic target: successor() is always the target's token."""

  def __init__(self, *, vocab_size: int = 50, num_slots: int = 4, max_len: int = 256,
               max_tree_nodes: int = 16, max_batch_size: int = 4,
               eos_token_ids: Sequence[int] = (), forward_delay_s: float = 0.0,
               open_delay_s: float = 0.0):
    self.vocab_size, self.num_slots, self.max_len = vocab_size, num_slots, max_len
    self.max_tree_nodes, self.max_batch_size = max_tree_nodes, max_batch_size
    self.eos_token_ids = frozenset(eos_token_ids)
    self.last_forward_s = 0.0
    self.forward_delay_s, self.open_delay_s = forward_delay_s, open_delay_s
    self._free = list(range(num_slots))
    self._sessions: dict[int, dict] = {}
    self.verify_batch_sizes: list[int] = []
    self.opened_prompts: list[tuple[int, ...]] = []
    self._owner: threading.Thread | None = None

  def _check_thread(self) -> None:
    self._owner = _check_single_owner(self._owner, "TargetEngine")

  @property
  def num_free_slots(self) -> int:
    return len(self._free)

  def open(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
           max_new_tokens: int) -> tuple[int, int, bool]:
    self._check_thread()
    if not prompt_ids:
      raise ValueError("prompt must be a non-empty list of token ids")
    api.check_cache_room(len(prompt_ids), max_new_tokens, max_tree_nodes=self.max_tree_nodes,
                         max_len=self.max_len)
    if not self._free:
      raise SlotsExhausted(f"all {self.num_slots} slots are busy")
    slot = self._free.pop(0)
    if self.open_delay_s:
      time.sleep(self.open_delay_s)
    self.opened_prompts.append(tuple(prompt_ids))
    first = successor(prompt_ids[-1], self.vocab_size)
    finished = first in self.eos_token_ids or max_new_tokens == 1
    self._sessions[slot] = dict(root=first, generated=1, max_new=max_new_tokens,
                                finished=finished, prompt=tuple(int(t) for t in prompt_ids))
    return slot, first, finished

  def open_resumed(self, prompt_ids: Sequence[int], generated_ids: Sequence[int], rounds: int,
                   sampling: SamplingParams, seed: int, max_new_tokens: int) -> int:
    self._check_thread()
    if not prompt_ids or not 1 <= len(generated_ids) < max_new_tokens:
      raise ValueError("a resumed request needs a prompt and 1 to max_new_tokens - 1 tokens")
    api.check_cache_room(len(prompt_ids), max_new_tokens, max_tree_nodes=self.max_tree_nodes,
                         max_len=self.max_len)
    if not self._free:
      raise SlotsExhausted(f"all {self.num_slots} slots are busy")
    slot = self._free.pop(0)
    self.opened_prompts.append(tuple(prompt_ids))
    self._sessions[slot] = dict(root=int(generated_ids[-1]), generated=len(generated_ids),
                                max_new=max_new_tokens, finished=False,
                                prompt=tuple(int(t) for t in prompt_ids))
    return slot

  def open_speculative(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
                       max_new_tokens: int) -> int:
    self._check_thread()
    if len(prompt_ids) < 2:
      raise ValueError("a speculative first round needs a prompt of at least 2 tokens")
    api.check_cache_room(len(prompt_ids), max_new_tokens, max_tree_nodes=self.max_tree_nodes,
                         max_len=self.max_len)
    if not self._free:
      raise SlotsExhausted(f"all {self.num_slots} slots are busy")
    slot = self._free.pop(0)
    self.opened_prompts.append(tuple(prompt_ids))
    self._sessions[slot] = dict(root=int(prompt_ids[-1]), generated=0, max_new=max_new_tokens,
                                finished=False, prompt=tuple(int(t) for t in prompt_ids))
    return slot

  def export_prefill(self, slot: int) -> FakeSnapshot:
    self._check_thread()
    return FakeSnapshot(prompt_ids=self._sessions[slot]["prompt"])

  def open_from_prefill(self, snapshot: api.PrefillSnapshot, prompt_ids: Sequence[int],
                        sampling: SamplingParams, seed: int,
                        max_new_tokens: int) -> tuple[int, int, bool]:
    if tuple(prompt_ids) != snapshot.prompt_ids:
      raise ValueError("the snapshot belongs to a different prompt")
    return self.open(prompt_ids, sampling, seed, max_new_tokens)

  def close(self, slot: int) -> None:
    self._check_thread()
    if slot not in self._sessions:
      raise KeyError(f"no open session in slot {slot}")
    del self._sessions[slot]
    self._free.append(slot)
    self._free.sort()

  def verify(self, requests: Sequence[tuple[int, DraftTree]]) -> list[VerifyResult]:
    self._check_thread()
    assert 1 <= len(requests) <= self.max_batch_size, len(requests)
    assert len({slot for slot, _ in requests}) == len(requests), "a slot twice in one batch"
    self.verify_batch_sizes.append(len(requests))
    if self.forward_delay_s:
      time.sleep(self.forward_delay_s)
    return [self._verify_one(slot, tree) for slot, tree in requests]

  def decode(self, slots: Sequence[int]) -> list[VerifyResult]:
    return self.verify([(s, DraftTree.root_only(self._sessions[s]["root"])) for s in slots])

  def _verify_one(self, slot: int, tree: DraftTree) -> VerifyResult:
    session = self._sessions[slot]
    assert not session["finished"], f"slot {slot} already finished"
    tokens, parents = list(tree.tokens), list(tree.parents)
    assert tokens[0] == session["root"], (tokens[0], session["root"])
    node, accepted = 0, []
    while True:
      want = successor(tokens[node], self.vocab_size)
      child = next((i for i in range(1, len(tokens))
                    if parents[i] == node and tokens[i] == want), None)
      if child is None:
        break
      accepted.append(int(want))
      node = child
    bonus = successor(tokens[node], self.vocab_size)
    emitted = accepted + [bonus]
    finished = False
    for i, token in enumerate(emitted):
      if token in self.eos_token_ids:
        emitted, finished = emitted[:i + 1], True
        break
    remaining = session["max_new"] - session["generated"]
    if len(emitted) >= remaining:
      emitted, finished = emitted[:remaining], True
    session.update(root=bonus, generated=session["generated"] + len(emitted), finished=finished)
    return VerifyResult(accepted=accepted, bonus=bonus, emitted=emitted, finished=finished)


class FakeDraftEngine:
  """Proposes the true chain to `correct_depth`, then one wrong token; a wrong sibling per level.

  With proactive drafting on, a "hit" is counted when the whole proposed chain was accepted and
  draft_proactive ran for that tree (the fake's stand-in for guessing the bonus right).
  """

  def __init__(self, *, vocab_size: int = 50, num_slots: int = 2, correct_depth: int = 2,
               proactive: bool = False):
    self.vocab_size, self.num_slots = vocab_size, num_slots
    self.correct_depth, self.proactive = correct_depth, proactive
    self._free = list(range(num_slots))
    self._sessions: dict[int, dict] = {}
    self.calls: list[tuple[str, int]] = []
    self.last_limits = None  # the TreeLimits of the last draft (the fake ignores them)
    self._owner: threading.Thread | None = None

  def _check_thread(self) -> None:
    self._owner = _check_single_owner(self._owner, "DraftEngine")

  @property
  def num_free_slots(self) -> int:
    return len(self._free)

  def open(self, prompt_ids: Sequence[int], first_token: int) -> int:
    self._check_thread()
    if not self._free:
      raise SlotsExhausted("all draft slots are busy")
    slot = self._free.pop(0)
    self._sessions[slot] = dict(root=first_token, inflight=None, proactive_done=False)
    self.calls.append(("open", slot))
    return slot

  def draft(self, slot: int, limits=None) -> DraftTree:
    self._check_thread()
    session = self._sessions[slot]
    self.calls.append(("draft", slot))
    self.last_limits = limits
    tokens, parents = [session["root"]], [-1]
    parent = 0
    for _ in range(self.correct_depth):
      right = successor(tokens[parent], self.vocab_size)
      wrong = (right + 1) % self.vocab_size
      tokens += [right, wrong]
      parents += [parent, parent]
      parent = len(tokens) - 2
    # One wrong continuation below the deepest correct node.
    tokens.append((successor(tokens[parent], self.vocab_size) + 2) % self.vocab_size)
    parents.append(parent)
    tree = DraftTree(tokens=np.array(tokens, np.int32), parents=np.array(parents, np.int32))
    session.update(inflight=tree, proactive_done=False)
    return tree

  def draft_proactive(self, slot: int) -> None:
    self._check_thread()
    self.calls.append(("proactive", slot))
    if self.proactive:
      self._sessions[slot]["proactive_done"] = True

  def abandon_round(self, slot: int) -> None:
    self._check_thread()
    self.calls.append(("abandon", slot))
    self._sessions[slot].update(inflight=None, proactive_done=False)

  def commit(self, slot: int, result: VerifyResult) -> bool | None:
    self._check_thread()
    session = self._sessions[slot]
    assert session["inflight"] is not None, "commit without a tree in flight"
    self.calls.append(("commit", slot))
    hit = session["proactive_done"] and len(result.accepted) == self.correct_depth
    session.update(root=result.bonus, inflight=None, proactive_done=False)
    return hit if self.proactive else None

  def close(self, slot: int) -> None:
    self._check_thread()
    del self._sessions[slot]
    self._free.append(slot)
    self.calls.append(("close", slot))
