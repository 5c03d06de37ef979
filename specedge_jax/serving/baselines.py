"""Server-only baselines, in one process, with the same requests and JSONL events as SpecEdge.

* `autoregressive`: the target alone, continuous batching over KV slots: every step decodes one
  token for each active request in one batched forward (`TargetEngine.decode`); a finished
  request's slot is refilled with the next waiting request at once.
* `speculative`: the reference's server-only SpecExec: draft and target both on the server. Each
  step drafts a tree for every active request on the draft model, then verifies all trees in one
  batched target forward, then commits (`engine.generation.run_round`, the in-process round).
  Drafting is server time here (`server_batch` events with op 'draft'), which is exactly what
  SpecEdge moves to the edges.

Both loops are single-threaded (they own both engines) and emit request_start / request_step /
request_end per request and server_batch per forward, so `metrics.py` reads them like a SpecEdge
run. Nothing here touches the network.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

from specedge_jax import api
from specedge_jax.api import SamplingParams
from specedge_jax.engine.generation import run_round
from specedge_jax.measure.events import EventLog
from specedge_jax.serving.drafter import EdgeRequest, RequestOutput

BASELINES = ("autoregressive", "speculative")
SYSTEM_NAMES = {"autoregressive": "server_only_ar", "speculative": "server_only_spec"}


@dataclasses.dataclass
class _Active:
  request: EdgeRequest
  output: RequestOutput
  target_slot: int
  draft_slot: int | None  # None: no draft engine, or the request finished at its prefill

  def open_draft_slot(self) -> int:
    """The draft slot of a request still in speculative decoding."""
    if self.draft_slot is None:
      raise RuntimeError(f"request {self.request.request_id!r} has no draft slot")
    return self.draft_slot


def run_baseline(kind: str, target: api.TargetEngineProtocol, requests: Sequence[EdgeRequest], *,
                 max_new_tokens: int, sampling: SamplingParams = SamplingParams(), seed: int = 0,
                 draft: api.DraftEngineProtocol | None = None,
                 max_concurrent: int | None = None, event_log: EventLog | None = None,
                 event_tags: dict | None = None, client_id: str = "server",
                 on_progress: Callable[[RequestOutput], None] | None = None
                 ) -> list[RequestOutput]:
  """Serves every request on the server alone; returns outputs in request order.

  Args:
    kind: 'autoregressive' or 'speculative' (needs `draft`, a DraftEngine).
    target: a TargetEngine.
    max_concurrent: requests in flight (the batch), at most the target's max_batch_size and free
      slots; default: as many as fit.
    seed: request i gets seed + i (unless it carries its own seed), as in the drafter.
  """
  if kind not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
  if (kind == "speculative") != (draft is not None):
    raise ValueError("the speculative baseline needs a draft engine, the autoregressive one none")
  limit = min(target.max_batch_size, target.num_free_slots)
  if draft is not None:
    limit = min(limit, draft.num_free_slots)
  concurrent = min(max_concurrent or limit, limit)
  if concurrent < 1:
    raise ValueError("no free slot to serve from")
  tags = dict(event_tags or {})

  def emit(kind_, **fields):
    if event_log is not None:
      event_log.emit(kind_, **tags, **fields)

  waiting = collections.deque(enumerate(requests))
  outputs: dict[int, RequestOutput] = {}  # request index -> its output, set by finish()
  active: dict[int, _Active] = {}
  run_start = time.time()

  def finish(index: int, reason: str) -> None:
    state = active.pop(index)
    target.close(state.target_slot)
    if state.draft_slot is not None:
      if draft is None:
        raise RuntimeError("a draft slot is open without a draft engine")
      draft.close(state.draft_slot)
    state.output.finish_reason = reason
    outputs[index] = state.output
    emit("request_end", request_id=state.request.request_id, client_id=client_id,
         n_generated=len(state.output.tokens), finished_reason=reason,
         output_tokens=state.output.tokens)
    if on_progress is not None:
      on_progress(state.output)

  def reason_of(token: int, finished: bool) -> str:
    return "eos" if finished and token in target.eos_token_ids else "length"

  while waiting or active:
    # Admit: every request is submitted at the start (a closed workload), so its TTFT includes
    # the time it queued for a slot.
    while waiting and len(active) < concurrent:
      index, request = waiting.popleft()
      emit("request_start", t=run_start, request_id=request.request_id, client_id=client_id,
           prompt_tokens=len(request.prompt_ids), dataset=request.dataset,
           category=request.category)
      started = time.time()
      request_seed = request.seed if request.seed is not None else seed + index
      slot, first, finished = target.open(request.prompt_ids, sampling, request_seed,
                                          max_new_tokens)
      now = time.time()
      emit("server_batch", t_start=started, t_end=now, op="prefill", batch_size=1,
           tokens=len(request.prompt_ids), forward_time_s=now - started, queue_time_s=0.0,
           request_ids=[request.request_id])
      output = RequestOutput(request_id=request.request_id,
                             prompt_tokens=len(request.prompt_ids), tokens=[first],
                             finish_reason="")
      draft_slot = None
      if draft is not None and not finished:
        started = time.time()
        draft_slot = draft.open(request.prompt_ids, first)
        now = time.time()
        emit("server_batch", t_start=started, t_end=now, op="draft_prefill", batch_size=1,
             tokens=len(request.prompt_ids), forward_time_s=now - started, queue_time_s=0.0,
             request_ids=[request.request_id])
      emit("request_step", request_id=request.request_id, client_id=client_id, n_tokens=1,
           draft_time_s=0.0, wait_time_s=now - started, tree_size=0, accepted_depth=None,
           proactive_hit=None, phase="prefill")
      active[index] = _Active(request, output, slot, draft_slot)
      if finished:
        finish(index, reason_of(first, True))
    if not active:
      continue
    order = sorted(active)
    request_ids = [active[i].request.request_id for i in order]
    step = run_round(target, [active[i].target_slot for i in order], draft=draft,
                     draft_slots=[active[i].open_draft_slot() for i in order] if draft else ())
    speculative = draft is not None
    if speculative:
      emit("server_batch", t_start=step.t_start, t_end=step.t_drafted, op="draft",
           batch_size=len(order), tokens=sum(step.tree_sizes), forward_time_s=step.draft_s,
           queue_time_s=0.0, request_ids=request_ids)
    emit("server_batch", t_start=step.t_drafted, t_end=step.t_end,
         op="verify" if speculative else "decode", batch_size=len(order),
         tokens=sum(step.tree_sizes), forward_time_s=step.verify_s, queue_time_s=0.0,
         request_ids=request_ids)
    for index, result, size, hit in zip(order, step.results, step.tree_sizes,
                                        step.proactive_hits):
      state = active[index]
      state.output.tokens.extend(result.emitted)
      state.output.steps += 1
      if speculative:
        state.output.accepted_depths.append(len(result.accepted))
      emit("request_step", request_id=state.request.request_id, client_id=client_id,
           n_tokens=len(result.emitted), draft_time_s=step.draft_s, wait_time_s=step.verify_s,
           tree_size=size - 1 if speculative else 0,
           accepted_depth=len(result.accepted) if speculative else None,
           proactive_hit=hit, phase="verify" if speculative else "decode")
      if result.finished:
        finish(index, reason_of(result.emitted[-1] if result.emitted else -1, True))
  # Every request was admitted and left `active` through finish(), which set its output.
  return [outputs[index] for index in range(len(requests))]
