"""The layer-split baseline over gRPC: the tail server, the head edge client, and their runners.

The reference's layer-split baseline (`layer_split_head.py` / `layer_split_tail.py`) runs the
target's first L layers on the edge and sends the hidden state of every token to the server,
which runs the rest and answers with the next token. This module owns that system's serving
side over `specedge.layersplit.v1.LayerSplitTail` (`proto/layer_split.proto`):

* the hidden-state messages (`hidden_to_proto`, `hidden_from_proto`, which validates dtype, shape
  and byte length before anything reaches the engine);
* `LayerSplitServer`: a grpc.aio server in front of one `TailEngine`, with the servicer
  (`LayerSplitServicer`: sessions bound to their caller, leases, idempotent steps, every field
  validated, gRPC statuses) and the engine thread (`TailWorker`: the only caller of the engine,
  batching Steps across sessions);
* `LayerSplitEdge`: the edge client serving K requests (interleaved, or taking turns) with a
  `HeadEngine` on the edge device thread (`drafter.EdgeDevice`);
* the runners: `serve_tail` and `run_head` (the two processes of `launch/layer_split.py`) and
  `run_layer_split` (both in one process, on the config's workload).

Events (`measure/events.py`, system 'layer_split'): the server logs `server_batch` with op
'prefill' (one per prompt chunk) and 'decode' (one per batched Step forward); the edge logs
request_start, request_step (phase 'prefill' for the first token, 'decode' for every Step, with
the server's timing), request_end, and edge_busy (op 'prefill', 'decode', 'close'), so
`measure/metrics.py` summarizes a run like SpecEdge's and the server-only baselines'.

Threads and queues
------------------
Server: handlers run on the event loop, which alone reads and writes the session table. They
validate a request, turn it into a job for the engine thread (`queue.Queue` inbox) and await an
asyncio future, resolved through `owner_thread.resolve`. The engine thread runs opens, prompt
chunks and closes at once, in inbox order, and holds Steps in a pending list until the batching
policy releases them as ONE `TailEngine.decode` call: `dynamic` runs what is queued after at
most `max_wait_ms`; `static` waits until every active session has a Step pending (or a full
batch), at most `static_timeout_s`, and stops waiting for a session that missed a batch until it
sends again. A session has at most one Step in flight, so pending Steps never exceed the slots.
Opens beyond the free slots are refused with RESOURCE_EXHAUSTED (no admission queue; the edge
backs off and retries).

Edge: one task per in-flight request (at most K) on the event loop; the device thread runs
every `HeadEngine` call. A task awaits the device (a prompt chunk, or one token's hidden state),
then the server. The prompt's chunks stream to the server as the device computes them, so the
tail prefills chunk i while the head computes chunk i + 1. With `interleave=False`, a request
holds a turn from its head step to the server's answer, so device work never overlaps a
request's wait (the ablation of pipelining).

Where the GIL blocks: both owner threads hold it while they assemble numpy buffers and release
it while XLA runs; the loop thread takes it for protobuf work and the byte conversions
(microseconds per token row).

This module never touches model internals: the engines are `engine/layer_split.py`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import queue
import random
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

import grpc
import numpy as np
from google.protobuf import message as protobuf_message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specedge_jax import api
from specedge_jax.api import SamplingParams, VerifyResult
from specedge_jax.engine.layer_split import (WIRE_DTYPES, Agreement, HeadEngine, HiddenStates,
                                             TailEngine, greedy_agreement)
from specedge_jax.engine.layer_split import generate as generate_split
from specedge_jax.measure.events import EventLog
from specedge_jax.serving import health_wait, owner_thread
from specedge_jax.serving import security as security_lib
from specedge_jax.serving import workload
from specedge_jax.serving.drafter import EdgeDevice, EdgeRequest, RequestOutput, ServerError
from specedge_jax.serving.engine_worker import RequestError
from specedge_jax.serving.servicer import (MAX_LABEL_CHARS, Identify, caller_of, owned_session,
                                           short_id)
from specedge_jax.serving.proto import layer_split_pb2 as pb
from specedge_jax.serving.proto import layer_split_pb2_grpc as pb_grpc
from specedge_jax.serving.serving_config import BatchingConfig, ServingConfig

_log = logging.getLogger(__name__)

SERVICE_NAME = "specedge.layersplit.v1.LayerSplitTail"
SYSTEM = "layer_split"  # the events' `system`
_MAX_SEED = 2**63 - 1
# One message may hold this much; a prompt chunk of the reference's 32B model (64 rows x 5120
# values in fp32) is 1.3 MiB.
MAX_MESSAGE_BYTES = 16 << 20

_DTYPE_TO_PROTO = {"bf16": pb.HIDDEN_DTYPE_BF16, "fp16": pb.HIDDEN_DTYPE_FP16,
                   "fp32": pb.HIDDEN_DTYPE_FP32}
_PROTO_TO_DTYPE = {number: name for name, number in _DTYPE_TO_PROTO.items()}


# ------------------------------------------------------------------------------------------------
# Hidden states on the wire.


def hidden_to_proto(hidden: HiddenStates) -> pb.HiddenStates:
  return pb.HiddenStates(shape=list(hidden.shape), dtype=_DTYPE_TO_PROTO[hidden.dtype],
                         data=hidden.data)


def hidden_from_proto(message: pb.HiddenStates, *, hidden_size: int, max_rows: int,
                      field: str) -> np.ndarray:
  """The validated values [rows, hidden_size] (float32) of a hidden-state message.

  Raises RequestError(INVALID_ARGUMENT) naming `field` and what is wrong: an unknown dtype, a
  shape that is not [1..max_rows, hidden_size], a byte length that does not match the shape and
  dtype, or a NaN / infinity. Sizes are checked before the bytes are read.
  """

  def refuse(why: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}")

  dtype = _PROTO_TO_DTYPE.get(message.dtype)
  if dtype is None:
    try:
      name = pb.HiddenDtype.Name(message.dtype)
    except ValueError:
      name = str(message.dtype)
    raise refuse(f"dtype {name} is not one of {sorted(WIRE_DTYPES)}")
  shape = list(message.shape)
  if len(shape) != 2:
    raise refuse(f"shape must be [rows, hidden_size], got {len(shape)} dimensions "
                 f"{shape[:4]}{'...' if len(shape) > 4 else ''}")
  rows, width = shape
  if width != hidden_size:
    raise refuse(f"hidden_size is {width}; this server's model has {hidden_size}")
  if not 1 <= rows <= max_rows:
    raise refuse(f"{rows} rows; this message takes 1 to {max_rows}")
  needed = rows * width * WIRE_DTYPES[dtype].itemsize
  if len(message.data) != needed:
    raise refuse(f"shape {shape} in {dtype} needs {needed} bytes of data, got "
                 f"{len(message.data)}")
  try:
    return HiddenStates(shape=(rows, width), dtype=dtype, data=message.data).to_array()
  except ValueError as e:
    raise refuse(str(e)) from None


def _sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
  return pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)


def _finish_reason(token: int, finished: bool, eos_token_ids) -> str:
  if not finished:
    return ""
  return "eos" if token in eos_token_ids else "length"


# ------------------------------------------------------------------------------------------------
# The server's engine thread.


class TailEngineProtocol(Protocol):
  """What the server needs of its engine (`engine.layer_split.TailEngine` implements it)."""

  num_slots: int
  max_len: int
  max_batch_size: int
  eos_token_ids: frozenset[int]

  @property
  def hidden_size(self) -> int: ...

  @property
  def vocab_size(self) -> int: ...

  def begin(self, prompt_tokens: int, sampling: SamplingParams, seed: int,
            max_new_tokens: int) -> int: ...

  def extend(self, slot: int, hidden) -> None: ...

  def finish_prefill(self, slot: int) -> tuple[int, bool]: ...

  def decode(self, requests: Sequence[tuple[int, np.ndarray]]) -> list[VerifyResult]: ...

  def close(self, slot: int) -> None: ...


@dataclasses.dataclass
class _Job:
  future: asyncio.Future
  request_id: str
  enqueued_at: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class _BeginJob(_Job):
  prompt_tokens: int = 1
  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  max_new_tokens: int = 1


@dataclasses.dataclass
class _PrefillJob(_Job):
  slot: int = -1
  hidden: np.ndarray = dataclasses.field(kw_only=True)  # [T, D]
  last: bool = False  # the prompt's last rows: sample the first token after them


@dataclasses.dataclass
class _StepJob(_Job):
  slot: int = -1
  hidden: np.ndarray = dataclasses.field(kw_only=True)  # [1, D]


@dataclasses.dataclass
class _CloseJob(_Job):
  slot: int = -1


@dataclasses.dataclass(frozen=True)
class PrefillOutcome:
  queue_time_s: float
  forward_time_s: float
  first_token: int | None  # set after the prompt's last rows
  finished: bool


@dataclasses.dataclass(frozen=True)
class StepOutcome:
  result: VerifyResult
  queue_time_s: float
  forward_time_s: float
  batch_size: int


_STOP = object()


class TailWorker:
  """The engine thread: sole caller of the TailEngine; runs opens, chunks, closes and batches of
  Steps (module docstring)."""

  def __init__(self, engine: TailEngineProtocol, *, loop: asyncio.AbstractEventLoop,
               batching: BatchingConfig, event_log: EventLog | None = None,
               event_tags: dict | None = None):
    self._engine = engine
    self._loop = loop
    self._batching = batching
    self._events = event_log
    self._tags = dict(event_tags or {})
    self._inbox: queue.Queue = queue.Queue()
    self._pending: collections.deque[_StepJob] = collections.deque()
    self._active_slots: set[int] = set()  # prefilled, not finished: may still send a Step
    self._late_slots: set[int] = set()  # missed a static batch: not waited for until they send
    self._thread = threading.Thread(target=self._run, name="tail-engine", daemon=True)
    self.batches_run = 0

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float | None = 30.0) -> None:
    """Stops after the jobs already queued; pending Steps fail with UNAVAILABLE."""
    if self._thread.is_alive():
      self._inbox.put(_STOP)
      self._thread.join(timeout)

  def submit(self, job: _Job) -> None:
    """Thread-safe; called from the event loop."""
    self._inbox.put(job)

  def _deliver(self, job: _Job, result=None, error: BaseException | None = None) -> None:
    owner_thread.resolve(self._loop, job.future, result, error)

  def _emit(self, kind: str, **fields) -> None:
    if self._events is not None:
      self._events.emit(kind, **self._tags, **fields)

  def _run(self) -> None:
    stopping = False
    while not stopping:
      timeout = None
      if self._pending:
        timeout = max(0.0, self._pending[0].enqueued_at + self._batching.deadline_s()
                      - time.time())
      try:
        item = self._inbox.get(timeout=timeout)
      except queue.Empty:
        item = None
      items = [] if item is None else [item]
      while True:  # drain what else arrived, so one batch sees every queued Step
        try:
          items.append(self._inbox.get_nowait())
        except queue.Empty:
          break
      for item in items:
        if item is _STOP:
          stopping = True
          continue
        self._accept(item)
      if stopping:
        for job in self._pending:
          self._deliver(job, error=RequestError(grpc.StatusCode.UNAVAILABLE,
                                                "the layer-split server is shutting down"))
        self._pending.clear()
        break
      while self._pending and self._batch_ready():
        self._run_batch()

  def _batch_ready(self) -> bool:
    if len(self._pending) >= self._engine.max_batch_size:
      return True
    waiting = {job.slot for job in self._pending}
    if self._active_slots - self._late_slots <= waiting:  # every due session has joined
      return True
    return time.time() >= self._pending[0].enqueued_at + self._batching.deadline_s()

  def _accept(self, job: _Job) -> None:
    try:
      if isinstance(job, _BeginJob):
        self._deliver(job, int(self._engine.begin(job.prompt_tokens, job.sampling, job.seed,
                                                  job.max_new_tokens)))
      elif isinstance(job, _PrefillJob):
        self._deliver(job, self._prefill(job))
      elif isinstance(job, _CloseJob):
        self._close(job)
        self._deliver(job, None)
      elif isinstance(job, _StepJob):
        if job.slot not in self._active_slots:
          raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"slot {job.slot} is not an active session")
        self._late_slots.discard(job.slot)  # it is back: later batches wait for it again
        self._pending.append(job)
      else:
        raise TypeError(f"unknown job {job!r}")
    except Exception as e:  # pylint: disable=broad-except (the error goes to the caller)
      self._deliver(job, error=e)

  def _prefill(self, job: _PrefillJob) -> PrefillOutcome:
    started = time.time()
    self._engine.extend(job.slot, job.hidden)
    first, finished = None, False
    if job.last:
      first, finished = self._engine.finish_prefill(job.slot)
      if not finished:
        self._active_slots.add(job.slot)
    ended = time.time()
    self._emit("server_batch", t_start=started, t_end=ended, op="prefill", batch_size=1,
               tokens=int(job.hidden.shape[0]), forward_time_s=ended - started,
               queue_time_s=started - job.enqueued_at, request_ids=[job.request_id])
    return PrefillOutcome(queue_time_s=started - job.enqueued_at, forward_time_s=ended - started,
                          first_token=None if first is None else int(first),
                          finished=bool(finished))

  def _close(self, job: _CloseJob) -> None:
    kept: collections.deque[_StepJob] = collections.deque()
    for pending in self._pending:
      if pending.slot == job.slot:
        self._deliver(pending, error=RequestError(grpc.StatusCode.ABORTED,
                                                  "the session was closed during this Step"))
      else:
        kept.append(pending)
    self._pending = kept
    self._active_slots.discard(job.slot)
    self._late_slots.discard(job.slot)
    self._engine.close(job.slot)

  def _run_batch(self) -> None:
    batch: list[_StepJob] = []
    while self._pending and len(batch) < self._engine.max_batch_size:
      batch.append(self._pending.popleft())
    if self._batching.mode == "static" and len(batch) < self._engine.max_batch_size:
      present = {job.slot for job in batch} | {job.slot for job in self._pending}
      self._late_slots |= self._active_slots - present
    started = time.time()
    try:
      results = self._engine.decode([(job.slot, job.hidden) for job in batch])
      if len(results) != len(batch):
        raise RuntimeError(f"engine.decode returned {len(results)} results for {len(batch)}")
    except Exception as e:  # pylint: disable=broad-except
      _log.exception("decode batch of %d failed", len(batch))
      for job in batch:
        self._active_slots.discard(job.slot)  # the engine's state of these slots is unknown
        self._deliver(job, error=RequestError(grpc.StatusCode.INTERNAL,
                                              f"decode failed: {type(e).__name__}: {e}"))
      return
    ended = time.time()
    self.batches_run += 1
    queue_times = [started - job.enqueued_at for job in batch]
    self._emit("server_batch", t_start=started, t_end=ended, op="decode", batch_size=len(batch),
               tokens=len(batch), forward_time_s=ended - started,
               queue_time_s=float(np.mean(queue_times)),
               request_ids=[job.request_id for job in batch])
    for job, result, queue_time in zip(batch, results, queue_times):
      if result.finished:
        self._active_slots.discard(job.slot)
      self._deliver(job, StepOutcome(result=result, queue_time_s=queue_time,
                                     forward_time_s=ended - started, batch_size=len(batch)))


# ------------------------------------------------------------------------------------------------
# The servicer.


@dataclasses.dataclass(frozen=True)
class TailLimits:
  """What the servicer must know about the engine to validate requests without calling it."""

  hidden_size: int
  num_slots: int
  max_len: int
  eos_token_ids: frozenset[int]

  @classmethod
  def of(cls, engine: TailEngineProtocol) -> "TailLimits":
    return cls(hidden_size=int(engine.hidden_size), num_slots=int(engine.num_slots),
               max_len=int(engine.max_len), eos_token_ids=frozenset(engine.eos_token_ids))


@dataclasses.dataclass
class _Session:
  session_id: str
  slot: int
  request_id: str
  owner: str  # the authenticated caller that opened it ("" without authentication)
  generated: int = 1
  finished: bool = False
  broken: str = ""  # why the session cannot go on, if it cannot
  steps_applied: int = 0
  last_response: pb.StepResponse | None = None
  inflight: asyncio.Future | None = None  # the Step being run, for a retry of it
  last_used: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _HeldSlot:
  """The slot an Open is filling, once the engine thread has taken it. `abandoned`: the Open
  failed or its caller went away, so the slot is freed as soon as it exists."""

  slot: int | None = None
  abandoned: bool = False




class LayerSplitServicer:
  """The `LayerSplitTail` handlers. Runs on the event loop (module docstring)."""

  def __init__(self, worker: TailWorker, limits: TailLimits, *, identify: Identify | None = None):
    self._worker = worker
    self._limits = limits
    self._identify = identify
    self.sessions: dict[str, _Session] = {}
    self._opening = 0  # opens holding a slot that is not a session yet
    self.draining = False

  # -- helpers -----------------------------------------------------------------------------------

  def _new_future(self) -> asyncio.Future:
    return asyncio.get_running_loop().create_future()

  async def _run_job(self, job: _Job):
    """Submits a job and waits for it; the job's outcome is applied even if the RPC is cancelled
    meanwhile (the future is shielded)."""
    self._worker.submit(job)
    return await asyncio.shield(job.future)

  def _caller(self, context: grpc.aio.ServicerContext) -> str:
    return caller_of(self._identify, context)

  def _session(self, session_id: str, caller: str) -> _Session:
    return owned_session(self.sessions, session_id, caller)

  async def _guard(self, context: grpc.aio.ServicerContext, body):
    """Runs a handler body; a RequestError becomes its gRPC status, anything else INTERNAL."""
    try:
      return await body(self._caller(context))
    except RequestError as e:
      await context.abort(e.code, e.message)
    except ValueError as e:  # the engine's own input checks
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except api.SlotsExhausted as e:
      await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no free slot: {e}")
    except asyncio.CancelledError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _log.exception("internal error")
      await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

  @staticmethod
  def _decode(raw: bytes, request_type, what: str):
    try:
      return request_type.FromString(raw)
    except protobuf_message.DecodeError as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{what} does not decode as {request_type.DESCRIPTOR.full_name}: "
                         f"{e}") from None

  # -- registration ------------------------------------------------------------------------------

  def rpc_handlers(self) -> grpc.GenericRpcHandler:
    """The service's handlers, taking raw bytes: a message that does not decode gets
    INVALID_ARGUMENT (gRPC's own deserializer failure would be UNKNOWN)."""
    def serialize(response) -> bytes:
      return response.SerializeToString()

    async def open_handler(raw_chunks, context):
      return await self._guard(context, lambda caller: self._open(raw_chunks, caller))

    async def step_handler(raw, context):
      return await self._guard(context, lambda caller: self._step(
          self._decode(raw, pb.StepRequest, "the Step request"), caller))

    async def close_handler(raw, context):
      return await self._guard(context, lambda caller: self._close(
          self._decode(raw, pb.CloseRequest, "the Close request"), caller))

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Open": grpc.stream_unary_rpc_method_handler(open_handler,
                                                     response_serializer=serialize),
        "Step": grpc.unary_unary_rpc_method_handler(step_handler, response_serializer=serialize),
        "Close": grpc.unary_unary_rpc_method_handler(close_handler,
                                                     response_serializer=serialize),
    })

  # -- Open --------------------------------------------------------------------------------------

  def _checked_open_request(self, request: pb.OpenRequest) -> SamplingParams:
    for name in ("client_id", "request_id"):
      if len(getattr(request, name)) > MAX_LABEL_CHARS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request.{name} has {len(getattr(request, name))} characters; labels "
                           f"have at most {MAX_LABEL_CHARS}")
    if not 1 <= request.prompt_tokens <= self._limits.max_len:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request.prompt_tokens must be in [1, {self._limits.max_len}], got "
                         f"{request.prompt_tokens}")
    if not 0 <= request.seed <= _MAX_SEED:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"request.seed must be >= 0, got {request.seed}")
    try:
      api.check_cache_room(int(request.prompt_tokens), int(request.max_new_tokens),
                           max_tree_nodes=0, max_len=self._limits.max_len)
      proto = request.sampling
      return SamplingParams(temperature=float(proto.temperature),
                            top_p=float(proto.top_p) if proto.HasField("top_p") else 1.0,
                            top_k=int(proto.top_k))
    except ValueError as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request: {e}") from e

  async def _open(self, raw_chunks: AsyncIterator[bytes], caller: str) -> pb.OpenResponse:
    if self.draining:
      raise RequestError(grpc.StatusCode.UNAVAILABLE,
                         "the server is going away; reconnect elsewhere or later")
    chunks = aiter(raw_chunks)

    async def next_chunk(index: int) -> pb.OpenChunk | None:
      try:
        raw = await anext(chunks)
      except StopAsyncIteration:
        return None
      return self._decode(raw, pb.OpenChunk, f"OpenChunk {index}")

    chunk = await next_chunk(0)
    if chunk is None:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the Open stream carried no message")
    if not chunk.HasField("request"):
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         "the first OpenChunk must carry the request")
    request = chunk.request
    sampling = self._checked_open_request(request)
    if len(self.sessions) + self._opening >= self._limits.num_slots:
      raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"all {self._limits.num_slots} server slots are taken; retry later")
    request_id = request.request_id or uuid.uuid4().hex
    total = int(request.prompt_tokens)
    held = _HeldSlot()

    def begun(future: asyncio.Future) -> None:
      if future.cancelled() or future.exception() is not None:
        return
      held.slot = int(future.result())
      if held.abandoned:  # the caller went away while the slot was being taken
        self._submit_close(request_id, held.slot)

    self._opening += 1
    registered = False
    try:
      begin = _BeginJob(future=self._new_future(), request_id=request_id, prompt_tokens=total,
                        sampling=sampling, seed=int(request.seed),
                        max_new_tokens=int(request.max_new_tokens))
      begin.future.add_done_callback(begun)
      slot = await self._run_job(begin)
      rows, index, queue_s, forward_s = 0, 0, 0.0, 0.0
      outcome: PrefillOutcome | None = None
      while chunk is not None:
        if index and chunk.HasField("request"):
          raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"OpenChunk {index} carries a request; only the first one may")
        if not chunk.HasField("hidden"):
          raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"OpenChunk {index} carries no hidden states")
        values = hidden_from_proto(chunk.hidden, hidden_size=self._limits.hidden_size,
                                   max_rows=total - rows, field=f"OpenChunk {index} hidden")
        rows += values.shape[0]
        outcome = await self._run_job(_PrefillJob(future=self._new_future(),
                                                  request_id=request_id, slot=slot,
                                                  hidden=values, last=rows == total))
        queue_s += outcome.queue_time_s
        forward_s += outcome.forward_time_s
        index += 1
        chunk = await next_chunk(index)
        if chunk is not None and rows == total:
          raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"OpenChunk {index} comes after all {total} prompt rows")
      if rows < total or outcome is None or outcome.first_token is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the Open stream ended after {rows} of the prompt's {total} rows")
      session = _Session(session_id=uuid.uuid4().hex, slot=slot, request_id=request_id,
                         owner=caller, finished=outcome.finished)
      self.sessions[session.session_id] = session
      registered = True
      first = outcome.first_token
      return pb.OpenResponse(
          session_id=session.session_id, first_token=first, finished=outcome.finished,
          finish_reason=_finish_reason(first, outcome.finished, self._limits.eos_token_ids),
          timing=pb.ServerTiming(queue_time_s=queue_s, forward_time_s=forward_s, batch_size=1))
    finally:
      self._opening -= 1
      if not registered:
        held.abandoned = True
        if held.slot is not None:
          self._submit_close(request_id, held.slot)

  def _submit_close(self, request_id: str, slot: int) -> None:
    self._worker.submit(_CloseJob(future=self._new_future(), request_id=request_id, slot=slot))

  # -- Step and Close ----------------------------------------------------------------------------

  async def _step(self, request: pb.StepRequest, caller: str) -> pb.StepResponse:
    session = self._session(request.session_id, caller)
    if session.inflight is not None and request.step == session.steps_applied:
      await asyncio.shield(session.inflight)  # a retry of the Step being run: share its answer
      return self._stored(session)
    if request.step == session.steps_applied - 1 and session.last_response is not None:
      return session.last_response  # a retry of the last applied Step (its reply was lost)
    if session.broken:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"session cannot continue ({session.broken}); close it")
    if session.finished:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "session already finished; close it")
    if session.inflight is not None:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         "a Step for this session is already in flight")
    if request.step != session.steps_applied:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"step {request.step}, but the session has applied "
                         f"{session.steps_applied} steps; the client is out of sync")
    if not request.HasField("hidden"):
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "hidden is missing")
    values = hidden_from_proto(request.hidden, hidden_size=self._limits.hidden_size, max_rows=1,
                               field="hidden")
    job = _StepJob(future=self._new_future(), request_id=session.request_id, slot=session.slot,
                   hidden=values)
    session.inflight = job.future
    job.future.add_done_callback(lambda future: self._step_done(session, future))
    await self._run_job(job)
    return self._stored(session)

  @staticmethod
  def _stored(session: _Session) -> pb.StepResponse:
    if session.last_response is None:
      raise RuntimeError("a Step succeeded but its answer was not stored")
    return session.last_response

  def _step_done(self, session: _Session, future: asyncio.Future) -> None:
    """Applies a Step's outcome to the session (on the loop, even if the RPC was cancelled: a
    retry of the same step then gets the answer)."""
    session.inflight = None
    session.last_used = time.monotonic()
    if future.cancelled():
      return
    error = future.exception()
    if error is None:
      outcome: StepOutcome = future.result()
      token = int(outcome.result.bonus)
      session.steps_applied += 1
      session.generated += 1
      session.finished = bool(outcome.result.finished)
      session.last_response = pb.StepResponse(
          token=token, finished=session.finished,
          finish_reason=_finish_reason(token, session.finished, self._limits.eos_token_ids),
          timing=pb.ServerTiming(queue_time_s=outcome.queue_time_s,
                                 forward_time_s=outcome.forward_time_s,
                                 batch_size=outcome.batch_size))
    elif isinstance(error, RequestError) and error.code == grpc.StatusCode.INTERNAL:
      session.broken = error.message

  async def _close(self, request: pb.CloseRequest, caller: str) -> pb.CloseResponse:
    session = self._session(request.session_id, caller)
    del self.sessions[session.session_id]  # later calls see NOT_FOUND; the slot counts as free
    await self._run_job(_CloseJob(future=self._new_future(), request_id=session.request_id,
                                  slot=session.slot))
    return pb.CloseResponse(generated_tokens=session.generated)

  async def reap_idle_sessions(self, lease_s: float) -> list[str]:
    """Closes sessions with no call for longer than lease_s (a Step in flight holds the lease)."""
    now = time.monotonic()
    stale = [s for s in self.sessions.values()
             if s.inflight is None and now - s.last_used > lease_s]
    for session in stale:
      _log.warning("closing session %s (request %s): its lease ran out", session.session_id,
                   short_id(session.request_id))
      del self.sessions[session.session_id]
      self._submit_close(session.request_id, session.slot)
    return [s.session_id for s in stale]


# ------------------------------------------------------------------------------------------------
# The server.


class LayerSplitServer:
  """A grpc.aio server with the LayerSplitTail and health services, and its engine thread.

  Usage (inside a running event loop):

      server = LayerSplitServer(tail_engine)
      port = await server.start("127.0.0.1:0")
      ...
      await server.stop()

  `security` as `VerifierServer`'s: TLS (mutual with a client CA), bearer tokens checked by an
  interceptor that leaves the health service open, plaintext only when it allows that; None is
  plaintext without authentication (in-process tests).
  """

  def __init__(self, engine: TailEngineProtocol, *,
               batching: BatchingConfig = BatchingConfig(),
               event_log: EventLog | None = None, event_tags: dict | None = None,
               session_timeout_s: float = 30.0,
               security: security_lib.ServerSecurity | None = None):
    self.engine = engine
    self.batching = batching
    self.event_log = event_log
    self._tags = dict(event_tags or {})
    self.security = security
    self._session_timeout_s = session_timeout_s
    self._server: grpc.aio.Server | None = None
    self._health: health.aio.HealthServicer | None = None
    self.worker: TailWorker | None = None
    self.servicer: LayerSplitServicer | None = None
    self._reaper: asyncio.Task | None = None
    self.port: int | None = None

  async def start(self, address: str = "127.0.0.1:0") -> int:
    """Starts serving on address ('host:port'; port 0 picks a free one). Returns the port."""
    credentials, authenticator = None, None
    if self.security is not None:  # a refused config fails here, before a thread starts
      credentials = security_lib.server_credentials(self.security)
      authenticator = security_lib.Authenticator.from_security(self.security)
    self.worker = TailWorker(self.engine, loop=asyncio.get_running_loop(),
                             batching=self.batching, event_log=self.event_log,
                             event_tags=self._tags)
    self.servicer = LayerSplitServicer(
        self.worker, TailLimits.of(self.engine),
        identify=authenticator.client_of if authenticator is not None else None)
    interceptors = [authenticator.interceptor()] if authenticator is not None else []
    self._server = grpc.aio.server(interceptors=interceptors,
                                   options=[("grpc.max_receive_message_length",
                                             MAX_MESSAGE_BYTES)])
    self._server.add_generic_rpc_handlers((self.servicer.rpc_handlers(),))
    self._health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
    if credentials is not None:
      self.port = self._server.add_secure_port(address, credentials)
    else:
      self.port = self._server.add_insecure_port(address)
    if not self.port:
      raise OSError(f"cannot bind the layer-split server to {address}")
    self.worker.start()
    await self._server.start()
    for service in ("", SERVICE_NAME):
      await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
    self._reaper = asyncio.create_task(self._reap_forever(self.servicer))
    return self.port

  async def _reap_forever(self, servicer: LayerSplitServicer) -> None:
    period = max(0.02, min(1.0, self._session_timeout_s / 4))
    while True:
      await asyncio.sleep(period)
      await servicer.reap_idle_sessions(self._session_timeout_s)

  async def stop(self, grace: float | None = 1.0) -> None:
    if self._server is None:
      return
    if self.servicer is not None:
      self.servicer.draining = True
    if self._health is not None:
      await self._health.enter_graceful_shutdown()
    if self._reaper is not None:
      self._reaper.cancel()
    await self._server.stop(grace)
    if self.worker is not None:
      # Joining the engine thread blocks; off the loop, so late deliveries cannot deadlock.
      await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
    self._server = None


# ------------------------------------------------------------------------------------------------
# The edge client.


@dataclasses.dataclass(frozen=True)
class EdgeClientConfig:
  """How one layer-split edge serves its requests."""

  client_id: str = "edge0"
  max_concurrent_requests: int = 1  # K requests on this edge at once
  interleave: bool = True  # run one request's head step while another waits on the server
  wire_dtype: str = "fp32"  # 'bf16' | 'fp16' | 'fp32'; only fp32 is exact
  max_new_tokens: int = 64
  sampling: SamplingParams = SamplingParams()
  seed: int = 0  # request i gets seed + i unless it has its own
  simulated_rtt_ms: float = 0.0  # half before each send, half after each reply
  rpc_timeout_s: float = 120.0
  step_retries: int = 3  # a Step whose reply is lost is sent again (same step: idempotent)
  retry_initial_s: float = 0.05
  open_retry_initial_s: float = 0.02  # backoff while the server has no free slot
  open_retry_max_s: float = 1.0
  open_give_up_s: float = 300.0

  def __post_init__(self):
    if self.wire_dtype not in WIRE_DTYPES:
      raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got "
                       f"{self.wire_dtype!r}")
    if self.max_concurrent_requests < 1 or self.max_new_tokens < 1 or self.step_retries < 0:
      raise ValueError("max_concurrent_requests and max_new_tokens must be >= 1, step_retries "
                       ">= 0")
    if not self.simulated_rtt_ms >= 0:
      raise ValueError(f"simulated_rtt_ms must be >= 0, got {self.simulated_rtt_ms}")


# Sent again as they are: the reply was lost, or the server was busy or going away.
_RETRIABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

TokenCallback = Callable[[str, list[int], bool], None]  # (request_id, new tokens, finished)


class LayerSplitEdge:
  """Serves a list of requests through one tail server, K at a time, on one head engine.

      async with grpc.aio.insecure_channel(address) as channel:
        edge = LayerSplitEdge(head_engine, channel, EdgeClientConfig(wire_dtype="bf16"))
        outputs = await edge.run(requests)
  """

  def __init__(self, head: HeadEngine, channel: grpc.aio.Channel, config: EdgeClientConfig, *,
               event_log: EventLog | None = None, event_tags: dict | None = None,
               on_tokens: TokenCallback | None = None):
    self.head = head
    self.config = config
    self._stub = pb_grpc.LayerSplitTailStub(channel)
    self._events = event_log
    self._tags = dict(event_tags or {})
    self._on_tokens = on_tokens
    self._device: EdgeDevice | None = None
    self._turn: asyncio.Lock | None = None

  def _emit(self, kind: str, **fields) -> None:
    if self._events is not None:
      self._events.emit(kind, client_id=self.config.client_id, **self._tags, **fields)

  async def _network_delay(self) -> None:
    if self.config.simulated_rtt_ms > 0:
      await asyncio.sleep(self.config.simulated_rtt_ms / 2000.0)

  @property
  def _edge(self) -> EdgeDevice:
    if self._device is None:
      raise RuntimeError("LayerSplitEdge: the device is used outside run()")
    return self._device

  async def run(self, requests: Sequence[EdgeRequest]) -> list[RequestOutput]:
    """Serves every request, K at a time; returns outputs in request order."""
    loop = asyncio.get_running_loop()
    self._device = EdgeDevice(loop, client_id=self.config.client_id, event_log=self._events,
                              event_tags=self._tags)
    self._turn = asyncio.Lock()
    places = asyncio.Semaphore(self.config.max_concurrent_requests)

    async def serve_in_turn(index: int, request: EdgeRequest) -> RequestOutput:
      async with places:
        seed = request.seed if request.seed is not None else self.config.seed + index
        return await self._serve(request, seed)

    try:
      return list(await asyncio.gather(*(serve_in_turn(i, r) for i, r in enumerate(requests))))
    finally:
      device, self._device = self._device, None
      await loop.run_in_executor(None, device.stop)

  async def _open(self, request: EdgeRequest, head_slot: int, seed: int,
                  max_new_tokens: int) -> tuple[pb.OpenResponse, float]:
    """Streams the prompt's hidden states as the device computes them; returns the answer and
    the device time of the prompt. A refused open (no free slot, server restarting) is retried
    with backoff, replaying the chunks already computed."""
    config = self.config
    total = len(request.prompt_ids)
    params = request.sampling or config.sampling
    open_request = pb.OpenRequest(prompt_tokens=total, sampling=_sampling_to_proto(params),
                                  seed=seed, max_new_tokens=max_new_tokens,
                                  client_id=config.client_id, request_id=request.request_id)
    # One device job per chunk, submitted once: a retried open replays the same results. The
    # jobs are shielded, so a stream that gRPC stops mid-chunk (the open was refused) cannot lose
    # a chunk the device has already written into the head's cache.
    jobs: list[EdgeDevice.Job] = []
    encoded: dict[int, pb.HiddenStates] = {}

    async def chunk(index: int) -> pb.HiddenStates:
      if index == len(jobs):
        jobs.append(self._edge.submit(self.head.prefill_chunk, head_slot, op="prefill"))
      hidden = await asyncio.shield(jobs[index].future)
      if index not in encoded:
        encoded[index] = hidden_to_proto(HiddenStates.from_array(hidden, config.wire_dtype))
      return encoded[index]

    async def messages() -> AsyncIterator[pb.OpenChunk]:
      rows, index = 0, 0
      while rows < total:
        hidden = await chunk(index)
        if index == 0:
          yield pb.OpenChunk(request=open_request, hidden=hidden)
        else:
          yield pb.OpenChunk(hidden=hidden)
        rows += hidden.shape[0]
        index += 1

    delay, give_up = config.open_retry_initial_s, time.monotonic() + config.open_give_up_s
    while True:
      await self._network_delay()
      try:
        response = await self._stub.Open(messages(), timeout=config.rpc_timeout_s)
        await self._network_delay()
        return response, sum(job.duration_s for job in jobs)
      except grpc.aio.AioRpcError as e:
        transient = e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, *_RETRIABLE)
        if not transient or time.monotonic() > give_up:
          raise ServerError(f"Open: {e.code().name}: {e.details()}", e.code()) from e
      await asyncio.sleep(delay * random.uniform(0.5, 1.0))
      delay = min(2 * delay, config.open_retry_max_s)

  async def _step_call(self, request: pb.StepRequest) -> pb.StepResponse:
    delay = self.config.retry_initial_s
    for attempt in range(self.config.step_retries + 1):
      await self._network_delay()
      try:
        response = await self._stub.Step(request, timeout=self.config.rpc_timeout_s)
      except grpc.aio.AioRpcError as e:
        if e.code() not in _RETRIABLE or attempt == self.config.step_retries:
          raise ServerError(f"Step: {e.code().name}: {e.details()}", e.code()) from e
        await asyncio.sleep(delay)
        delay *= 2
        continue
      await self._network_delay()
      return response
    raise AssertionError("unreachable: the last attempt returns or raises")

  async def _head_step(self, session_id: str, head_slot: int, token: int, step: int):
    """One token through the head on the device, then its hidden state through the server."""
    job = self._edge.submit(self.head.decode, [(head_slot, token)], op="decode")
    hidden = await job.future
    wire = hidden_to_proto(HiddenStates.from_array(hidden[0], self.config.wire_dtype))
    sent = time.time()
    response = await self._step_call(pb.StepRequest(session_id=session_id, step=step,
                                                    hidden=wire))
    return response, job.duration_s, time.time() - sent

  async def _serve(self, request: EdgeRequest, seed: int) -> RequestOutput:
    t_submit = time.time()
    config = self.config
    output = RequestOutput(request_id=request.request_id, prompt_tokens=len(request.prompt_ids),
                           tokens=[], finish_reason="error")
    self._emit("request_start", t=t_submit, request_id=request.request_id,
               prompt_tokens=len(request.prompt_ids), dataset=request.dataset,
               category=request.category)
    head_slot: int | None = None
    session_id: str | None = None
    try:
      if not request.prompt_ids:
        raise ValueError("the layer-split edge tokenizes nothing: give prompt_ids")
      max_new_tokens = request.max_new_tokens or config.max_new_tokens
      head_slot = await self._edge.run(self.head.open, request.prompt_ids, max_new_tokens,
                                       op="prefill")
      opened, prefill_s = await self._open(request, head_slot, seed, max_new_tokens)
      session_id = opened.session_id
      output.tokens.append(opened.first_token)
      self._emit("request_step", request_id=request.request_id, n_tokens=1,
                 draft_time_s=prefill_s, wait_time_s=time.time() - t_submit, tree_size=0,
                 accepted_depth=None, proactive_hit=None, phase="prefill",
                 server_queue_time_s=opened.timing.queue_time_s,
                 server_forward_time_s=opened.timing.forward_time_s, server_batch_size=1)
      self._stream([opened.first_token], opened.finished, request.request_id)
      finished, reason, token = opened.finished, opened.finish_reason, opened.first_token
      while not finished:
        if config.interleave:
          response, device_s, wait_s = await self._head_step(session_id, head_slot, token,
                                                             output.steps)
        else:
          async with self._turn_lock:
            response, device_s, wait_s = await self._head_step(session_id, head_slot, token,
                                                               output.steps)
        output.steps += 1
        output.tokens.append(response.token)
        self._emit("request_step", request_id=request.request_id, n_tokens=1,
                   draft_time_s=device_s, wait_time_s=wait_s, tree_size=0, accepted_depth=None,
                   proactive_hit=None, phase="decode",
                   server_queue_time_s=response.timing.queue_time_s,
                   server_forward_time_s=response.timing.forward_time_s,
                   server_batch_size=response.timing.batch_size)
        self._stream([response.token], response.finished, request.request_id)
        finished, reason, token = response.finished, response.finish_reason, response.token
      output.finish_reason = reason or "length"
    except asyncio.CancelledError:
      output.finish_reason = "cancelled"
      raise
    except Exception as e:  # pylint: disable=broad-except (one request's failure is reported)
      _log.error("request %s failed: %s", request.request_id, e)
      output.error = f"{type(e).__name__}: {e}"
      output.finish_reason = "error"
    finally:
      if head_slot is not None:
        await self._edge.run(self.head.close, head_slot, op="close")
      if session_id is not None:
        await self._close(request.request_id, session_id)
      self._emit("request_end", request_id=request.request_id, n_generated=len(output.tokens),
                 finished_reason=output.finish_reason, error=output.error or None,
                 output_tokens=output.tokens)
    return output

  @property
  def _turn_lock(self) -> asyncio.Lock:
    if self._turn is None:
      raise RuntimeError("LayerSplitEdge: the turn lock is used outside run()")
    return self._turn

  async def _close(self, request_id: str, session_id: str) -> None:
    """Closes the server session, again when the reply is lost (then NOT_FOUND means done);
    what is left open the server frees at the end of its lease."""
    for attempt in range(self.config.step_retries + 1):
      try:
        await self._stub.Close(pb.CloseRequest(session_id=session_id),
                               timeout=self.config.rpc_timeout_s)
        return
      except grpc.aio.AioRpcError as e:
        if attempt and e.code() == grpc.StatusCode.NOT_FOUND:
          return
        if e.code() not in _RETRIABLE:
          _log.warning("closing the session of %s: %s", request_id, e.code().name)
          return
    _log.warning("closing the session of %s: no answer; the server frees it after its lease",
                 request_id)

  def _stream(self, tokens: list[int], finished: bool, request_id: str) -> None:
    if self._on_tokens is not None:
      self._on_tokens(request_id, tokens, finished)


# ------------------------------------------------------------------------------------------------
# Runners: what the processes of launch/layer_split.py do.


def default_split_layer(num_layers: int) -> int:
  """The reference's split: half of the layers on each side."""
  return num_layers // 2


def _load_model(config: ServingConfig, model):
  if model is not None:
    return model
  from specedge_jax.serving import runners  # pylint: disable=g-import-not-at-top (loads orbax)

  return runners.load_model(config.models.target, config.models.dtype)


def build_tail_engine(config: ServingConfig, split_layer: int, model=None) -> TailEngine:
  """The server's half of the target, warmed up (every batch bucket and chunk size)."""
  start = time.perf_counter()
  model = _load_model(config, model)
  server = config.server
  engine = TailEngine(model, split_layer, num_slots=server.num_slots, max_len=server.max_len,
                      max_batch_size=server.max_batch_size, prefill_chunk=server.prefill_chunk)
  engine.warmup()
  _log.info("tail (layers %d..%d) ready in %.2f s", split_layer, model.config.num_layers,
            time.perf_counter() - start)
  return engine


def build_head_engine(config: ServingConfig, split_layer: int, model=None) -> HeadEngine:
  """An edge's half of the target, warmed up: one slot per interleaved request."""
  start = time.perf_counter()
  model = _load_model(config, model)
  engine = HeadEngine(model, split_layer, num_slots=config.edge.requests_per_drafter,
                      max_len=config.edge.max_len, prefill_chunk=config.server.prefill_chunk)
  engine.warmup()
  _log.info("head (layers 0..%d) ready in %.2f s", split_layer, time.perf_counter() - start)
  return engine


def edge_client_config(config: ServingConfig, client_index: int,
                       wire_dtype: str) -> EdgeClientConfig:
  edge = config.edge
  return EdgeClientConfig(
      client_id=f"edge{client_index}", max_concurrent_requests=edge.requests_per_drafter,
      interleave=edge.interleave, wire_dtype=wire_dtype,
      max_new_tokens=config.workload.max_new_tokens, sampling=config.workload.sampling,
      seed=config.workload.seed, simulated_rtt_ms=edge.simulated_rtt_ms,
      rpc_timeout_s=edge.rpc_timeout_s, step_retries=edge.verify_retries,
      open_give_up_s=edge.open_give_up_s)


def _channel(address: str, security: security_lib.ClientSecurity | None) -> grpc.aio.Channel:
  options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
  if security is None:  # plaintext without a token, for library callers
    return grpc.aio.insecure_channel(address, options=options)
  return security_lib.open_channel(address, security, options=options)


async def wait_for_tail(address: str, timeout_s: float,
                        security: security_lib.ClientSecurity | None = None) -> None:
  """Waits until the tail server's health service says SERVING."""
  async with _channel(address, security) as channel:
    await health_wait.wait_until_serving(channel, SERVICE_NAME, what="layer-split server",
                                         address=address, timeout_s=timeout_s)


def _event_log(path: str | None) -> EventLog | None:
  return EventLog(path, SYSTEM) if path else None


async def serve_tail(config: ServingConfig, split_layer: int, *, host: str = "127.0.0.1",
                     port: int = 50061, port_file: str | None = None,
                     events_path: str | None = None, run_id: str | None = None,
                     security: security_lib.ServerSecurity | None = None,
                     on_ready: Callable[[int], None] | None = None,
                     stop: asyncio.Event | None = None, model=None) -> None:
  """Loads the target's tail, serves until SIGINT/SIGTERM (or `stop` is set), then stops."""
  if security is not None:
    security_lib.server_credentials(security)  # a refused config fails before the model loads
  engine = build_tail_engine(config, split_layer, model)
  log = _event_log(events_path)
  server = LayerSplitServer(engine, batching=config.server.batching, event_log=log,
                            event_tags={"run_id": run_id} if run_id else None,
                            session_timeout_s=config.server.session_timeout_s,
                            security=security)
  bound = await server.start(f"{host}:{port}")
  _log.info("layer-split tail serving on %s:%d (%s)", host, bound,
            security.describe() if security is not None else "plaintext, no authentication")
  if port_file:
    tmp = f"{port_file}.tmp"  # written atomically: a launcher polls for it
    with open(tmp, "w") as f:
      f.write(str(bound))
    os.replace(tmp, port_file)
  if on_ready is not None:
    on_ready(bound)
  if stop is None:
    import signal  # pylint: disable=g-import-not-at-top

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
      asyncio.get_running_loop().add_signal_handler(sig, stop.set)
  await stop.wait()
  await server.stop(grace=2.0)
  if log is not None:
    log.close()


async def run_head(config: ServingConfig, split_layer: int, wire_dtype: str,
                   server_address: str, *, client_index: int = 0,
                   events_path: str | None = None, run_id: str | None = None,
                   security: security_lib.ClientSecurity | None = None,
                   connect_timeout_s: float = 600.0, on_tokens: TokenCallback | None = None,
                   requests: Sequence[EdgeRequest] | None = None,
                   model=None) -> list[RequestOutput]:
  """Loads the target's head, serves this edge's share of the workload, returns the outputs."""
  if security is not None:
    security.require_allowed()  # a refused config fails before the model loads
  if requests is None:
    requests = workload.requests_for_client(config, client_index)
  engine = build_head_engine(config, split_layer, model)
  await wait_for_tail(server_address, connect_timeout_s, security)
  log = _event_log(events_path)
  try:
    async with _channel(server_address, security) as channel:
      edge = LayerSplitEdge(engine, channel, edge_client_config(config, client_index, wire_dtype),
                            event_log=log, event_tags={"run_id": run_id} if run_id else None,
                            on_tokens=on_tokens)
      return await edge.run(requests)
  finally:
    if log is not None:
      log.close()


@dataclasses.dataclass(frozen=True)
class LayerSplitRun:
  split_layer: int
  requests: list[EdgeRequest]  # the union of the edges' requests
  outputs: list[RequestOutput]  # in `requests` order
  event_paths: list[str]  # the tail's log, then one per edge ([] without events_dir)
  events: list[dict[str, Any]]  # every event of the run (read back from the logs, or in memory)


def run_layer_split(config: ServingConfig, split_layer: int | None = None,
                    wire_dtype: str = "fp32", *, events_dir: str | None = None,
                    run_id: str | None = None, requests: Sequence[EdgeRequest] | None = None,
                    model=None, server_security: security_lib.ServerSecurity | None = None,
                    client_security: security_lib.ClientSecurity | None = None
                    ) -> LayerSplitRun:
  """The whole baseline in this process: the tail server on a free loopback port and
  `edge.num_drafters` head edges (each its own HeadEngine and K = requests_per_drafter places),
  on the config's workload (or `requests`). Events go to `events_dir` (tail.jsonl,
  edge<i>.jsonl), or stay in memory without it. The server and the edges share this machine's
  cores: for measurements, run `launch/layer_split.py --role=tail` and `--role=head` as
  separate pinned processes."""
  model = _load_model(config, model)
  split_layer = default_split_layer(model.config.num_layers) if split_layer is None \
      else split_layer
  num_edges = config.edge.num_drafters
  if requests is None:  # the drafters' own shares, as SpecEdge and the baselines serve them
    loaded = workload.load_requests(config)
    shares = [workload.requests_for_client(config, i, loaded) for i in range(num_edges)]
    requests = workload.server_only_requests(config, loaded)
  else:
    shares = [workload.shard(requests, i, num_edges) for i in range(num_edges)]
  tail = build_tail_engine(config, split_layer, model)
  heads = [build_head_engine(config, split_layer, model) for _ in range(num_edges)]
  tags = {"run_id": run_id} if run_id else None
  paths: list[str] = []
  if events_dir:
    os.makedirs(events_dir, exist_ok=True)
    paths = [os.path.join(events_dir, "tail.jsonl")] + [
        os.path.join(events_dir, f"edge{i}.jsonl") for i in range(num_edges)]
  logs = [EventLog(path, SYSTEM) for path in paths] if paths else [
      EventLog(None, SYSTEM) for _ in range(num_edges + 1)]

  async def main() -> list[list[RequestOutput]]:
    server = LayerSplitServer(tail, batching=config.server.batching, event_log=logs[0],
                              event_tags=tags, session_timeout_s=config.server.session_timeout_s,
                              security=server_security)
    port = await server.start("127.0.0.1:0")
    try:
      async def one_edge(index: int) -> list[RequestOutput]:
        async with _channel(f"127.0.0.1:{port}", client_security) as channel:
          edge = LayerSplitEdge(heads[index], channel,
                                edge_client_config(config, index, wire_dtype),
                                event_log=logs[index + 1], event_tags=tags)
          return await edge.run(shares[index])

      return list(await asyncio.gather(*(one_edge(i) for i in range(num_edges))))
    finally:
      await server.stop(grace=None)

  try:
    per_edge = asyncio.run(main())
  finally:
    for log in logs:
      log.close()
  by_id = {output.request_id: output for outputs in per_edge for output in outputs}
  if paths:
    from specedge_jax.measure import events as events_lib  # pylint: disable=g-import-not-at-top

    events = list(events_lib.read_events(paths))
  else:
    events = [event for log in logs for event in (log.events or [])]
  return LayerSplitRun(split_layer=split_layer, requests=list(requests),
                       outputs=[by_id[r.request_id] for r in requests], event_paths=paths,
                       events=events)


def _target_only_tokens(config: ServingConfig, requests: Sequence[EdgeRequest], model
                        ) -> list[list[int]]:
  """Target-only decoding (`TargetEngine.decode`, batched) of the requests, with their seeds."""
  from specedge_jax.engine import TargetEngine  # pylint: disable=g-import-not-at-top
  from specedge_jax.engine.generation import generate  # pylint: disable=g-import-not-at-top

  server = config.server
  engine = TargetEngine(model, num_slots=server.num_slots, max_len=server.max_len,
                        max_tree_nodes=1, max_batch_size=server.max_batch_size,
                        prefill_chunk=server.prefill_chunk)
  tokens = []
  for request in requests:  # one at a time: each keeps its own seed whatever the batching
    tokens += generate(engine, [request.prompt_ids], sampling=config.workload.sampling,
                       max_new_tokens=request.max_new_tokens or config.workload.max_new_tokens,
                       seed=request.seed if request.seed is not None else 0).tokens
  return tokens


def agreement_with_target_only(config: ServingConfig, requests: Sequence[EdgeRequest],
                               outputs: Sequence[RequestOutput], model=None) -> Agreement:
  """How far a run's outputs follow target-only decoding of the same requests."""
  return greedy_agreement(_target_only_tokens(config, requests, _load_model(config, model)),
                          [output.tokens for output in outputs])


def measure_agreement(config: ServingConfig, split_layers: Sequence[int | None],
                      wire_dtypes: Sequence[str], *, model=None,
                      requests: Sequence[EdgeRequest] | None = None
                      ) -> list[tuple[int, str, Agreement]]:
  """(split layer, wire dtype, agreement with target-only output) for every pair, in process
  (`engine.layer_split.generate`: the same wire conversion as over gRPC, without the network),
  on the config's workload. A split layer of None is `default_split_layer`."""
  model = _load_model(config, model)
  if requests is None:
    requests = workload.load_requests(config)
  reference = _target_only_tokens(config, requests, model)
  server, rows = config.server, []
  for split in split_layers:
    split = default_split_layer(model.config.num_layers) if split is None else split
    head = HeadEngine(model, split, num_slots=1, max_len=server.max_len,
                      prefill_chunk=server.prefill_chunk)
    tail = TailEngine(model, split, num_slots=1, max_len=server.max_len, max_batch_size=1,
                      prefill_chunk=server.prefill_chunk)
    for wire in wire_dtypes:
      outputs = []
      for request in requests:
        outputs += generate_split(
            head, tail, [request.prompt_ids], wire_dtype=wire, sampling=config.workload.sampling,
            max_new_tokens=request.max_new_tokens or config.workload.max_new_tokens,
            seed=request.seed if request.seed is not None else 0)
      rows.append((split, wire, greedy_agreement(reference, outputs)))
  return rows
