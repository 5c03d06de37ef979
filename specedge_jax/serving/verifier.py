"""The verifier server: a grpc.aio service in front of one `TargetEngine`, batching all sessions.

What this module owns: the `specedge.v1.Verifier` service (session table, validation of every
request field, mapping of engine errors to gRPC statuses), the engine thread with its batching
loop, the optional prefill cache, the standard gRPC health service, and the `server_batch` events.
It never touches model internals: everything model-side goes through the `TargetEngine` contract
(`open`, `verify`, `close`, `validate_tree`, `num_free_slots`).

Threads and queues
------------------
* The asyncio event-loop thread runs the gRPC handlers (`VerifierServicer`). It alone reads and
  writes the session table, so the table needs no lock. Handlers validate a request, turn it into
  a job, put it on the engine thread's inbox (`queue.Queue`, thread-safe) and `await` an asyncio
  future. gRPC's C core does its network polling in its own threads, outside the GIL.
* The engine thread (`EngineWorker`) is the only caller of the `TargetEngine` (which is not
  thread-safe). It takes jobs from the inbox in arrival order: opens (prefill) and closes run at
  once, verify jobs wait in a pending list until the batching policy releases a batch, which then
  runs as ONE `engine.verify` call. Results go back to the loop with `call_soon_threadsafe`.
  Because opens and closes run in inbox order, a close always frees its slot before any later open
  can need it, and a close drops any not-yet-run verify of its slot (the caller gets ABORTED).

Batching policy
---------------
A batch runs when the pending verifies reach `max_batch_size`, or when every *active* session
(open, not finished) has a verify pending (nobody else can join), or at a deadline counted from
the oldest pending verify: `dynamic` mode waits at most `max_wait_ms` (take what is queued),
`static` mode waits for a full batch but at most `static_timeout_s` (so a client that died without
closing its session cannot stall everyone).

Backpressure
------------
Each session has at most one verify in flight (a second one is FAILED_PRECONDITION), so pending
verifies never exceed the number of slots. Opens are refused with RESOURCE_EXHAUSTED on the loop
thread, before they queue, when sessions plus opens in flight already fill every slot; the engine's
own `SlotsExhausted` stays as the backstop. Sessions idle longer than `session_timeout_s` are
closed by a reaper task, so abandoned sessions cannot hold slots forever.

Where the GIL blocks
--------------------
The engine thread holds the GIL while it assembles a batch in numpy and reads results back, and
releases it while XLA runs the forward (dispatch and `block_until_ready`/device transfers drop the
GIL). The loop thread needs the GIL for protobuf (de)serialization and validation; these are
microseconds per request, so the two threads barely contend. Tokenizing a text prompt runs on the
loop thread (HF fast tokenizers are Rust, short prompts take well under a millisecond).

Clients come and go: there is no fixed client count and no barrier.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specedge_jax.measure.events import EventLog
from specedge_jax.spec.sampling import SamplingParams
from specedge_jax.serving.proto import specedge_pb2
from specedge_jax.serving.proto import specedge_pb2_grpc

_log = logging.getLogger(__name__)

SERVICE_NAME = "specedge.v1.Verifier"
BATCHING_MODES = ("static", "dynamic")
_MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
  """How the engine thread groups verify requests into one forward.

  mode: 'dynamic' takes what is queued after at most `max_wait_ms`; 'static' waits for a full
    batch (`max_batch_size`, or every active session) but at most `static_timeout_s`.
  """

  mode: str = "dynamic"
  max_wait_ms: float = 0.0
  static_timeout_s: float = 5.0

  def __post_init__(self):
    if self.mode not in BATCHING_MODES:
      raise ValueError(f"batching mode must be one of {BATCHING_MODES}, got {self.mode!r}")
    if not self.max_wait_ms >= 0:
      raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
    if not self.static_timeout_s > 0:
      raise ValueError(f"static_timeout_s must be > 0, got {self.static_timeout_s}")

  def deadline_s(self) -> float:
    return self.static_timeout_s if self.mode == "static" else self.max_wait_ms / 1000.0


@dataclasses.dataclass(frozen=True)
class EngineLimits:
  """What the servicer must know about the engine to validate requests without calling it."""

  vocab_size: int
  num_slots: int
  max_tree_nodes: int  # root included
  max_batch_size: int
  max_len: int

  @classmethod
  def of(cls, engine) -> "EngineLimits":
    missing = [name for name in ("vocab_size", "num_slots", "max_tree_nodes", "max_batch_size",
                                 "max_len") if not hasattr(engine, name)]
    if missing:
      raise TypeError(f"{type(engine).__name__} lacks attributes {missing} the verifier needs")
    return cls(vocab_size=int(engine.vocab_size), num_slots=int(engine.num_slots),
               max_tree_nodes=int(engine.max_tree_nodes),
               max_batch_size=int(engine.max_batch_size), max_len=int(engine.max_len))


class RequestError(Exception):
  """An error with the gRPC status the client should see."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


# ------------------------------------------------------------------------------------------------
# Engine thread


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


@dataclasses.dataclass
class _VerifyJob(_Job):
  slot: int = -1
  tree: Any = None  # engine.DraftTree


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
  result: Any  # engine.VerifyResult
  queue_time_s: float
  forward_time_s: float
  batch_size: int


_STOP = object()


class PrefillCache:
  """Prefilled KV rows of repeated prompts, keyed by prompt ids (benchmarks replay prompts).

  Needs an engine with `export_prefill(slot) -> snapshot` and `open_from_prefill(snapshot,
  prompt_ids, sampling, seed, max_new_tokens) -> (slot, first_token, finished)`: a restore is a
  copy of the snapshot's rows into a free slot, far cheaper than a forward. LRU-bounded.
  """

  def __init__(self, max_entries: int):
    if max_entries < 1:
      raise ValueError(f"prefill cache needs max_entries >= 1, got {max_entries}")
    self.max_entries = max_entries
    self._entries: collections.OrderedDict[tuple[int, ...], Any] = collections.OrderedDict()
    self.hits = 0
    self.misses = 0

  def get(self, prompt_ids: tuple[int, ...]):
    snapshot = self._entries.get(prompt_ids)
    if snapshot is None:
      self.misses += 1
      return None
    self._entries.move_to_end(prompt_ids)
    self.hits += 1
    return snapshot

  def put(self, prompt_ids: tuple[int, ...], snapshot) -> None:
    self._entries[prompt_ids] = snapshot
    self._entries.move_to_end(prompt_ids)
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)

  def __len__(self) -> int:
    return len(self._entries)


class EngineWorker:
  """The engine thread: sole owner of the TargetEngine, runs opens, closes and verify batches."""

  def __init__(self, engine, *, loop: asyncio.AbstractEventLoop, batching: BatchingConfig,
               max_batch_size: int, event_log: EventLog | None = None,
               prefill_cache: PrefillCache | None = None):
    if prefill_cache is not None and not (hasattr(engine, "export_prefill")
                                          and hasattr(engine, "open_from_prefill")):
      raise ValueError(f"{type(engine).__name__} has no export_prefill/open_from_prefill, so the "
                       "prefill cache cannot be used with it")
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
    def resolve():
      if job.future.done():  # cancelled by the loop side
        return
      if error is not None:
        job.future.set_exception(error)
      else:
        job.future.set_result(result)

    try:
      self._loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
      pass

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
    if self._active_slots <= waiting_slots:  # every session that could join has joined
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
        try:
          self._engine.validate_tree(job.tree)
        except ValueError as e:
          raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid tree: {e}") from e
        self._pending.append(job)
      else:
        raise TypeError(f"unknown job {job!r}")
    except Exception as e:  # pylint: disable=broad-except (the error goes to the caller)
      self._deliver(job, error=e)

  def _open(self, job: _OpenJob) -> OpenResult:
    started = time.time()
    snapshot = (self._prefill_cache.get(job.prompt_ids) if self._prefill_cache is not None
                else None)
    if snapshot is not None:
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
                        tokens=0 if snapshot is not None else len(job.prompt_ids),
                        forward_time_s=ended - started, queue_time_s=started - job.enqueued_at,
                        request_ids=[job.request_id], prefill_cache_hit=snapshot is not None)
    return OpenResult(slot=int(slot), first_token=int(first_token), finished=bool(finished),
                      queue_time_s=started - job.enqueued_at, forward_time_s=ended - started,
                      prefill_cache_hit=snapshot is not None)

  def _close(self, job: _CloseJob) -> None:
    kept = collections.deque()
    for pending in self._pending:
      if pending.slot == job.slot:
        self._deliver(pending, error=RequestError(grpc.StatusCode.ABORTED,
                                                  "the session was closed during this Verify"))
      else:
        kept.append(pending)
    self._pending = kept
    self._active_slots.discard(job.slot)
    self._engine.close(job.slot)

  def _run_batch(self) -> None:
    batch: list[_VerifyJob] = []
    while self._pending and len(batch) < self._max_batch_size:
      batch.append(self._pending.popleft())
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
                        request_ids=[job.request_id for job in batch])
    for job, result, queue_time in zip(batch, results, queue_times):
      if result.finished:
        self._active_slots.discard(job.slot)
      self._deliver(job, VerifyOutcome(result=result, queue_time_s=queue_time,
                                       forward_time_s=ended - started, batch_size=len(batch)))


# ------------------------------------------------------------------------------------------------
# gRPC service (event-loop thread)


@dataclasses.dataclass
class _Session:
  session_id: str
  slot: int
  request_id: str
  client_id: str
  prompt_tokens: int
  max_new_tokens: int
  last_token: int  # the root the next tree must carry
  generated: int = 1  # the first token
  finished: bool = False
  broken: str = ""  # why the session can no longer be served, if it cannot
  verify_in_flight: bool = False
  last_used: float = dataclasses.field(default_factory=time.monotonic)


def finish_reason(emitted: Sequence[int], finished: bool, eos_token_ids: Sequence[int]) -> str:
  if not finished:
    return ""
  return "eos" if emitted and emitted[-1] in eos_token_ids else "length"


class VerifierServicer(specedge_pb2_grpc.VerifierServicer):
  """The `specedge.v1.Verifier` handlers. Runs on the event loop; see the module docstring."""

  def __init__(self, worker: EngineWorker, limits: EngineLimits, *,
               make_tree: Callable[[np.ndarray, np.ndarray], Any],
               tokenizer=None, eos_token_ids: Sequence[int] = ()):
    self._worker = worker
    self._limits = limits
    self._make_tree = make_tree
    self._tokenizer = tokenizer
    self._eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self.sessions: dict[str, _Session] = {}
    self._opens_in_flight = 0

  # -- helpers -----------------------------------------------------------------------------------

  async def _run_job(self, job: _Job):
    """Submits a job and waits for its result. The job's result is applied even if the RPC is
    cancelled meanwhile (the future is shielded), so session state never diverges from the
    engine's."""
    self._worker.submit(job)
    return await asyncio.shield(job.future)

  def _session(self, session_id: str) -> _Session:
    if not session_id:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
    session = self.sessions.get(session_id)
    if session is None:
      raise RequestError(grpc.StatusCode.NOT_FOUND,
                         f"no open session {session_id!r} (never opened, closed, or reaped)")
    return session

  def _prompt_ids(self, request: specedge_pb2.OpenSessionRequest) -> tuple[tuple[int, ...], bool]:
    has_text, has_ids = bool(request.prompt_text), len(request.prompt_token_ids) > 0
    if has_text == has_ids:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         "give exactly one of prompt_text and prompt_token_ids "
                         f"(got {'both' if has_text else 'neither'})")
    if has_text:
      if self._tokenizer is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           "this verifier has no tokenizer; send prompt_token_ids")
      ids = tuple(int(t) for t in self._tokenizer.encode(request.prompt_text))
      if not ids:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt_text tokenizes to nothing")
    else:
      ids = tuple(request.prompt_token_ids)
    bad = [t for t in ids if not 0 <= t < self._limits.vocab_size]
    if bad:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"prompt token ids {bad[:5]} are outside the vocabulary "
                         f"[0, {self._limits.vocab_size})")
    return ids, has_text

  def _sampling(self, request: specedge_pb2.OpenSessionRequest) -> SamplingParams:
    proto = request.sampling
    top_p = proto.top_p if proto.HasField("top_p") else 1.0
    try:
      return SamplingParams(temperature=float(proto.temperature), top_p=float(top_p),
                            top_k=int(proto.top_k))
    except ValueError as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}") from e

  async def _guard(self, context: grpc.aio.ServicerContext, handler, *args):
    """Runs a handler body; a RequestError becomes its gRPC status, anything else INTERNAL."""
    try:
      return await handler(*args)
    except RequestError as e:
      await context.abort(e.code, e.message)
    except ValueError as e:  # the engine's own input checks
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except asyncio.CancelledError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if _is_slots_exhausted(e):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no free slot: {e}")
      _log.exception("internal error")
      await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

  # -- handlers ----------------------------------------------------------------------------------

  async def OpenSession(self, request, context):
    return await self._guard(context, self._open_session, request)

  async def Verify(self, request, context):
    return await self._guard(context, self._verify, request)

  async def CloseSession(self, request, context):
    return await self._guard(context, self._close_session, request)

  async def _open_session(self, request: specedge_pb2.OpenSessionRequest):
    prompt_ids, from_text = self._prompt_ids(request)
    sampling = self._sampling(request)
    if not 0 <= request.seed <= _MAX_SEED:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"seed must be >= 0, got {request.seed}")
    if request.max_new_tokens < 1:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    # The engine needs room for the prompt, every generated token and one full tree.
    needed = len(prompt_ids) + request.max_new_tokens + self._limits.max_tree_nodes
    if needed > self._limits.max_len:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                         f"({request.max_new_tokens}) + one tree ({self._limits.max_tree_nodes}) "
                         f"needs {needed} cache rows; this server has max_len "
                         f"{self._limits.max_len}")
    if len(self.sessions) + self._opens_in_flight >= self._limits.num_slots:
      raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"all {self._limits.num_slots} server slots are taken; retry later")
    request_id = request.request_id or uuid.uuid4().hex
    job = _OpenJob(future=self._new_future(), request_id=request_id, prompt_ids=prompt_ids,
                   sampling=sampling, seed=int(request.seed),
                   max_new_tokens=int(request.max_new_tokens))
    self._opens_in_flight += 1
    state = {"session": None, "abandoned": False}
    job.future.add_done_callback(lambda future: self._open_done(job, request, state))
    try:
      opened: OpenResult = await self._run_job(job)
    except asyncio.CancelledError:
      # The caller is gone and will never learn the session id: free the slot once it exists.
      state["abandoned"] = True
      if state["session"] is not None:
        self._abandon(state["session"])
      raise
    session = state["session"]
    return specedge_pb2.OpenSessionResponse(
        session_id=session.session_id, first_token=opened.first_token, finished=opened.finished,
        prompt_tokens=len(prompt_ids), prompt_token_ids=prompt_ids if from_text else (),
        finish_reason=finish_reason([opened.first_token], opened.finished, self._eos_token_ids),
        timing=specedge_pb2.ServerTiming(queue_time_s=opened.queue_time_s,
                                         forward_time_s=opened.forward_time_s, batch_size=1))

  def _open_done(self, job: _OpenJob, request, state: dict) -> None:
    """Registers a successful open (on the loop, even if the RPC was cancelled meanwhile)."""
    self._opens_in_flight -= 1
    if job.future.cancelled() or job.future.exception() is not None:
      return
    opened: OpenResult = job.future.result()
    session = _Session(session_id=uuid.uuid4().hex, slot=opened.slot, request_id=job.request_id,
                       client_id=request.client_id, prompt_tokens=len(job.prompt_ids),
                       max_new_tokens=job.max_new_tokens, last_token=opened.first_token,
                       finished=opened.finished)
    self.sessions[session.session_id] = session
    state["session"] = session
    if state["abandoned"]:
      self._abandon(session)

  def _abandon(self, session: _Session) -> None:
    if self.sessions.pop(session.session_id, None) is not None:
      self._worker.submit(_CloseJob(future=self._new_future(), request_id=session.request_id,
                                    slot=session.slot))

  async def _verify(self, request: specedge_pb2.VerifyRequest):
    session = self._session(request.session_id)
    if session.broken:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"session cannot continue ({session.broken}); close it")
    if session.finished:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         "session already finished; close it")
    if session.verify_in_flight:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         "a Verify for this session is already in flight")
    tokens = np.asarray(request.tokens, np.int64)
    parents = np.asarray(request.parents, np.int64)
    if tokens.shape != parents.shape:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tokens ({tokens.size}) and parents ({parents.size}) differ in length")
    if tokens.size + 1 > self._limits.max_tree_nodes:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tree has {tokens.size + 1} nodes (root included); this server "
                         f"verifies at most {self._limits.max_tree_nodes}")
    if not 0 <= request.root_token < self._limits.vocab_size:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"root_token {request.root_token} is outside the vocabulary "
                         f"[0, {self._limits.vocab_size})")
    out_of_vocab = np.flatnonzero((tokens < 0) | (tokens >= self._limits.vocab_size))
    if out_of_vocab.size:
      i = int(out_of_vocab[0])
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tokens[{i}] = {int(tokens[i])} is outside the vocabulary "
                         f"[0, {self._limits.vocab_size})")
    # Wire node i is tree index i + 1; its parent must be an earlier tree index.
    bad_parent = np.flatnonzero((parents < 0) | (parents > np.arange(parents.size)))
    if bad_parent.size:
      i = int(bad_parent[0])
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"parents[{i}] = {int(parents[i])} must be in [0, {i}] (the root or an "
                         "earlier node)")
    if request.root_token != session.last_token:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"root_token {request.root_token} is not the session's last token "
                         f"{session.last_token}; the client is out of sync")
    tree = self._make_tree(np.concatenate([[request.root_token], tokens]).astype(np.int32),
                           np.concatenate([[-1], parents]).astype(np.int32))
    job = _VerifyJob(future=self._new_future(), request_id=session.request_id, slot=session.slot,
                     tree=tree)
    session.verify_in_flight = True
    session.last_used = time.monotonic()
    job.future.add_done_callback(lambda future: self._verify_done(session, future))
    outcome: VerifyOutcome = await self._run_job(job)
    result = outcome.result
    return specedge_pb2.VerifyResponse(
        accepted_tokens=[int(t) for t in result.accepted], bonus_token=int(result.bonus),
        emitted_tokens=[int(t) for t in result.emitted], finished=bool(result.finished),
        finish_reason=finish_reason(result.emitted, result.finished, self._eos_token_ids),
        timing=specedge_pb2.ServerTiming(queue_time_s=outcome.queue_time_s,
                                         forward_time_s=outcome.forward_time_s,
                                         batch_size=outcome.batch_size))

  def _verify_done(self, session: _Session, future: asyncio.Future) -> None:
    """Applies a verify's outcome to the session (on the loop, even if the RPC was cancelled)."""
    session.verify_in_flight = False
    session.last_used = time.monotonic()
    if future.cancelled():
      return
    error = future.exception()
    if error is None:
      result = future.result().result
      session.last_token = int(result.bonus)
      session.generated += len(result.emitted)
      session.finished = bool(result.finished)
    elif isinstance(error, RequestError) and error.code == grpc.StatusCode.INTERNAL:
      session.broken = error.message

  async def _close_session(self, request: specedge_pb2.CloseSessionRequest):
    session = self._session(request.session_id)
    # Remove first: later calls see NOT_FOUND, and the slot counts as free for new opens, which
    # the engine thread can only run after this close (its inbox is FIFO).
    del self.sessions[session.session_id]
    job = _CloseJob(future=self._new_future(), request_id=session.request_id, slot=session.slot)
    await self._run_job(job)
    return specedge_pb2.CloseSessionResponse(generated_tokens=session.generated)

  def _new_future(self) -> asyncio.Future:
    return asyncio.get_running_loop().create_future()

  async def reap_idle_sessions(self, idle_timeout_s: float) -> list[str]:
    """Closes sessions idle for longer than idle_timeout_s; returns their ids."""
    now = time.monotonic()
    stale = [s for s in self.sessions.values()
             if not s.verify_in_flight and now - s.last_used > idle_timeout_s]
    for session in stale:
      _log.warning("closing session %s (request %s): idle for %.0f s", session.session_id,
                   session.request_id, now - session.last_used)
      self._abandon(session)
    return [s.session_id for s in stale]


def _is_slots_exhausted(error: BaseException) -> bool:
  # Matched by name so that this module does not import the engine (and JAX) for a type check.
  return any(cls.__name__ == "SlotsExhausted" for cls in type(error).__mro__)


# ------------------------------------------------------------------------------------------------
# The server


class VerifierServer:
  """A grpc.aio server with the Verifier and health services, and its engine thread.

  Usage (inside a running event loop):

      server = VerifierServer(engine, batching=BatchingConfig(mode="dynamic"))
      port = await server.start("127.0.0.1:0")
      ...
      await server.stop()
  """

  def __init__(self, engine, *, batching: BatchingConfig = BatchingConfig(),
               make_tree: Callable[[np.ndarray, np.ndarray], Any] | None = None,
               tokenizer=None, eos_token_ids: Sequence[int] | None = None,
               event_log: EventLog | None = None, prefill_cache_entries: int = 0,
               session_timeout_s: float = 600.0, limits: EngineLimits | None = None):
    self.engine = engine
    self.limits = limits or EngineLimits.of(engine)
    self.batching = batching
    if make_tree is None:
      from specedge_jax.engine import DraftTree  # pylint: disable=g-import-not-at-top
      make_tree = lambda tokens, parents: DraftTree(tokens=tokens, parents=parents)
    self._make_tree = make_tree
    self._tokenizer = tokenizer
    self._eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else
                                getattr(engine, "eos_token_ids", ()))
    self.event_log = event_log
    self._prefill_cache = PrefillCache(prefill_cache_entries) if prefill_cache_entries else None
    self._session_timeout_s = session_timeout_s
    self._server: grpc.aio.Server | None = None
    self._health: health.aio.HealthServicer | None = None
    self.worker: EngineWorker | None = None
    self.servicer: VerifierServicer | None = None
    self._reaper: asyncio.Task | None = None
    self.port: int | None = None

  async def start(self, address: str = "127.0.0.1:0") -> int:
    """Starts serving on address ('host:port'; port 0 picks a free one). Returns the port."""
    loop = asyncio.get_running_loop()
    self.worker = EngineWorker(self.engine, loop=loop, batching=self.batching,
                               max_batch_size=self.limits.max_batch_size,
                               event_log=self.event_log, prefill_cache=self._prefill_cache)
    self.servicer = VerifierServicer(self.worker, self.limits, make_tree=self._make_tree,
                                     tokenizer=self._tokenizer,
                                     eos_token_ids=self._eos_token_ids)
    # Trees of max_tree_nodes int32 tokens and parents are small; 16 MiB leaves ample room while
    # still refusing absurd messages before they are parsed.
    self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
    specedge_pb2_grpc.add_VerifierServicer_to_server(self.servicer, self._server)
    self._health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
    self.port = self._server.add_insecure_port(address)
    if not self.port:
      raise OSError(f"cannot bind the verifier to {address}")
    self.worker.start()
    await self._server.start()
    for service in ("", SERVICE_NAME):
      await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
    self._reaper = asyncio.create_task(self._reap_forever())
    return self.port

  async def _reap_forever(self) -> None:
    period = max(0.05, min(30.0, self._session_timeout_s / 4))
    while True:
      await asyncio.sleep(period)
      await self.servicer.reap_idle_sessions(self._session_timeout_s)

  async def stop(self, grace: float | None = 1.0) -> None:
    if self._server is None:
      return
    if self._health is not None:
      await self._health.enter_graceful_shutdown()
    if self._reaper is not None:
      self._reaper.cancel()
    await self._server.stop(grace)
    # Joining the engine thread blocks; do it off the loop so late deliveries cannot deadlock.
    await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
    self._server = None

  async def wait_for_termination(self) -> None:
    await self._server.wait_for_termination()

  @property
  def prefill_cache(self) -> PrefillCache | None:
    return self._prefill_cache
