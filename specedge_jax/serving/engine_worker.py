"""The verifier's engine thread: sole caller of the target engine, and its batching loop.

What this module owns: the jobs the gRPC handlers hand over (open, verify, close), the one thread
that runs them on the engine (`EngineWorker`), the batching policy that groups verifies into one
`engine.verify` call, the verifier's LRU of prompt prefill snapshots (`PrefillCache`), the
`server_batch` events, and `RequestError`, the error type that carries the gRPC status a caller
should see. It reaches the engine only through `api.TargetEngineProtocol`. It also feeds the
verify-time estimator (`verify_time.py`) with every measured verify batch, in every mode, and
saves it when it has a file; the SLO mode's decisions themselves live in `slo_scheduler.py`.

Threads and queues
------------------
Handlers on the event loop put jobs on the inbox (`queue.Queue`, thread-safe) and await an
asyncio future. The engine thread takes jobs in arrival order: opens (prefill) and closes run at
once, verify jobs wait in a pending list until the batching policy releases a batch, which then
runs as ONE `engine.verify` call. Results go back to the loop through `owner_thread.resolve`.
Because opens and closes run in inbox order, a close always frees its slot before any later open
can need it, and a close drops any not-yet-run verify of its slot (the caller gets ABORTED).

Batching policy
---------------
A batch runs when the pending verifies reach `max_batch_size`, or when every *active* session
(open, not finished) has a verify pending (nobody else can join), or at a deadline counted from
the oldest pending verify: `dynamic` mode waits at most `max_wait_ms` (take what is queued),
`static` mode waits for a full batch but at most `static_timeout_s`. A session that a static
batch waited for and that did not come is *late*: no batch waits for it again until it sends a
verify, so a dead or silent client costs the others one bounded wait in all, not one per round,
until its lease runs out and the servicer closes it.

`slo` mode asks `slo_scheduler.start_time` instead of a fixed deadline: a batch runs at once
unless an absent session is expected (its last answer + its measured edge time) before the
latest start that keeps the pending trees whole within the earliest deadline, and never later
than `max_queue_ms` after its oldest verify. `slo_scheduler.plan_batch` then picks the batch and
how many nodes of each tree it keeps; the engine verifies those prefixes, and the answers are the
accepted paths of the cut trees (exact: every emitted token is still a target sample). What the
scheduler needs is kept per slot here: each session's SLO, committed prefix rows, measured
acceptance (counted against the full tree it sent) and edge time. The estimator sees the batch
as verified (after the cut).

Where the GIL blocks
--------------------
The engine thread holds the GIL while it assembles a batch in numpy and reads results back, and
releases it while XLA runs the forward (dispatch and device transfers drop the GIL). After the
answers of a batch are handed to the loop it updates the sessions' acceptance and refits the
estimator (about 0.1 ms), and every `save_every_s` writes the estimator's file (tens of KB), so
none of that delays an answer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import queue
import threading
import time
import typing

import grpc
import numpy as np

from specedge_jax import api
from specedge_jax.api import DraftTree, SamplingParams, VerifyResult
from specedge_jax.measure.events import EventLog
from specedge_jax.serving import batching_rules, owner_thread, slo_scheduler
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verify_time import BatchShape, VerifyTimeEstimator

_log = logging.getLogger(__name__)


class RequestError(Exception):
  """An error with the gRPC status the client should see."""

  def __init__(self, code: grpc.StatusCode, message: str,
               trailing_metadata: tuple[tuple[str, str], ...] = ()):
    super().__init__(message)
    self.code = code
    self.message = message
    self.trailing_metadata = trailing_metadata



@dataclasses.dataclass
class _Job:
  future: asyncio.Future
  request_id: str
  enqueued_at: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class _OpenJob(_Job):
  prompt_ids: tuple[int, ...] = ()
  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  max_new_tokens: int = 1
  resume_tokens: tuple[int, ...] = ()  # non-empty: re-open a request an earlier session served
  resume_rounds: int = 0
  # A speculative first round: prefill prompt[:-1]; prompt[-1] roots the tree verified next.
  speculative: bool = False
  itl_slo_ms: int = 0  # the session's inter-token-latency SLO (0: the server's default)


@dataclasses.dataclass
class _VerifyJob(_Job):
  slot: int = -1
  tree: DraftTree = dataclasses.field(kw_only=True)  # always given (by keyword)
  # Filled in by the engine thread when it takes the job: what the SLO scheduler sees (the
  # context in every mode, the rest in 'slo' mode).
  deadline_s: float = math.inf
  node_values: tuple[float, ...] = ()
  context_len: int = 0


@dataclasses.dataclass
class _SlotState:
  """What the engine thread knows of one open session beyond the engine: for the estimator's
  features and the SLO scheduler."""

  context_len: int  # committed prefix rows in the target's cache
  itl_slo_s: float  # 0: none
  acceptance: slo_scheduler.AcceptanceStats = dataclasses.field(
      default_factory=slo_scheduler.AcceptanceStats)
  last_reply_at: float | None = None  # when its last answer (open or verify) was delivered
  edge_time_s: float | None = None  # running mean of (next verify's arrival - last answer)


@dataclasses.dataclass
class _CloseJob(_Job):
  slot: int = -1


@dataclasses.dataclass(frozen=True)
class OpenResult:
  slot: int
  first_token: int
  finished: bool
  queue_time_s: float
  forward_time_s: float
  prefill_cache_hit: bool


@dataclasses.dataclass(frozen=True)
class VerifyOutcome:
  result: VerifyResult
  queue_time_s: float
  forward_time_s: float
  batch_size: int
  # Tree nodes below the root as sent and as verified ('slo' batching may cut a tree), and
  # whether the cut was for worth (`slo_scheduler.Selection.cut_for_worth`).
  sent_nodes: int = 0
  kept_nodes: int = 0
  cut_for_worth: bool = False


_STOP = object()


class PrefillCache:
  """Prefill snapshots of repeated prompts, keyed by prompt ids (benchmarks replay prompts).

  The engine makes them (`export_prefill`) and restores them (`open_from_prefill`): a restore is
  a copy of the snapshot's rows into a free slot, far cheaper than a forward. LRU-bounded.
  """

  def __init__(self, max_entries: int):
    if max_entries < 1:
      raise ValueError(f"prefill cache needs max_entries >= 1, got {max_entries}")
    self.max_entries = max_entries
    self._entries: collections.OrderedDict[tuple[int, ...], api.PrefillSnapshot] = (
        collections.OrderedDict())
    self.hits = 0
    self.misses = 0

  def get(self, prompt_ids: tuple[int, ...]) -> api.PrefillSnapshot | None:
    snapshot = self._entries.get(prompt_ids)
    if snapshot is None:
      self.misses += 1
      return None
    self._entries.move_to_end(prompt_ids)
    self.hits += 1
    return snapshot

  def put(self, prompt_ids: tuple[int, ...], snapshot: api.PrefillSnapshot) -> None:
    self._entries[prompt_ids] = snapshot
    self._entries.move_to_end(prompt_ids)
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)

  def __len__(self) -> int:
    return len(self._entries)



class EngineWorker:
  """The engine thread: sole owner of the TargetEngine, runs opens, closes and verify batches.

  `verify_time` is the forward-time estimator that 'slo' batching plans with and every mode
  feeds (None: a fresh in-memory one with the default seed); the engine thread is its only user
  once the worker runs, and saves it (if it has a path) every `save_every_s` and at the stop.
  """

  def __init__(self, engine: api.TargetEngineProtocol, *, loop: asyncio.AbstractEventLoop,
               batching: BatchingConfig, max_batch_size: int, event_log: EventLog | None = None,
               prefill_cache: PrefillCache | None = None,
               verify_time: VerifyTimeEstimator | None = None):
    self._engine = engine
    self.verify_time = verify_time if verify_time is not None else VerifyTimeEstimator()
    self._slots: dict[int, _SlotState] = {}
    self._loop = loop
    self._batching = batching
    self._max_batch_size = max_batch_size
    self._events = event_log
    self._prefill_cache = prefill_cache
    self._inbox: queue.Queue = queue.Queue()
    self._pending: collections.deque[_VerifyJob] = collections.deque()
    # Slots that are open and not finished: they may still send a verify. Static batching waits
    # for at most this many.
    self._active_slots: set[int] = set()
    # Active slots that missed a static batch they were waited for (their client is slow, dead or
    # silent): no batch waits for them again until they send a verify. A dead client thus costs
    # the others one bounded wait, not one per round, until its lease runs out.
    self._late_slots: set[int] = set()
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
    self.batches_run = 0
    self.truncated_nodes = 0  # tree nodes 'slo' batching cut off, over all batches

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float | None = 30.0) -> None:
    """Stops after the jobs already queued; pending verifies fail with UNAVAILABLE."""
    if self._thread.is_alive():
      self._inbox.put(_STOP)
      self._thread.join(timeout)

  def submit(self, job: _Job) -> None:
    """Thread-safe; called from the event loop."""
    self._inbox.put(job)

  # -- delivery to the loop ----------------------------------------------------------------------

  def _deliver(self, job: _Job, result=None, error: BaseException | None = None) -> None:
    owner_thread.resolve(self._loop, job.future, result, error)

  # -- the loop ----------------------------------------------------------------------------------

  def _run(self) -> None:
    stopping = False
    while not stopping:
      timeout = None
      if self._pending:
        timeout = max(0.0, self._wake_at() - time.time())
      try:
        item = self._inbox.get(timeout=timeout)
      except queue.Empty:
        item = None
      items = [] if item is None else [item]
      while True:  # drain what else arrived, so one batch sees every queued request
        try:
          items.append(self._inbox.get_nowait())
        except queue.Empty:
          break
      for item in items:
        if item is _STOP:
          stopping = True
          continue
        self._accept(item)
      while self._pending and (stopping or self._batch_ready()):
        if stopping:
          for job in self._pending:
            self._deliver(job, error=RequestError(grpc.StatusCode.UNAVAILABLE,
                                                  "the verifier is shutting down"))
          self._pending.clear()
          break
        self._run_batch()
    try:
      self.verify_time.save()  # no-op without a path
    except OSError as e:
      _log.warning("could not save the verify-time file %s: %s", self.verify_time.path, e)

  def _batch_ready(self) -> bool:
    return batching_rules.batch_ready(
        self._batching, now=time.time(), pending_slots=[job.slot for job in self._pending],
        oldest_enqueued_s=self._pending[0].enqueued_at if self._pending else math.inf,
        active_slots=self._active_slots, late_slots=self._late_slots,
        max_batch_size=self._max_batch_size, slo_wake_at=self._wake_at)

  def _wake_at(self) -> float:
    """When the pending verifies should run (a time already past: now)."""
    if self._batching.mode != "slo":
      return batching_rules.wake_at(self._batching, self._pending[0].enqueued_at)
    waiting_slots = {job.slot for job in self._pending}
    expected = []  # when the absent sessions with a measured edge time should send theirs
    for slot in self._active_slots - waiting_slots:
      state = self._slots.get(slot)
      if state is not None and state.last_reply_at is not None and state.edge_time_s is not None:
        expected.append(state.last_reply_at + state.edge_time_s)
    batching = self._batching
    return slo_scheduler.start_time(
        time.time(), self._candidates(), self.verify_time, max_batch_size=self._max_batch_size,
        max_queue_s=batching.max_queue_ms / 1000.0, margin_s=batching.slo_margin_ms / 1000.0,
        expected_arrivals=expected)

  def _candidates(self) -> list[slo_scheduler.Candidate]:
    return [slo_scheduler.Candidate(key=i, arrival_s=job.enqueued_at, deadline_s=job.deadline_s,
                                    node_values=job.node_values, context_len=job.context_len)
            for i, job in enumerate(self._pending)]

  def _schedule(self, job: _VerifyJob) -> None:
    """Fills in what the SLO scheduler sees of a verify it has just taken: its session's prefix,
    its tree's node values and its round's deadline."""
    state = self._slots.get(job.slot)
    if state is None:  # not opened here (never for an active slot): whole, due at the bound
      job.node_values = (0.0,) * len(job.tree.tokens)
      job.deadline_s = job.enqueued_at + self._batching.max_queue_ms / 1000.0
      return
    job.context_len = state.context_len
    if self._batching.mode != "slo":
      return
    values = state.acceptance.node_values(job.tree.parents)
    job.node_values = tuple(float(v) for v in values)
    # This round's own edge time: from the answer it follows to its arrival here.
    edge_time = (job.enqueued_at - state.last_reply_at if state.last_reply_at is not None
                 else 0.0)
    if state.last_reply_at is not None:
      state.edge_time_s = (edge_time if state.edge_time_s is None
                           else 0.5 * (state.edge_time_s + edge_time))
    job.deadline_s = slo_scheduler.round_deadline(
        job.enqueued_at, itl_slo_s=state.itl_slo_s, expected_emitted=1.0 + float(values.sum()),
        edge_time_s=max(edge_time, 0.0), max_queue_s=self._batching.max_queue_ms / 1000.0)

  def _accept(self, job: _Job) -> None:
    try:
      if isinstance(job, _OpenJob):
        self._deliver(job, self._open(job))
      elif isinstance(job, _CloseJob):
        self._close(job)
        self._deliver(job, None)
      elif isinstance(job, _VerifyJob):
        if job.slot not in self._active_slots:
          raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"slot {job.slot} is not an active session")
        self._late_slots.discard(job.slot)  # it is back: later batches wait for it again
        self._schedule(job)
        self._pending.append(job)
      else:
        raise TypeError(f"unknown job {job!r}")
    except Exception as e:  # pylint: disable=broad-except (the error goes to the caller)
      self._deliver(job, error=e)

  def _open(self, job: _OpenJob) -> OpenResult:
    started = time.time()
    snapshot = (self._prefill_cache.get(job.prompt_ids)
                if self._prefill_cache is not None and not job.resume_tokens
                and not job.speculative else None)
    if job.speculative:
      slot = self._engine.open_speculative(job.prompt_ids, job.sampling, job.seed,
                                           job.max_new_tokens)
      first_token, finished = job.prompt_ids[-1], False
    elif job.resume_tokens:
      slot = self._engine.open_resumed(job.prompt_ids, job.resume_tokens, job.resume_rounds,
                                       job.sampling, job.seed, job.max_new_tokens)
      first_token, finished = job.resume_tokens[-1], False
    elif snapshot is not None:
      slot, first_token, finished = self._engine.open_from_prefill(
          snapshot, job.prompt_ids, job.sampling, job.seed, job.max_new_tokens)
    else:
      slot, first_token, finished = self._engine.open(job.prompt_ids, job.sampling, job.seed,
                                                      job.max_new_tokens)
      if self._prefill_cache is not None:
        try:
          self._prefill_cache.put(job.prompt_ids, self._engine.export_prefill(slot))
        except Exception:  # pylint: disable=broad-except (the session itself is fine)
          _log.exception("could not snapshot the prefill of request %s", job.request_id)
    ended = time.time()
    if not finished:
      self._active_slots.add(slot)
      # Rows before the next tree: the prompt, the resumed tokens but the next root, or for a
      # speculative first round the prompt but its last token (the first tree's root).
      context = (len(job.prompt_ids) - 1 if job.speculative else
                 len(job.prompt_ids) + max(len(job.resume_tokens) - 1, 0))
      slo_ms = job.itl_slo_ms or self._batching.default_itl_slo_ms
      self._slots[int(slot)] = _SlotState(context_len=context, itl_slo_s=slo_ms / 1000.0,
                                          last_reply_at=ended)
    if self._events is not None:
      self._events.emit("server_batch", t_start=started, t_end=ended, op="prefill", batch_size=1,
                        tokens=0 if snapshot is not None else
                        len(job.prompt_ids) + max(len(job.resume_tokens) - 1, 0)
                        - int(job.speculative),
                        forward_time_s=ended - started, queue_time_s=started - job.enqueued_at,
                        request_ids=[job.request_id], prefill_cache_hit=snapshot is not None)
    return OpenResult(slot=int(slot), first_token=int(first_token), finished=bool(finished),
                      queue_time_s=started - job.enqueued_at, forward_time_s=ended - started,
                      prefill_cache_hit=snapshot is not None)

  def _shape(self, batch: list[_VerifyJob], trees: list[DraftTree]) -> BatchShape:
    return BatchShape.of([len(tree.tokens) for tree in trees],
                         [self._slots[job.slot].context_len if job.slot in self._slots else 0
                          for job in batch])

  def _close(self, job: _CloseJob) -> None:
    kept: collections.deque[_VerifyJob] = collections.deque()
    for pending in self._pending:
      if pending.slot == job.slot:
        self._deliver(pending, error=RequestError(grpc.StatusCode.ABORTED,
                                                  "the session was closed during this Verify"))
      else:
        kept.append(pending)
    self._pending = kept
    self._active_slots.discard(job.slot)
    self._late_slots.discard(job.slot)
    self._slots.pop(job.slot, None)
    self._engine.close(job.slot)

  def _take_slo_batch(self) -> tuple[list[_VerifyJob], list[DraftTree], float, list[bool]]:
    """The batch `slo_scheduler.plan_batch` picks, its trees cut to the planned prefixes, the
    estimated forward time and which trees were cut for worth; the rest stays pending, in
    order."""
    batching = self._batching
    plan = slo_scheduler.plan_batch(
        time.time(), self._candidates(), self.verify_time, max_batch_size=self._max_batch_size,
        max_queue_s=batching.max_queue_ms / 1000.0, margin_s=batching.slo_margin_ms / 1000.0)
    jobs = list(self._pending)
    chosen = {selection.key for selection in plan.selections}
    self._pending = collections.deque(job for i, job in enumerate(jobs) if i not in chosen)
    batch = [jobs[typing.cast(int, selection.key)] for selection in plan.selections]
    trees = [job.tree if selection.keep_nodes >= selection.tree_nodes else
             DraftTree(tokens=job.tree.tokens[:selection.keep_nodes],
                       parents=job.tree.parents[:selection.keep_nodes])
             for job, selection in zip(batch, plan.selections)]
    return batch, trees, plan.estimated_s, [s.cut_for_worth for s in plan.selections]

  def _run_batch(self) -> None:
    batch: list[_VerifyJob] = []
    if self._batching.mode == "slo":
      batch, trees, estimated_s, worth_cut = self._take_slo_batch()
    else:
      while self._pending and len(batch) < self._max_batch_size:
        batch.append(self._pending.popleft())
      trees = [job.tree for job in batch]
      worth_cut = [False] * len(batch)
      estimated_s = self.verify_time.predict_s(self._shape(batch, trees))
    # A static batch that ran with room left waited for the due sessions that did not join:
    # stop waiting for them.
    self._late_slots = batching_rules.late_after_batch(
        self._batching, batch_slots=[job.slot for job in batch],
        still_pending_slots=[job.slot for job in self._pending],
        active_slots=self._active_slots, late_slots=self._late_slots,
        max_batch_size=self._max_batch_size)
    started = time.time()
    try:
      results = self._engine.verify([(job.slot, tree) for job, tree in zip(batch, trees)])
      if len(results) != len(batch):
        raise RuntimeError(f"engine.verify returned {len(results)} results for {len(batch)} trees")
    except Exception as e:  # pylint: disable=broad-except
      _log.exception("verify batch of %d failed", len(batch))
      for job in batch:
        # The engine's state for these slots is unknown now: they stop being served.
        self._active_slots.discard(job.slot)
        self._deliver(job, error=RequestError(grpc.StatusCode.INTERNAL,
                                              f"verification failed: {type(e).__name__}: {e}"))
      return
    ended = time.time()
    self.batches_run += 1
    truncated = int(sum(len(job.tree.tokens) - len(tree.tokens)
                        for job, tree in zip(batch, trees)))
    self.truncated_nodes += truncated
    shape = self._shape(batch, trees)
    queue_times = [started - job.enqueued_at for job in batch]
    if self._events is not None:
      self._events.emit("server_batch", t_start=started, t_end=ended, op="verify",
                        batch_size=len(batch), tokens=shape.tree_tokens,
                        forward_time_s=ended - started,
                        queue_time_s=float(np.mean(queue_times)),
                        request_ids=[job.request_id for job in batch],
                        accepted_depths=[len(result.accepted) for result in results],
                        truncated_nodes=truncated, estimated_time_s=estimated_s)
    for job, tree, result, queue_time, cut_for_worth in zip(batch, trees, results, queue_times,
                                                             worth_cut):
      if result.finished:
        self._active_slots.discard(job.slot)
      self._deliver(job, VerifyOutcome(result=result, queue_time_s=queue_time,
                                       forward_time_s=ended - started, batch_size=len(batch),
                                       sent_nodes=len(job.tree.tokens) - 1,
                                       kept_nodes=len(tree.tokens) - 1,
                                       cut_for_worth=cut_for_worth))
    # The answers are on their way; what follows delays none of them, and it is done before this
    # thread takes any later job of these sessions.
    for job, tree, result in zip(batch, trees, results):
      state = self._slots.get(job.slot)
      if state is not None:
        state.context_len += 1 + len(result.accepted)  # the root and the accepted path
        state.last_reply_at = ended
        if self._batching.mode == "slo":  # counted against the full tree the edge sent
          state.acceptance.observe(job.tree.tokens, job.tree.parents, len(tree.tokens),
                                   result.accepted, result.bonus)
    self.verify_time.observe(shape, ended - started)
    self.verify_time.refit()  # now, rather than in the next batch's critical path
    self.verify_time.maybe_save()
