"""The edge drafter: one draft model, K interleaved user requests, one verifier over gRPC.

What this module owns: the client side of `specedge.v1.Verifier` (open, verify, close, retry when
the server is full), the edge "device" thread that runs every `DraftEngine` call, the pipeline
that interleaves K requests and drafts proactively while a tree is in flight, the simulated
network delay, token streaming to a callback, and the edge's JSONL events (request_start,
request_step, request_end, edge_busy). It never touches model internals: the draft side goes
through the `DraftEngine` contract (`open`, `draft`, `draft_proactive`, `commit`, `close`).

Threads and queues
------------------
* The asyncio event-loop thread runs one task per in-flight user request (at most K =
  `max_concurrent_requests`) plus grpc.aio's client calls. A task never computes: it awaits
  the edge device, then the network, then the device again.
* The edge device thread (`EdgeDevice`) is the only caller of the `DraftEngine` (not
  thread-safe), just as a real edge has one GPU. It serves a priority queue: critical-path work
  (open, draft, commit, close) at priority 0, proactive drafting at priority 1, FIFO within a
  priority. Results go back to the loop with `call_soon_threadsafe`.

Pipeline-aware scheduling: while request A's tree is on the wire or being verified, A's task
is suspended on the gRPC call, so the device thread drafts B's tree. With proactive drafting
on, A also queues `draft_proactive(A)` at low priority before it sends: it runs whenever the
device would otherwise idle, never ahead of another request's draft. When A's answer arrives,
a proactive job that has not started yet is dropped (the answer makes it useless); one already
running finishes before A's commit (same thread, in order). With `interleave=False` the K
requests take turns: a request holds the turn from its draft to its commit, so drafting never
overlaps a verification (the ablation of the paper's pipelining).

Simulated network: `simulated_rtt_ms` sleeps half before each send and half after each
receive, in the request's task, so it delays that request only (as a real link would), not the
device or other requests.

Faults: a Verify whose reply is lost (deadline, cut connection) is sent again with the same
step, which the server answers from its stored result, so nothing is applied twice; an open or a
close whose reply is lost is sent again too (an open with the same request_id gets the session it
made). When the verifier loses the session itself (it went away or restarted: UNAVAILABLE,
NOT_FOUND), the round is abandoned on the device and the request resumes in a new session that
carries every token already emitted, retrying with backoff and jitter until
`reconnect_give_up_s`. Tokens reach `on_tokens` only from answered rounds, so a user sees none
twice and misses none.
An open refused for the edge's tokenizer (FAILED_PRECONDITION: the verifier's target speaks other
token ids) is never retried: it fails as `TokenizerRefused`, and so does `run`.

Where the GIL blocks: the device thread holds the GIL while it builds small numpy trees and
releases it while XLA runs the draft model; the loop thread takes it for protobuf work and
callbacks, microseconds per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from specedge_jax import api
from specedge_jax.api import SamplingParams, VerifyResult
from specedge_jax.data.tokenizer_fingerprint import TokenizerFingerprint
from specedge_jax.measure.events import EventLog
from specedge_jax.serving import owner_thread
from specedge_jax.serving.proto import specedge_pb2
from specedge_jax.serving.proto import specedge_pb2_grpc

_log = logging.getLogger(__name__)

# on_tokens(request_id, new_tokens, finished)
TokenCallback = Callable[[str, list[int], bool], None]


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """How one edge drafter serves its requests."""

  client_id: str = "edge0"
  max_concurrent_requests: int = 2  # K: requests interleaved on this edge
  # The reference's first round: the edge drafts on the prompt before opening, and the server
  # prefills and verifies that tree in the open (prompt_ids requests of >= 2 tokens).
  speculative_first_round: bool = False
  # `submit`: requests beyond the K running wait, first come first served, in a queue of this
  # many places; past it `submit` raises QueueFull (the HTTP API answers 429).
  max_queued_requests: int = 16
  interleave: bool = True  # draft one request while another waits on the server
  proactive: bool = False  # call draft_proactive while a tree is in flight
  max_new_tokens: int = 64
  sampling: SamplingParams = SamplingParams()
  seed: int = 0  # request i of this drafter gets seed + i (unless the request has its own)
  simulated_rtt_ms: float = 0.0
  open_retry_initial_s: float = 0.02  # backoff when the server has no free slot
  open_retry_max_s: float = 1.0
  open_give_up_s: float = 300.0
  # After the verifier went away mid-request: how long to try to resume the request elsewhere or
  # after a restart before failing it.
  reconnect_give_up_s: float = 60.0
  rpc_timeout_s: float = 120.0
  # A Verify whose reply is lost (deadline, dropped connection) is sent again with the same step:
  # the server answers a repeated step with the stored answer, so nothing is applied twice.
  verify_retries: int = 3
  verify_retry_initial_s: float = 0.05
  # The inter-token-latency SLO every session of this edge asks the verifier for, in ms (0:
  # none, the server's default applies). A verifier batching in 'slo' mode may then verify only
  # a prefix of a tree; the answer is still a path of the tree sent, which `commit` takes as is.
  itl_slo_ms: int = 0
  # This edge's draft model, as its events name it (request_start's draft_model; '' leaves it
  # out), and its tokenizer, sent at every open so that the verifier can refuse a foreign one.
  draft_model: str = ""
  tokenizer: TokenizerFingerprint | None = None

  def __post_init__(self):
    if self.max_concurrent_requests < 1:
      raise ValueError(f"max_concurrent_requests must be >= 1, got "
                       f"{self.max_concurrent_requests}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.verify_retries < 0:
      raise ValueError(f"verify_retries must be >= 0, got {self.verify_retries}")
    if not 0 <= self.itl_slo_ms < 2**31:
      raise ValueError(f"itl_slo_ms must be in [0, 2**31), got {self.itl_slo_ms}")
    if self.max_queued_requests < 0:
      raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
    if not self.simulated_rtt_ms >= 0:
      raise ValueError(f"simulated_rtt_ms must be >= 0, got {self.simulated_rtt_ms}")


@dataclasses.dataclass(frozen=True)
class EdgeRequest:
  """One user request: a prompt as token ids or as text (tokenized by the server)."""

  request_id: str
  prompt_ids: tuple[int, ...] = ()
  prompt_text: str = ""
  dataset: str | None = None
  category: str | None = None
  seed: int | None = None  # the server sampler's seed; None: DrafterConfig.seed + position
  max_new_tokens: int | None = None  # None: DrafterConfig.max_new_tokens
  sampling: SamplingParams | None = None  # None: DrafterConfig.sampling

  def __post_init__(self):
    if bool(self.prompt_ids) == bool(self.prompt_text):
      raise ValueError(f"request {self.request_id!r}: give exactly one of prompt_ids and "
                       "prompt_text")
    if self.max_new_tokens is not None and self.max_new_tokens < 1:
      raise ValueError(f"request {self.request_id!r}: max_new_tokens must be >= 1, got "
                       f"{self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class RoundUpdate:
  """What one round of a request gave its user (`Drafter.submit` streams these).

  Round 0 is the first token (the server's prefill); rounds 1, 2, ... are verification rounds.
  With a speculative first round there is no round 0: round 1 brings the first tokens.
  A request that fails ends with an update of no tokens, finish_reason 'error', the message and
  the gRPC status name of the failure (`error_code`, '' when it did not come from the server).
  """

  tokens: tuple[int, ...]  # emitted to the user by this round (accepted path + bonus)
  round: int
  accepted: int = 0  # draft tokens the verifier accepted this round
  tree_size: int = 0  # draft tokens sent this round
  finished: bool = False
  finish_reason: str = ""  # '' while running; then 'eos' | 'length' | 'error' | 'cancelled'
  error: str = ""
  error_code: str = ""


class QueueFull(RuntimeError):
  """`Drafter.submit`: K requests are running and the wait queue is full."""


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt_tokens: int
  tokens: list[int]  # generated tokens, the first one included
  finish_reason: str  # 'eos' | 'length' | 'error'
  steps: int = 0  # verification rounds
  accepted_depths: list[int] = dataclasses.field(default_factory=list)
  proactive_hits: list[bool] = dataclasses.field(default_factory=list)
  error: str = ""


class EdgeDevice:
  """The edge GPU: one thread runs every DraftEngine call, lowest priority number first."""

  CRITICAL, PROACTIVE = 0, 1

  @dataclasses.dataclass
  class Job:
    fn: Callable[..., Any]
    args: tuple
    op: str
    future: asyncio.Future
    cancelled: bool = False
    started: bool = False
    duration_s: float = 0.0

  def __init__(self, loop: asyncio.AbstractEventLoop, *, client_id: str,
               event_log: EventLog | None = None, event_tags: dict | None = None):
    self._loop = loop
    self._client_id = client_id
    self._events = event_log
    self._tags = event_tags or {}
    self._queue: queue.PriorityQueue = queue.PriorityQueue()
    self._order = itertools.count()
    self._thread = threading.Thread(target=self._run, name=f"edge-{client_id}", daemon=True)
    self._thread.start()
    self.busy_s = 0.0

  def submit(self, fn: Callable[..., Any], *args, op: str,
             priority: int = CRITICAL) -> "EdgeDevice.Job":
    job = EdgeDevice.Job(fn=fn, args=args, op=op, future=self._loop.create_future())
    self._queue.put((priority, next(self._order), job))
    return job

  async def run(self, fn: Callable[..., Any], *args, op: str) -> Any:
    """Runs fn(*args) on the device at critical priority and returns its result."""
    return await self.submit(fn, *args, op=op).future

  @staticmethod
  def cancel(job: "EdgeDevice.Job") -> bool:
    """Drops a job that has not started; True if it was dropped. (A flag read by the device
    thread: the GIL makes the read and write atomic, and a job that already started is left to
    finish.)"""
    if job.started:
      return False
    job.cancelled = True
    return True

  def stop(self) -> None:
    self._queue.put((-1, next(self._order), None))
    self._thread.join()

  def _run(self) -> None:
    while True:
      _, _, job = self._queue.get()
      if job is None:
        return
      if job.cancelled:
        self._resolve(job, None, None)
        continue
      job.started = True
      started = time.time()
      try:
        result, error = job.fn(*job.args), None
      except Exception as e:  # pylint: disable=broad-except (the awaiting task re-raises it)
        result, error = None, e
      ended = time.time()
      job.duration_s = ended - started
      self.busy_s += job.duration_s
      if self._events is not None:
        self._events.emit("edge_busy", client_id=self._client_id, t_start=started, t_end=ended,
                          op=job.op, **self._tags)
      self._resolve(job, result, error)

  def _resolve(self, job, result, error) -> None:
    owner_thread.resolve(self._loop, job.future, result, error)


class ServerError(RuntimeError):
  """The verifier answered with an error status (`code`), or could not be reached."""

  def __init__(self, message: str, code: grpc.StatusCode | None = None):
    super().__init__(message)
    self.code = code


class TokenizerRefused(ServerError):
  """The verifier refused this edge's tokenizer (FAILED_PRECONDITION at OpenSession, its message
  naming what differs). Never retried: no open of this edge succeeds until a model changes."""


# A round that failed with these is served again in a new session that resumes the request: the
# verifier went away (UNAVAILABLE), came back without the session (NOT_FOUND), or never answered.
# CANCELLED reaches a client as an AioRpcError only from the other side: a server that stops
# cancels the calls in flight (our own cancellation is asyncio.CancelledError instead).
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# A call that may be sent again as it is: its reply was lost, or the server was going away.
_RETRIABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.CANCELLED)


class RequestStream:
  """The live output of one submitted request: async-iterate its `RoundUpdate`s (the last one
  has `finished`), or `cancel()` it. Made by `Drafter.submit`."""

  def __init__(self):
    self._updates: asyncio.Queue[RoundUpdate] = asyncio.Queue()
    self._task: asyncio.Task | None = None
    self._done = False

  def __aiter__(self) -> "RequestStream":
    return self

  async def __anext__(self) -> RoundUpdate:
    if self._done:
      raise StopAsyncIteration
    if self._task is None:
      raise RuntimeError("RequestStream: not started by Drafter.submit")
    getter = asyncio.ensure_future(self._updates.get())
    try:
      # The task ends after its last update (or by cancellation, with none): wait for both.
      await asyncio.wait({getter, self._task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      if not getter.done():
        getter.cancel()
    if getter.done() and not getter.cancelled():
      update = getter.result()
    elif not self._updates.empty():
      update = self._updates.get_nowait()
    else:
      self._done = True
      raise StopAsyncIteration
    if update.finished:
      self._done = True
    return update

  async def cancel(self) -> None:
    """Stops the request now: nothing more is emitted, and its draft slot and server session
    are freed by its own task, which this does not wait for (so a caller that is itself being
    cancelled, such as a handler whose HTTP client went away, cannot cut the clean-up short).
    Idempotent; a finished request is left as it is."""
    self._done = True
    if self._task is not None and not self._task.done():
      self._task.cancel()

  @property
  def output(self) -> RequestOutput | None:
    """The request's output once its task has ended normally; None before, or if cancelled."""
    if self._task is None or not self._task.done() or self._task.cancelled():
      return None
    return self._task.result()

  async def closed(self) -> RequestOutput | None:
    """Waits until the request has also freed its slots; its output (None if cancelled)."""
    if self._task is not None:
      await asyncio.wait({self._task})
    return self.output


@dataclasses.dataclass
class _Control:
  """A request's side of the speculation controller: the verifier's advice for its next tree
  (None: the configured tree) and the network part of its last round, sent with the next."""

  limits: api.TreeLimits | None = None
  rtt_s: float = 0.0

  def update(self, response: specedge_pb2.VerifyResponse, wait_s: float) -> None:
    timing = response.timing
    self.rtt_s = max(wait_s - timing.queue_time_s - timing.forward_time_s, 0.0)
    advice = response.next_tree
    self.limits = (api.TreeLimits(budget=advice.budget, depth=advice.depth)
                   if advice.budget > 0 and advice.depth > 0 else None)


class Drafter:
  """Serves a list of requests through one verifier, K at a time, on one draft engine.

  Usage (inside a running event loop):

      async with grpc.aio.insecure_channel("127.0.0.1:50051") as channel:
        drafter = Drafter(draft_engine, channel, DrafterConfig(client_id="edge0"))
        outputs = await drafter.run(requests)          # a fixed workload, K at a time

  or, as a long-lived service (the HTTP API's backend):

      await drafter.start()
      stream = drafter.submit(EdgeRequest(...))      # QueueFull when K run and the queue is full
      async for update in stream: ...                # one RoundUpdate per round
      await stream.cancel()                          # early: frees its slots on both sides
      await drafter.stop()
  """

  def __init__(self, engine: api.DraftEngineProtocol, channel: grpc.aio.Channel,
               config: DrafterConfig, *, event_log: EventLog | None = None,
               event_tags: dict | None = None, on_tokens: TokenCallback | None = None):
    self.engine = engine
    self.config = config
    self._stub = specedge_pb2_grpc.VerifierStub(channel)
    self._events = event_log
    self._tags = dict(event_tags or {})
    self._on_tokens = on_tokens
    self._device: EdgeDevice | None = None
    self._turn: asyncio.Lock | None = None
    self._slots = asyncio.Semaphore(config.max_concurrent_requests)
    self._running = 0  # requests holding one of the K places
    self._queued = 0  # requests waiting for one
    self._tasks: set[asyncio.Task] = set()
    self._closing: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()  # in their clean-up
    self._seeds = itertools.count()  # `submit`'s default seeds: config.seed + arrival order
    self.refused: TokenizerRefused | None = None  # the verifier's refusal of our tokenizer

  @property
  def _edge(self) -> EdgeDevice:
    """The edge device, from `start()` to `stop()`."""
    if self._device is None:
      raise RuntimeError("Drafter: the edge device is used before start()")
    return self._device

  @property
  def _turn_lock(self) -> asyncio.Lock:
    """The turn (interleave=False: one request drafts at a time), from `start()` on."""
    if self._turn is None:
      raise RuntimeError("Drafter: the turn lock is used before start()")
    return self._turn

  def _emit(self, kind: str, **fields) -> None:
    if self._events is not None:
      self._events.emit(kind, client_id=self.config.client_id, **self._tags, **fields)

  async def _network_delay(self) -> None:
    if self.config.simulated_rtt_ms > 0:
      await asyncio.sleep(self.config.simulated_rtt_ms / 2000.0)

  async def _call(self, method, request):
    await self._network_delay()
    try:
      response = await method(request, timeout=self.config.rpc_timeout_s)
    except grpc.aio.AioRpcError as e:
      raise ServerError(f"{e.code().name}: {e.details()}", e.code()) from e
    await self._network_delay()
    return response

  async def _verify(self, request: specedge_pb2.VerifyRequest) -> specedge_pb2.VerifyResponse:
    """A Verify, sent again (same step, so idempotent on the server) when its reply is lost."""
    delay = self.config.verify_retry_initial_s
    for attempt in range(self.config.verify_retries + 1):
      await self._network_delay()
      try:
        response = await self._stub.Verify(request, timeout=self.config.rpc_timeout_s)
      except grpc.aio.AioRpcError as e:
        retriable = e.code() in _RETRIABLE
        if not retriable or attempt == self.config.verify_retries:
          raise ServerError(f"{e.code().name}: {e.details()}", e.code()) from e
        _log.warning("Verify of %s step %d: %s; retrying", request.session_id[:8], request.step,
                     e.code().name)
        await asyncio.sleep(delay)
        delay *= 2
        continue
      await self._network_delay()
      return response
    raise AssertionError("unreachable: the last attempt returns or raises")

  # -- lifecycle and admission -------------------------------------------------------------------

  async def start(self) -> None:
    """Starts the edge device thread; `submit` works from here until `stop`."""
    if self._device is not None:
      raise RuntimeError("Drafter.start(): already started")
    loop = asyncio.get_running_loop()
    self._device = EdgeDevice(loop, client_id=self.config.client_id, event_log=self._events,
                              event_tags=self._tags)
    self._turn = asyncio.Lock()
    self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)

  async def stop(self) -> None:
    """Cancels what still runs or waits (freeing its slots on both sides), then stops the
    device thread."""
    tasks = list(self._tasks)
    for task in tasks:
      if task not in self._closing:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    device, self._device = self._device, None
    if device is not None:
      await asyncio.get_running_loop().run_in_executor(None, device.stop)

  def stats(self) -> dict[str, int]:
    """Requests running and queued, and the edge's free draft slots (one per running request)."""
    return dict(running=self._running, queued=self._queued,
                free_slots=self.config.max_concurrent_requests - self._running,
                max_running=self.config.max_concurrent_requests,
                max_queued=self.config.max_queued_requests)

  def submit(self, request: EdgeRequest) -> "RequestStream":
    """Starts serving `request` beside the others (at most K run; the rest wait their turn) and
    returns its stream of `RoundUpdate`s. Raises QueueFull when K run and the queue is full."""
    if self._device is None:
      raise RuntimeError("Drafter.submit() before start()")
    # Counted synchronously: a request submitted a moment ago may not have taken its place yet.
    held = self._running + self._queued
    k = self.config.max_concurrent_requests
    if held >= k + self.config.max_queued_requests:
      raise QueueFull(f"{k} requests are running on edge {self.config.client_id} and "
                      f"{held - k} are queued (the most: {self.config.max_queued_requests}); "
                      "retry later")
    seed = request.seed if request.seed is not None else self.config.seed + next(self._seeds)
    stream = RequestStream()
    stream._task = self._spawn(request, seed, stream._updates.put_nowait,
                               submitted_at=time.time())
    return stream

  def _spawn(self, request: EdgeRequest, seed: int,
             on_round: Callable[[RoundUpdate], None] | None,
             submitted_at: float | None = None) -> asyncio.Task:
    """A task that waits for one of the K places, then serves the request in it.

    `submitted_at` (a live request's arrival) starts the request's clock, so its TTFT holds
    its wait for a place; None (a replayed workload) starts it when it takes its place."""
    self._queued += 1

    async def serve_in_turn() -> RequestOutput:
      queued = True
      try:
        async with self._slots:
          self._queued, queued = self._queued - 1, False
          self._running += 1
          try:
            return await self._serve(request, seed, on_round, submitted_at)
          finally:
            self._running -= 1
      finally:
        if queued:  # cancelled while it waited for a place
          self._queued -= 1

    task = asyncio.get_running_loop().create_task(serve_in_turn())
    self._tasks.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(self._tasks.discard)
    return task

  async def run(self, requests: Sequence[EdgeRequest]) -> list[RequestOutput]:
    """Serves every request; K at a time, in order. Returns outputs in request order.

    Request i gets the seed `config.seed + i` unless it has its own. The queue bound of
    `submit` does not apply: the whole list is this call's own workload. Raises
    `TokenizerRefused` when the verifier refused this edge's tokenizer (every open fails alike:
    the run as a whole did, not some of its requests)."""
    await self.start()
    try:
      tasks = [self._spawn(request, request.seed if request.seed is not None
                           else self.config.seed + index, None)
               for index, request in enumerate(requests)]
      outputs = list(await asyncio.gather(*tasks))
    finally:
      await self.stop()
    if self.refused is not None:
      raise self.refused
    return outputs

  async def _open_session(self, request: EdgeRequest, seed: int,
                          resume: RequestOutput | None = None, prompt_ids: Sequence[int] = (),
                          first_tree: api.DraftTree | None = None):
    """Opens the request's server session, retrying with backoff while the server is full or
    unreachable. With `resume` (the request's output so far), a new session continues it."""
    config = self.config
    params = request.sampling or config.sampling
    sampling = specedge_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                           top_k=params.top_k)
    message = specedge_pb2.OpenSessionRequest(
        prompt_text=request.prompt_text, prompt_token_ids=request.prompt_ids, sampling=sampling,
        seed=seed, max_new_tokens=request.max_new_tokens or config.max_new_tokens,
        client_id=config.client_id, request_id=request.request_id,
        itl_slo_ms=config.itl_slo_ms)
    if config.tokenizer is not None:
      message.tokenizer.CopyFrom(specedge_pb2.TokenizerFingerprint(**config.tokenizer.to_fields()))
    give_up_s = config.open_give_up_s
    if first_tree is not None:
      message.first_tree.tokens[:] = np.asarray(first_tree.tokens)[1:].tolist()
      message.first_tree.parents[:] = np.asarray(first_tree.parents)[1:].tolist()
    if resume is not None:
      message.ClearField("prompt_text")  # the server's own tokenization, from the first session
      message.prompt_token_ids[:] = list(prompt_ids)
      message.resume_tokens[:] = resume.tokens
      message.resume_rounds = resume.steps
      give_up_s = config.reconnect_give_up_s
    delay, give_up = config.open_retry_initial_s, time.monotonic() + give_up_s
    while True:
      await self._network_delay()
      try:
        try:
          response = await self._stub.OpenSession(message, timeout=config.rpc_timeout_s)
          await self._network_delay()
        except asyncio.CancelledError:
          self._reclaim_later(message)
          raise
        return response
      except grpc.aio.AioRpcError as e:
        # A full server is normal under load, and a restarting one comes back: back off and
        # retry (with jitter, so edges do not retry in step), with no barrier or global
        # coordination between clients, until the give-up time.
        # A lost reply (DEADLINE_EXCEEDED) is safe to retry too: an open with the same
        # request_id gets the session the first one made.
        refused = dict(e.trailing_metadata() or ()).get("specedge-refused")
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION and refused == "tokenizer":
          self.refused = TokenizerRefused(f"OpenSession: {e.code().name}: {e.details()}",
                                          e.code())
          raise self.refused from e
        transient = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or e.code() in _RETRIABLE
        if not transient or time.monotonic() > give_up:
          raise ServerError(f"OpenSession: {e.code().name}: {e.details()}", e.code()) from e
        hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
        if hint is not None and str(hint).isdigit():  # the server knows best when to come back
          delay = min(int(hint) / 1000.0, config.open_retry_max_s * 4)
      await asyncio.sleep(delay * random.uniform(0.5, 1.0))
      delay = min(2 * delay, config.open_retry_max_s)

  async def _open_draft(self, prompt_ids: Sequence[int], root: int) -> int:
    """Prefills the draft model on the edge device; returns the draft slot. A cancelled caller
    still gets the slot freed: the device opens it all the same, so it is closed after."""
    job = self._edge.submit(self.engine.open, prompt_ids, root, op="prefill")
    try:
      return await asyncio.shield(job.future)
    except asyncio.CancelledError:
      with contextlib.suppress(Exception):
        slot = await job.future
        await self._edge.run(self.engine.close, slot, op="close")
      raise

  def _reclaim_later(self, message: specedge_pb2.OpenSessionRequest) -> None:
    """Frees the session an open may have made on the server although its caller went away
    while it was in flight (a cancelled request): the same open again, which is idempotent (it
    returns that session, or makes one), then a close, in a task of its own. Without it the
    slot would come back only at the end of its lease."""

    async def reclaim() -> None:
      try:
        opened = await self._stub.OpenSession(message, timeout=2.0)
        await self._stub.CloseSession(
            specedge_pb2.CloseSessionRequest(session_id=opened.session_id), timeout=2.0)
      except grpc.aio.AioRpcError as e:  # best effort: the lease frees it otherwise
        _log.info("freeing the session of cancelled request %s: %s", message.request_id,
                  e.code().name)

    task = asyncio.get_running_loop().create_task(reclaim())
    self._tasks.add(task)
    self._closing.add(task)  # `stop` lets it finish
    task.add_done_callback(self._tasks.discard)

  async def _serve(self, request: EdgeRequest, seed: int,
                   on_round: Callable[[RoundUpdate], None] | None = None,
                   submitted_at: float | None = None) -> RequestOutput:
    """Serves one request to its end. A cancelled request (its user went away) still frees its
    draft slot and closes its server session before the cancellation goes on."""
    t_place = time.time()
    t_submit = submitted_at if submitted_at is not None else t_place
    # request_start's edge fields: the wait for a place, and the draft model that serves it.
    start_fields: dict[str, Any] = dict(queue_wait_s=t_place - t_submit)
    if self.config.draft_model:
      start_fields["draft_model"] = self.config.draft_model
    report = on_round or (lambda update: None)
    output = RequestOutput(request_id=request.request_id, prompt_tokens=len(request.prompt_ids),
                           tokens=[], finish_reason="error")
    session_id: str | None = None
    draft_slot: int | None = None
    started_logged = False
    try:
      if self.config.speculative_first_round and len(request.prompt_ids) >= 2:
        # The reference's first round: draft on prompt[:-1] rooted at the last prompt token, and
        # let the server prefill and verify that tree in the open itself.
        prompt_ids = tuple(request.prompt_ids)
        slot = draft_slot = await self._open_draft(prompt_ids[:-1], prompt_ids[-1])
        draft_job = self._edge.submit(self.engine.draft, slot, op="draft")
        tree = await draft_job.future
        sent = time.time()
        opened = await self._open_session(request, seed, first_tree=tree)
        wait_time = time.time() - sent
        session_id = opened.session_id
        output.prompt_tokens = opened.prompt_tokens
        self._emit("request_start", t=t_submit, request_id=request.request_id,
                   prompt_tokens=opened.prompt_tokens, dataset=request.dataset,
                   category=request.category, **start_fields)
        started_logged = True
        first = opened.first_round
        result = VerifyResult(accepted=list(first.accepted_tokens), bonus=int(first.bonus_token),
                              emitted=list(first.emitted_tokens), finished=bool(first.finished))
        hit = await self._edge.run(self.engine.commit, slot, result, op="commit")
        output.steps = 1
        output.tokens.extend(first.emitted_tokens)
        output.accepted_depths.append(len(first.accepted_tokens))
        if hit is not None:
          output.proactive_hits.append(bool(hit))
        tree_size = int(np.asarray(tree.tokens).size - 1)
        self._emit("request_step", request_id=request.request_id,
                   n_tokens=len(first.emitted_tokens), phase="verify", first_round=True,
                   draft_time_s=draft_job.duration_s, wait_time_s=wait_time, tree_size=tree_size,
                   accepted_depth=len(first.accepted_tokens),
                   proactive_hit=None if hit is None else bool(hit),
                   server_queue_time_s=first.timing.queue_time_s,
                   server_forward_time_s=first.timing.forward_time_s,
                   server_batch_size=first.timing.batch_size)
        self._stream(list(first.emitted_tokens), first.finished, request.request_id)
        finished, reason, root = first.finished, first.finish_reason, first.bonus_token
        report(RoundUpdate(tokens=tuple(first.emitted_tokens), round=1,
                           accepted=len(first.accepted_tokens), tree_size=tree_size,
                           finished=finished,
                           finish_reason=(reason or "length") if finished else ""))
      else:
        opened = await self._open_session(request, seed)
        session_id = opened.session_id
        prompt_ids = tuple(request.prompt_ids) or tuple(opened.prompt_token_ids)
        output.prompt_tokens = opened.prompt_tokens
        self._emit("request_start", t=t_submit, request_id=request.request_id,
                   prompt_tokens=opened.prompt_tokens, dataset=request.dataset,
                   category=request.category, **start_fields)
        started_logged = True
        output.tokens.append(opened.first_token)
        self._emit("request_step", request_id=request.request_id, n_tokens=1, draft_time_s=0.0,
                   wait_time_s=time.time() - t_place, tree_size=0, accepted_depth=None,
                   proactive_hit=None, phase="prefill")
        self._stream([opened.first_token], opened.finished, request.request_id)
        report(RoundUpdate(tokens=(opened.first_token,), round=0, finished=opened.finished,
                           finish_reason=(opened.finish_reason or "length") if opened.finished
                           else ""))
        finished, reason = opened.finished, opened.finish_reason
        root = opened.first_token
        if not finished:
          slot = draft_slot = await self._open_draft(prompt_ids, opened.first_token)
      if not finished:
        control = _Control()
        while not finished:
          try:
            if self.config.interleave:
              response, step = await self._round(request, session_id, slot, root, output.steps,
                                                 control)
            else:
              async with self._turn_lock:
                response, step = await self._round(request, session_id, slot, root,
                                                   output.steps, control)
          except ServerError as e:
            if e.code not in _RESUMABLE:
              raise
            # The verifier lost this session (it went away, restarted, or never answered): the
            # round is dropped on both sides and the request resumes in a new session, which
            # re-prefills the prompt plus every token already emitted. Nothing streamed is lost
            # or repeated: tokens reach the user only from answered rounds.
            _log.warning("request %s: %s; resuming it in a new session", request.request_id, e)
            await self._edge.run(self.engine.abandon_round, slot, op="abandon")
            old_session, session_id = session_id, None
            await self._close_quietly(old_session)
            reopened = await self._open_session(request, seed, resume=output,
                                                prompt_ids=prompt_ids)
            session_id = reopened.session_id
            self._emit("request_resumed", request_id=request.request_id,
                       n_generated=len(output.tokens), reason=e.code.name if e.code else "")
            continue
          output.steps += 1
          output.tokens.extend(response.emitted_tokens)
          output.accepted_depths.append(len(response.accepted_tokens))
          if step["proactive_hit"] is not None:
            output.proactive_hits.append(bool(step["proactive_hit"]))
          self._emit("request_step", request_id=request.request_id,
                     n_tokens=len(response.emitted_tokens), phase="verify", **step)
          self._stream(list(response.emitted_tokens), response.finished, request.request_id)
          finished, reason, root = response.finished, response.finish_reason, response.bonus_token
          report(RoundUpdate(tokens=tuple(response.emitted_tokens), round=output.steps,
                             accepted=len(response.accepted_tokens), tree_size=step["tree_size"],
                             finished=finished, finish_reason=(reason or "length") if finished
                             else ""))
      output.finish_reason = reason or "length"
    except asyncio.CancelledError:
      # The user went away (`RequestStream.cancel`, `stop`): clean up below, then go on
      # cancelling. What was emitted stays emitted; nothing more is sent.
      output.finish_reason = "cancelled"
      raise
    except Exception as e:  # pylint: disable=broad-except (one request's failure is reported)
      _log.error("request %s failed: %s", request.request_id, e)
      output.error = f"{type(e).__name__}: {e}"
      output.finish_reason = "error"
      code = e.code.name if isinstance(e, ServerError) and e.code is not None else ""
      report(RoundUpdate(tokens=(), round=output.steps, finished=True, finish_reason="error",
                         error=output.error, error_code=code))
    finally:
      # From here the request only cleans up; `stop` lets that finish rather than cut it short.
      task = asyncio.current_task()
      if task is not None:
        self._closing.add(task)
      if not started_logged:
        self._emit("request_start", t=t_submit, request_id=request.request_id,
                   prompt_tokens=output.prompt_tokens, dataset=request.dataset,
                   category=request.category, **start_fields)
      if draft_slot is not None:
        await self._edge.run(self.engine.close, draft_slot, op="close")
      if session_id is not None:
        await self._close(request.request_id, session_id)
      self._emit("request_end", request_id=request.request_id, n_generated=len(output.tokens),
                 finished_reason=output.finish_reason, error=output.error or None,
                 output_tokens=output.tokens)
    return output

  async def _close(self, request_id: str, session_id: str) -> None:
    """Closes the server session, again when the reply is lost (a NOT_FOUND then means the
    first close went through); what is left open the server frees at the end of its lease."""
    for attempt in range(self.config.verify_retries + 1):
      try:
        await self._call(self._stub.CloseSession,
                         specedge_pb2.CloseSessionRequest(session_id=session_id))
        return
      except ServerError as e:
        if attempt and e.code == grpc.StatusCode.NOT_FOUND:
          return
        if e.code not in _RETRIABLE:
          _log.warning("closing session of %s: %s", request_id, e)
          return
    _log.warning("closing session of %s: no answer; the server frees it after its lease",
                 request_id)

  async def _close_quietly(self, session_id: str | None) -> None:
    """Best effort: a session the verifier may already have lost (it would free it at the end of
    its lease anyway)."""
    if session_id is None:
      return
    try:
      await self._stub.CloseSession(specedge_pb2.CloseSessionRequest(session_id=session_id),
                                    timeout=min(self.config.rpc_timeout_s, 2.0))
    except grpc.aio.AioRpcError:
      pass

  async def _round(self, request: EdgeRequest, session_id: str, draft_slot: int, root: int,
                   round_index: int, control: "_Control"):
    """One draft -> verify -> commit round of one request (its `round_index`-th). `control`
    carries the verifier's advice for this tree and this edge's measured network time of the
    last round, and is updated from this round's answer."""
    draft_job = self._edge.submit(self.engine.draft, draft_slot, control.limits, op="draft")
    tree = await draft_job.future
    tokens = np.asarray(tree.tokens)
    parents = np.asarray(tree.parents)
    if int(tokens[0]) != root:
      raise RuntimeError(f"draft engine rooted the tree at {int(tokens[0])}, expected {root}")
    proactive_job = None
    if self.config.proactive:
      proactive_job = self._edge.submit(self.engine.draft_proactive, draft_slot,
                                        op="proactive", priority=EdgeDevice.PROACTIVE)
    sent = time.time()
    try:
      response = await self._verify(specedge_pb2.VerifyRequest(
          session_id=session_id, root_token=root, tokens=tokens[1:].tolist(),
          parents=parents[1:].tolist(), step=round_index, edge_rtt_s=control.rtt_s,
          edge_draft_s=draft_job.duration_s))
    finally:
      # Answered or not (failed, cancelled), the proactive tree of this round is useless now; one
      # not yet started must not run later on a slot that is being abandoned, closed or reused.
      if proactive_job is not None:
        EdgeDevice.cancel(proactive_job)
    wait_time = time.time() - sent
    control.update(response, wait_time)
    result = VerifyResult(accepted=list(response.accepted_tokens), bonus=int(response.bonus_token),
                          emitted=list(response.emitted_tokens), finished=bool(response.finished))
    hit = await self._edge.run(self.engine.commit, draft_slot, result, op="commit")
    return response, dict(draft_time_s=draft_job.duration_s, wait_time_s=wait_time,
                          tree_size=int(tokens.size - 1),
                          accepted_depth=len(response.accepted_tokens),
                          proactive_hit=None if hit is None else bool(hit),
                          server_queue_time_s=response.timing.queue_time_s,
                          server_forward_time_s=response.timing.forward_time_s,
                          server_batch_size=response.timing.batch_size,
                          tree_limits=None if control.limits is None else
                          [control.limits.budget, control.limits.depth])

  def _stream(self, tokens: list[int], finished: bool, request_id: str) -> None:
    if self._on_tokens is not None:
      self._on_tokens(request_id, tokens, finished)
