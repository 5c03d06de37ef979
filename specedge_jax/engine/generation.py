"""In-process generation: the draft -> verify -> commit round, and the loop over prompts.

`run_round` is the one round body, shared by `generate` (both engines in one process, for tests
and benchmarks) and by the server-only baselines. Both engines are reached only through the
`api` contract, so the fakes in `specedge_jax.testing` run here too.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from specedge_jax import api
from specedge_jax.api import GREEDY, SamplingParams, VerifyResult


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


@dataclasses.dataclass
class Round:
  """One draft -> verify -> commit round over a set of sessions (or one decode step)."""

  results: list[VerifyResult]
  tree_sizes: list[int]  # nodes per tree, root included (1 when decoding)
  proactive_hits: list[bool | None]
  t_start: float  # wall clock (time.time) at the round's start,
  t_drafted: float  # when every tree was drafted (== t_start when decoding),
  t_end: float  # and when verification returned

  @property
  def draft_s(self) -> float:
    return self.t_drafted - self.t_start

  @property
  def verify_s(self) -> float:
    return self.t_end - self.t_drafted


def run_round(target: api.TargetEngineProtocol, target_slots: Sequence[int], *,
              draft: api.DraftEngineProtocol | None = None,
              draft_slots: Sequence[int] = ()) -> Round:
  """Drafts a tree for every session, verifies them in one batched call and commits the results
  to the draft engine; without `draft`, one autoregressive decode step for every session.

  This is the loop body of in-process generation (`generate`) and of the server-only baselines
  (`serving/baselines.py`). Proactive drafting runs between drafting and verification: in one
  process there is no wait to hide it in, but it must still be exact (a no-op when it is off).
  """
  t_start = time.time()
  if draft is None:
    results = target.decode(target_slots)
    return Round(results=results, tree_sizes=[1] * len(results),
                 proactive_hits=[None] * len(results), t_start=t_start, t_drafted=t_start,
                 t_end=time.time())
  trees = [draft.draft(slot) for slot in draft_slots]
  for slot in draft_slots:
    draft.draft_proactive(slot)
  t_drafted = time.time()
  results = target.verify(list(zip(target_slots, trees)))
  t_end = time.time()
  hits = [draft.commit(slot, result) for slot, result in zip(draft_slots, results)]
  return Round(results=results, tree_sizes=[len(tree.tokens) for tree in trees],
               proactive_hits=hits, t_start=t_start, t_drafted=t_drafted, t_end=t_end)


def generate(target: api.TargetEngineProtocol, prompts: Sequence[Sequence[int]], *,
             draft: api.DraftEngineProtocol | None = None,
             sampling: SamplingParams = GREEDY, max_new_tokens: int = 32,
             seed: int = 0) -> GenerationOutput:
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
      step = run_round(target, [target_slot[i] for i in active], draft=draft,
                       draft_slots=[draft_slot[i] for i in active] if draft is not None else ())
      stats.append(StepStats(active=len(active), requests=list(active),
                             emitted=[len(r.emitted) for r in step.results],
                             tree_sizes=step.tree_sizes, draft_s=step.draft_s,
                             verify_s=step.verify_s, proactive_hits=step.proactive_hits))
      for i, result in zip(active, step.results):
        outputs[i].extend(result.emitted)
        if result.finished:
          target.close(target_slot.pop(i))
          if draft is not None:
            draft.close(draft_slot.pop(i))
  return GenerationOutput(tokens=outputs, steps=stats, wall_s=time.perf_counter() - start)
