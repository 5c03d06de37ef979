"""The verifier's engine thread: sole caller of the target engine, and its batching loop.

What this module owns: the jobs the gRPC handlers hand over (open, verify, close), the one thread
that runs them on the engine (`EngineWorker`), the batching policy that groups verifies into one
`engine.verify` call, the verifier's LRU of prompt prefill snapshots (`PrefillCache`), the
`server_batch` events, and `RequestError`, the error type that carries the gRPC status a caller
should see. It reaches the engine only through `api.TargetEngineProtocol`.

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

Where the GIL blocks
--------------------
The engine thread holds the GIL while it assembles a batch in numpy and reads results back, and
releases it while XLA runs the forward (dispatch and device transfers drop the GIL).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time

import grpc
import numpy as np

from specedge_jax import api
from specedge_jax.api import DraftTree, SamplingParams, VerifyResult
from specedge_jax.measure.events import EventLog
from specedge_jax.serving import owner_thread
from specedge_jax.serving.serving_config import BatchingConfig

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


@dataclasses.dataclass
class _VerifyJob(_Job):
  slot: int = -1
  tree: DraftTree = dataclasses.field(kw_only=True)  # always given (by keyword)


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
  """The engine thread: sole owner of the TargetEngine, runs opens, closes and verify batches."""

  def __init__(self, engine: api.TargetEngineProtocol, *, loop: asyncio.AbstractEventLoop,
               batching: BatchingConfig, max_batch_size: int, event_log: EventLog | None = None,
               prefill_cache: PrefillCache | None = None):
    self._engine = engine
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
        timeout = max(0.0, self._pending[0].enqueued_at + self._batching.deadline_s() -
                      time.time())
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

  def _batch_ready(self) -> bool:
    pending = len(self._pending)
    if pending >= self._max_batch_size:
      return True
    waiting_slots = {job.slot for job in self._pending}
    if self._active_slots - self._late_slots <= waiting_slots:  # every due session has joined
      return True
    return time.time() >= self._pending[0].enqueued_at + self._batching.deadline_s()

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
    self._engine.close(job.slot)

  def _run_batch(self) -> None:
    batch: list[_VerifyJob] = []
    while self._pending and len(batch) < self._max_batch_size:
      batch.append(self._pending.popleft())
    if self._batching.mode == "static" and len(batch) < self._max_batch_size:
      # Room was left and the batch ran anyway: due sessions that did not join were waited for
      # until the deadline. Stop waiting for them.
      present = {job.slot for job in batch} | {job.slot for job in self._pending}
      self._late_slots |= self._active_slots - present
    started = time.time()
    try:
      results = self._engine.verify([(job.slot, job.tree) for job in batch])
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
    queue_times = [started - job.enqueued_at for job in batch]
    if self._events is not None:
      self._events.emit("server_batch", t_start=started, t_end=ended, op="verify",
                        batch_size=len(batch),
                        tokens=int(sum(len(job.tree.tokens) for job in batch)),
                        forward_time_s=ended - started,
                        queue_time_s=float(np.mean(queue_times)),
                        request_ids=[job.request_id for job in batch],
                        accepted_depths=[len(result.accepted) for result in results])
    for job, result, queue_time in zip(batch, results, queue_times):
      if result.finished:
        self._active_slots.discard(job.slot)
      self._deliver(job, VerifyOutcome(result=result, queue_time_s=queue_time,
                                       forward_time_s=ended - started, batch_size=len(batch)))
