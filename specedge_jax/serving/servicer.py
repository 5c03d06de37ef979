"""The `specedge.v1.Verifier` gRPC handlers: the session table and the validation of every field.

What this module owns: the servicer (`VerifierServicer`), its session table, the validation of
every request field before anything reaches the engine, the mapping of engine errors to gRPC
statuses, sessions as leases bound to their client, admission (the FIFO queue, per-client
quotas), idempotent retries of opens and verifies, and draining. It loads no JAX: it knows the
engine only through its limits (`EngineLimits`) and hands work to the engine thread
(`engine_worker.EngineWorker`).

Threads: the handlers run on the asyncio event-loop thread, which alone reads and writes the
session table, so the table needs no lock. Each handler validates a request, turns it into a job
for the engine thread and awaits its future; a job's outcome is applied to the session in the
future's done callback, even if the RPC was cancelled meanwhile, so the table never diverges
from the engine and a retry finds the answer.

Backpressure: each session has at most one verify in flight (a retry of the same step shares
its answer; anything else is FAILED_PRECONDITION), so pending verifies never exceed the slots.
Opens that find every slot taken wait their turn in a bounded FIFO queue, or get
RESOURCE_EXHAUSTED with a retry-after hint (the engine's own `SlotsExhausted` stays as the
backstop); one client holds at most its quota. Every call renews a session's lease; the reaper
closes sessions whose lease ran out. Every field is bounded before it is copied, and a text
prompt is tokenized in an executor, off the loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from typing import Callable, Mapping, Sequence, TypeVar

import grpc
import numpy as np
from google.protobuf import message as protobuf_message

from specedge_jax import api
from specedge_jax.api import DraftTree, SamplingParams
from specedge_jax.data import tokenizer_fingerprint as fingerprint_lib
from specedge_jax.serving.engine_worker import (EngineWorker, OpenResult, RequestError,
                                                VerifyOutcome, _CloseJob, _Job, _OpenJob,
                                                _VerifyJob)
from specedge_jax.serving import slo_admission as slo_admission_lib
from specedge_jax.serving import speculation_controller
from specedge_jax.serving.proto import specedge_pb2, specedge_pb2_grpc

_log = logging.getLogger(__name__)

SERVICE_NAME = "specedge.v1.Verifier"
_MAX_SEED = 2**63 - 1
# Bounds checked before any work, so an oversized request costs neither time nor memory.
MAX_LABEL_CHARS = 256  # client_id, request_id
MAX_SESSION_ID_CHARS = 64  # ours are 32 hex digits
PROMPT_TEXT_BYTES_PER_ROW = 32  # prompt_text may hold at most this many bytes per cache row

# identify(metadata) -> the authenticated client's name, or None (see serving/security.py).
Identify = Callable[[Sequence[tuple[str, str | bytes]]], str | None]


class _RateLimitedWarning:
  """At most one WARNING line per `period_s`, with the count of the ones it held back: a flood of
  bad requests must not flood the log."""

  def __init__(self, period_s: float = 1.0):
    self._period_s = period_s
    self._last = -float("inf")
    self._held_back = 0

  def __call__(self, message: str, *args) -> None:
    now = time.monotonic()
    if now - self._last < self._period_s:
      self._held_back += 1
      return
    suffix = f" ({self._held_back} more since the last line)" if self._held_back else ""
    self._last, self._held_back = now, 0
    _log.warning(message + suffix, *args)


def short_id(text: str, limit: int = 24) -> str:
  """An id as error messages quote it: never the whole of an oversized one."""
  return repr(text) if len(text) <= limit else repr(text[:limit] + "...")


def caller_of(identify: Identify | None, context: grpc.aio.ServicerContext) -> str:
  """The authenticated name of the caller ("" without authentication)."""
  if identify is None:
    return ""
  name = identify(context.invocation_metadata() or ())
  if name is None:  # the interceptor refuses these first; this is the handler's own check
    raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
  return name


SessionT = TypeVar("SessionT")


def owned_session(sessions: Mapping[str, SessionT], session_id: str, caller: str) -> SessionT:
  """The caller's session `session_id` (its lease renewed); INVALID_ARGUMENT, NOT_FOUND or
  PERMISSION_DENIED otherwise. Sessions have `owner` and `last_used` (this servicer's and the
  layer-split tail's)."""
  if not session_id:
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
  if len(session_id) > MAX_SESSION_ID_CHARS:
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"session_id has {len(session_id)} characters; ids have at most "
                       f"{MAX_SESSION_ID_CHARS}")
  session = sessions.get(session_id)
  if session is None:
    raise RequestError(grpc.StatusCode.NOT_FOUND,
                       f"no open session {short_id(session_id)} (never opened, closed, or "
                       "reaped after its lease)")
  if getattr(session, "owner") != caller:
    raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                       f"session {short_id(session_id)} belongs to another client")
  setattr(session, "last_used", time.monotonic())  # every call renews the lease
  return session


@dataclasses.dataclass(frozen=True)
class EngineLimits:
  """What the servicer must know about the engine to validate requests without calling it."""

  vocab_size: int
  num_slots: int
  max_tree_nodes: int  # root included
  max_batch_size: int
  max_len: int

  @classmethod
  def of(cls, engine: api.TargetEngineProtocol) -> "EngineLimits":
    return cls(vocab_size=int(engine.vocab_size), num_slots=int(engine.num_slots),
               max_tree_nodes=int(engine.max_tree_nodes),
               max_batch_size=int(engine.max_batch_size), max_len=int(engine.max_len))


@dataclasses.dataclass
class _Session:
  session_id: str
  slot: int
  request_id: str
  client_id: str
  owner: str  # the authenticated client that opened it ("" without authentication)
  quota_key: str  # whose quota it counts against: the owner, else the client_id label
  prompt_tokens: int
  max_new_tokens: int
  last_token: int  # the root the next tree must carry
  generated: int = 1  # the first token
  finished: bool = False
  broken: str = ""  # why the session can no longer be served, if it cannot
  verify_in_flight: bool = False
  steps_applied: int = 0  # verify rounds applied
  # The last applied round, for a retry of it: its request's root and the answer given.
  last_round_root: int = -1
  last_response: specedge_pb2.VerifyResponse | None = None
  # The round being verified: a retry of it waits for this future's answer.
  inflight_step: int = -1
  inflight: asyncio.Future | None = None
  # The open that made it, for a retry of that open (its reply was lost): its key and answer.
  open_key: tuple | None = None
  open_response: specedge_pb2.OpenSessionResponse | None = None
  opened_at_step: int = 0  # steps_applied right after the open (a retry is only valid before)
  last_used: float = dataclasses.field(default_factory=time.monotonic)
  opened_at: float = dataclasses.field(default_factory=time.monotonic)
  itl_slo_s: float = 0.0  # the session's ITL SLO (0: none), for the speculation controller
  # The round in flight, as the speculation controller observes it.
  inflight_depth: int = 0
  inflight_edge_rtt_s: float = 0.0
  inflight_edge_draft_s: float = 0.0


@dataclasses.dataclass
class _OpenState:
  """What an OpenSession handler and its job's done callback share."""

  session: _Session | None = None  # set by the callback once the open succeeded
  abandoned: bool = False  # the RPC was cancelled: close the session as soon as it exists


def tree_depth(parents: Sequence[int]) -> int:
  """The deepest node's depth of a tree given by parents (root: parent -1, depth 0)."""
  depths = [0] * len(parents)
  for i, parent in enumerate(parents):
    if i and parent >= 0:
      depths[i] = depths[parent] + 1
  return max(depths, default=0)


def finish_reason(emitted: Sequence[int], finished: bool, eos_token_ids: Sequence[int]) -> str:
  if not finished:
    return ""
  return "eos" if emitted and emitted[-1] in eos_token_ids else "length"



class VerifierServicer(specedge_pb2_grpc.VerifierServicer):
  """The `specedge.v1.Verifier` handlers. Runs on the event loop; see the module docstring."""

  def __init__(self, worker: EngineWorker, limits: EngineLimits, *, tokenizer=None,
               tokenizer_fingerprint: fingerprint_lib.TokenizerFingerprint | None = None,
               eos_token_ids: Sequence[int] = (), identify: Identify | None = None,
               max_sessions_per_client: int = 0, admission_queue: int = 0,
               admission_wait_s: float = 10.0,
               controller: speculation_controller.SpeculationController | None = None,
               slo_admission: slo_admission_lib.SloAdmission | None = None):
    """`identify` names the caller from its metadata (None: no authentication, every caller is
    the same anonymous client). `max_sessions_per_client` caps the sessions (open or opening)
    one client may hold, keyed by its authenticated name, else by its `client_id` label; 0 is
    no cap beyond the slots. Opens that find every slot taken wait in a FIFO queue of
    `admission_queue` places for up to `admission_wait_s`; past it (and at once with no queue)
    they get RESOURCE_EXHAUSTED with a `retry-after-ms` hint in the trailing metadata.
    `tokenizer_fingerprint` is the target's tokenizer: an open whose edge tokenizer differs gets
    FAILED_PRECONDITION (None: edges' tokenizers are not checked). `controller` (the speculation
    controller) advises every answered round's next tree in `VerifyResponse.next_tree`.
    `slo_admission` caps the sessions held at once below the slots, from their measured ITL
    against their SLOs (serving/slo_admission.py); opens past it queue as for full slots."""
    if max_sessions_per_client < 0:
      raise ValueError(f"max_sessions_per_client must be >= 0, got {max_sessions_per_client}")
    self._worker = worker
    self._limits = limits
    self._controller = controller
    self._slo_admission = slo_admission
    self._tokenizer = tokenizer
    # The target's tokenizer, which every open's `tokenizer` is compared with (None: unchecked).
    self._fingerprint = tokenizer_fingerprint
    self._unchecked_logged: set[str] = set()  # which of the log-once lines were written
    self._eos_token_ids = tuple(int(t) for t in eos_token_ids)
    self._identify = identify
    self._max_sessions_per_client = max_sessions_per_client
    self.sessions: dict[str, _Session] = {}
    self._opens_in_flight = 0
    self._opens_in_flight_by: collections.Counter[str] = collections.Counter()
    self._warn_undecodable = _RateLimitedWarning()
    self.draining = False  # going away: no new sessions; the open ones are served to the end
    self._admission: collections.deque[asyncio.Future] = collections.deque()
    if admission_queue < 0 or not admission_wait_s > 0:
      raise ValueError("admission_queue must be >= 0 and admission_wait_s > 0")
    self._admission_queue = admission_queue
    self._admission_wait_s = admission_wait_s
    self._admitted = 0  # woken waiters that have not yet taken their slot
    self._mean_session_s = 1.0  # running mean of session lifetimes, for the retry-after hint
    # Opens by (client, request_id, resume point): a retried open gets the session it made.
    self._open_by_key: dict[tuple, str] = {}
    self._opening: dict[tuple, asyncio.Future] = {}

  # -- helpers -----------------------------------------------------------------------------------

  async def _run_job(self, job: _Job):
    """Submits a job and waits for its result. The job's result is applied even if the RPC is
    cancelled meanwhile (the future is shielded), so session state never diverges from the
    engine's."""
    self._worker.submit(job)
    return await asyncio.shield(job.future)

  def _caller(self, context: grpc.aio.ServicerContext) -> str:
    return caller_of(self._identify, context)

  def _session(self, session_id: str, caller: str) -> _Session:
    return owned_session(self.sessions, session_id, caller)

  async def _prompt_ids(self, request: specedge_pb2.OpenSessionRequest
                        ) -> tuple[tuple[int, ...], bool]:
    has_text, has_ids = bool(request.prompt_text), len(request.prompt_token_ids) > 0
    if has_text == has_ids:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         "give exactly one of prompt_text and prompt_token_ids "
                         f"(got {'both' if has_text else 'neither'})")
    if has_text:
      if self._tokenizer is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           "this verifier has no tokenizer; send prompt_token_ids")
      max_bytes = PROMPT_TEXT_BYTES_PER_ROW * self._limits.max_len
      size = len(request.prompt_text.encode("utf-8"))
      if size > max_bytes:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"prompt_text is {size} bytes; this server takes at most {max_bytes}")
      # Off the event loop: a long text would otherwise stall every other call, health included.
      encoded = await asyncio.get_running_loop().run_in_executor(
          None, self._tokenizer.encode, request.prompt_text)
      ids = tuple(int(t) for t in encoded)
      if not ids:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prompt_text tokenizes to nothing")
    else:
      if len(request.prompt_token_ids) > self._limits.max_len:  # before copying them
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"prompt has {len(request.prompt_token_ids)} tokens; this server "
                           f"has max_len {self._limits.max_len}")
      ids = tuple(request.prompt_token_ids)
    self._check_vocabulary("prompt token ids", ids)
    return ids, has_text

  def _check_tokenizer(self, request: specedge_pb2.OpenSessionRequest) -> None:
    """FAILED_PRECONDITION, naming every difference, when the edge's tokenizer is not the
    target's: its token ids would mean other text here. Before any other work, as it fails every
    open of that edge alike (trailing metadata `specedge-refused: tokenizer` tells the edge so)."""
    if not request.HasField("tokenizer"):
      self._log_once("unset", "an OpenSession without a tokenizer fingerprint (client %r; an "
                     "older edge): accepted, its tokenizer unchecked (logged once)",
                     request.client_id)
      return
    wire = request.tokenizer
    theirs = fingerprint_lib.TokenizerFingerprint.from_fields(
        vocab_size=wire.vocab_size, special_tokens=dict(wire.special_tokens),
        vocab_sha256=wire.vocab_sha256, range_digests=wire.range_digests)
    if self._fingerprint is not None:
      message = fingerprint_lib.mismatch_message(self._fingerprint, theirs)
    elif theirs.vocab_size > self._limits.vocab_size:  # what can be checked without a tokenizer
      message = (f"the drafter's tokenizer has {theirs.vocab_size} tokens, more than the target "
                 f"model's vocab_size {self._limits.vocab_size}")
    else:
      self._log_once("no_reference", "this verifier has no tokenizer to compare the edges' "
                     "with (client %r): accepted unchecked (logged once)", request.client_id)
      return
    if message:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, message,
                         (("specedge-refused", "tokenizer"),))

  def _log_once(self, key: str, message: str, *args) -> None:
    if key not in self._unchecked_logged:
      self._unchecked_logged.add(key)
      _log.warning(message, *args)

  def _check_vocabulary(self, what: str, tokens: Sequence[int]) -> None:
    bad = [t for t in tokens if not 0 <= t < self._limits.vocab_size]
    if bad:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{what} {bad[:5]} are outside the vocabulary "
                         f"[0, {self._limits.vocab_size})")

  def _resume(self, request: specedge_pb2.OpenSessionRequest) -> tuple[int, ...]:
    """The tokens an earlier session of this request emitted (empty: a new request)."""
    count = len(request.resume_tokens)
    if not count:
      if request.resume_rounds:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "resume_rounds without resume_tokens")
      return ()
    if count >= request.max_new_tokens:  # before copying them
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{count} resume_tokens leave nothing of max_new_tokens "
                         f"{request.max_new_tokens} to generate")
    tokens = tuple(request.resume_tokens)
    self._check_vocabulary("resume_tokens", tokens)
    # The first token (or a speculative first round), then >= 1 token per round.
    if not 0 <= request.resume_rounds <= count:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"resume_rounds must be in [0, {count}] for {count} resume_tokens, "
                         f"got {request.resume_rounds}")
    return tokens

  def _sampling(self, request: specedge_pb2.OpenSessionRequest) -> SamplingParams:
    proto = request.sampling
    top_p = proto.top_p if proto.HasField("top_p") else 1.0
    try:
      return SamplingParams(temperature=float(proto.temperature), top_p=float(top_p),
                            top_k=int(proto.top_k))
    except ValueError as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}") from e

  async def _guard(self, context: grpc.aio.ServicerContext, handler, request):
    """Runs a handler body for the identified caller; a RequestError becomes its gRPC status,
    anything else INTERNAL."""
    try:
      return await handler(request, self._caller(context))
    except RequestError as e:
      if e.trailing_metadata:
        context.set_trailing_metadata(e.trailing_metadata)
      await context.abort(e.code, e.message)
    except ValueError as e:  # the engine's own input checks
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except asyncio.CancelledError:
      raise
    except api.SlotsExhausted as e:
      await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no free slot: {e}")
    except Exception as e:  # pylint: disable=broad-except
      _log.exception("internal error")
      await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

  # -- registration ------------------------------------------------------------------------------

  def rpc_handlers(self) -> grpc.GenericRpcHandler:
    """The service's handlers, taking raw bytes: a request that does not decode (bad bytes,
    invalid UTF-8 in a string field) gets INVALID_ARGUMENT and one rate-limited WARNING line,
    instead of gRPC's UNKNOWN with a traceback per request."""
    methods: dict[str, tuple[Callable, type[protobuf_message.Message]]] = {
        "OpenSession": (self.OpenSession, specedge_pb2.OpenSessionRequest),
        "Verify": (self.Verify, specedge_pb2.VerifyRequest),
        "CloseSession": (self.CloseSession, specedge_pb2.CloseSessionRequest),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        name: grpc.unary_unary_rpc_method_handler(
            self._decoding(name, handler, request_type),
            response_serializer=lambda response: response.SerializeToString())
        for name, (handler, request_type) in methods.items()})

  def _decoding(self, name: str, handler, request_type):
    async def decode_then_handle(raw: bytes, context: grpc.aio.ServicerContext):
      try:
        request = request_type.FromString(raw)
      except protobuf_message.DecodeError as e:
        self._warn_undecodable("undecodable %s request (%d bytes) from %s: %s", name, len(raw),
                               context.peer(), e)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the {name} request does not decode as "
                            f"{request_type.DESCRIPTOR.full_name}: {e}")
      return await handler(request, context)

    return decode_then_handle

  # -- handlers ----------------------------------------------------------------------------------

  async def OpenSession(self, request, context):
    return await self._guard(context, self._open_session, request)

  async def Verify(self, request, context):
    return await self._guard(context, self._verify, request)

  async def CloseSession(self, request, context):
    return await self._guard(context, self._close_session, request)

  async def _open_session(self, request: specedge_pb2.OpenSessionRequest, caller: str):
    if self.draining:
      # UNAVAILABLE is what a drafter retries (with backoff) and resumes after: it reconnects to
      # this address once a new verifier is up, or fails after its own give-up time.
      raise RequestError(grpc.StatusCode.UNAVAILABLE,
                         "the verifier is going away; reconnect elsewhere or later")
    for name in ("client_id", "request_id"):
      if len(getattr(request, name)) > MAX_LABEL_CHARS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{name} has {len(getattr(request, name))} characters; labels have "
                           f"at most {MAX_LABEL_CHARS}")
    self._check_tokenizer(request)
    quota_key = caller if self._identify is not None else request.client_id
    key = ((quota_key, request.request_id, len(request.resume_tokens), request.resume_rounds)
           if request.request_id else None)
    if key is not None:
      replay = await self._replay_open(key)
      if replay is not None:
        return replay
    if self._max_sessions_per_client:
      held = (sum(1 for s in self.sessions.values() if s.quota_key == quota_key)
              + self._opens_in_flight_by[quota_key])
      if held >= self._max_sessions_per_client:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"client {short_id(quota_key)} holds {held} sessions, its quota; close "
                           "one first")
    speculative = request.HasField("first_tree")
    if speculative and request.prompt_text:  # before tokenizing: the tree needs the edge's ids
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         "first_tree needs prompt_token_ids (the edge's tokenization), not "
                         "prompt_text")
    prompt_ids, _ = await self._prompt_ids(request)
    first_tree = None
    if speculative:
      if len(prompt_ids) < 2 or request.resume_tokens:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "first_tree needs prompt_token_ids of at least 2 tokens (the last one "
                           "roots the tree) and no resume_tokens")
      first_tree = self._checked_tree(prompt_ids[-1], request.first_tree.tokens,
                                      request.first_tree.parents)
    sampling = self._sampling(request)
    if not 0 <= request.seed <= _MAX_SEED:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"seed must be >= 0, got {request.seed}")
    if request.itl_slo_ms < 0:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"itl_slo_ms must be >= 0 (0: none), got {request.itl_slo_ms}")
    try:
      api.check_cache_room(len(prompt_ids), int(request.max_new_tokens),
                           max_tree_nodes=self._limits.max_tree_nodes,
                           max_len=self._limits.max_len)
    except ValueError as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    resume = self._resume(request)
    woken = await self._admit()  # no await between here and taking the slot below
    request_id = request.request_id or uuid.uuid4().hex
    job = _OpenJob(future=self._new_future(), request_id=request_id, prompt_ids=prompt_ids,
                   sampling=sampling, seed=int(request.seed),
                   max_new_tokens=int(request.max_new_tokens), resume_tokens=resume,
                   resume_rounds=int(request.resume_rounds), speculative=first_tree is not None,
                   itl_slo_ms=int(request.itl_slo_ms))
    self._opens_in_flight += 1
    self._opens_in_flight_by[quota_key] += 1
    if woken:  # the slot it was woken for is taken now
      self._admitted -= 1
    # A retry of this open (its reply was lost) waits for the whole open, first round included.
    whole_open = self._new_future()
    if key is not None:
      self._opening[key] = whole_open
    state = _OpenState()
    job.future.add_done_callback(
        lambda future: self._open_done(job, request, state, caller, quota_key, key))
    try:
      await self._run_job(job)
      session = state.session
      if session is None or session.open_response is None:  # _open_done ran first: sets both
        raise RuntimeError(f"request {request_id}: the open succeeded but no session was "
                           "registered")
      if first_tree is not None:
        await self._first_round(session, first_tree)
      whole_open.set_result(None)
      return session.open_response
    except asyncio.CancelledError:
      # The caller is gone and will never learn the session id: free the slot once it exists.
      state.abandoned = True
      if state.session is not None:
        self._abandon(state.session)
      raise
    except BaseException as e:
      whole_open.set_exception(e)
      whole_open.exception()  # retrieved: a retry that awaits it opens anew
      raise
    finally:
      if not whole_open.done():  # cancelled: a retry that waits for it opens anew
        whole_open.set_exception(RuntimeError("the open was abandoned"))
        whole_open.exception()
      if key is not None and self._opening.get(key) is whole_open:
        del self._opening[key]

  async def _first_round(self, session: _Session, tree: DraftTree) -> None:
    """Verifies an open's first tree as the session's step 0 and folds the answer into the
    open's response (which a retried open replays). On failure the session is given up: its
    client never learns its id."""
    try:
      round_ = await self._submit_verify(session, tree)
    except BaseException:
      self._abandon(session)
      raise
    response = session.open_response
    if response is None:
      raise RuntimeError("a speculative open without its response")
    response.first_round.CopyFrom(round_)
    response.finished, response.finish_reason = round_.finished, round_.finish_reason
    session.opened_at_step = session.steps_applied  # a retried open is valid until step 1

  def _free_slots(self) -> int:
    held = (self._limits.num_slots if self._slo_admission is None
            else min(self._limits.num_slots, self._slo_admission.capacity))
    return held - len(self.sessions) - self._opens_in_flight - self._admitted

  @property
  def free_slots(self) -> int:
    """Server slots no session holds, is opening or was promised (a metrics gauge); 0 while
    SLO admission holds fewer sessions than are open."""
    return max(0, self._free_slots())

  @property
  def admission_queue_length(self) -> int:
    """Opens waiting in the admission queue for a slot (a metrics gauge)."""
    return len(self._admission)

  async def _admit(self) -> bool:
    """Returns once this open may take a slot: at once (False) when one is free and nobody
    queues before it; else (True) after waiting its turn (FIFO) in the bounded queue, woken
    with a slot reserved for it (`_admitted`)."""
    if self._free_slots() > 0 and not self._admission:
      return False
    if len(self._admission) >= self._admission_queue:
      hint_ms = int(1000 * min(10.0, max(0.05, (len(self._admission) + 1)
                                         * self._mean_session_s / self._limits.num_slots)))
      raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"all {self._limits.num_slots} server slots are taken and "
                         f"{len(self._admission)} opens are queued; retry after {hint_ms} ms",
                         (("retry-after-ms", str(hint_ms)),))
    waiter = asyncio.get_running_loop().create_future()
    self._admission.append(waiter)
    try:
      await asyncio.wait_for(waiter, self._admission_wait_s)
    except asyncio.TimeoutError:
      self._drop_waiter(waiter)
      raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"no slot came free in {self._admission_wait_s:.1f} s; retry later",
                         (("retry-after-ms", str(int(1000 * self._mean_session_s))),)) from None
    except asyncio.CancelledError:  # the caller went away while it waited
      self._drop_waiter(waiter)
      raise
    if self.draining:
      self._admitted -= 1
      self._wake_admission()
      raise RequestError(grpc.StatusCode.UNAVAILABLE,
                         "the verifier is going away; reconnect elsewhere or later")
    return True

  def _drop_waiter(self, waiter: asyncio.Future) -> None:
    """A queued open that will not take its slot: out of the queue, or, if it was woken
    already, its slot passed on to the next in line."""
    if waiter in self._admission:
      self._admission.remove(waiter)
    elif waiter.done() and not waiter.cancelled():
      self._admitted -= 1
      self._wake_admission()

  def _wake_admission(self) -> None:
    """Lets the oldest queued opens take the slots that are free now."""
    while self._admission and self._free_slots() > 0:
      waiter = self._admission.popleft()
      if not waiter.done():
        self._admitted += 1
        waiter.set_result(None)

  async def _replay_open(self, key: tuple) -> specedge_pb2.OpenSessionResponse | None:
    """The answer of an earlier open with this key (a retry after its reply was lost), waiting
    for it if it is still running; None if there is none, so this open is a new one."""
    opening = self._opening.get(key)
    if opening is not None:
      try:
        await asyncio.shield(opening)
      except Exception:  # pylint: disable=broad-except (it failed: this retry opens anew)
        return None
    session = self.sessions.get(self._open_by_key.get(key, ""))
    if (session is None or session.open_response is None
        or session.steps_applied != session.opened_at_step):
      return None
    session.last_used = time.monotonic()
    return session.open_response

  def _open_done(self, job: _OpenJob, request, state: _OpenState, caller: str,
                 quota_key: str, key: tuple | None) -> None:
    """Registers a successful open (on the loop, even if the RPC was cancelled meanwhile)."""
    self._opens_in_flight -= 1
    self._opens_in_flight_by[quota_key] -= 1
    if not self._opens_in_flight_by[quota_key]:
      del self._opens_in_flight_by[quota_key]
    if job.future.cancelled() or job.future.exception() is not None:
      self._wake_admission()  # the slot it was to take is free again
      return
    opened: OpenResult = job.future.result()
    session = _Session(session_id=uuid.uuid4().hex, slot=opened.slot, request_id=job.request_id,
                       client_id=request.client_id, owner=caller, quota_key=quota_key,
                       prompt_tokens=len(job.prompt_ids),
                       max_new_tokens=job.max_new_tokens, last_token=opened.first_token,
                       finished=opened.finished,
                       generated=0 if job.speculative else max(1, len(job.resume_tokens)),
                       steps_applied=job.resume_rounds, itl_slo_s=job.itl_slo_ms / 1000.0)
    session.opened_at_step = session.steps_applied
    session.open_response = specedge_pb2.OpenSessionResponse(
        session_id=session.session_id, first_token=opened.first_token, finished=opened.finished,
        prompt_tokens=len(job.prompt_ids),
        prompt_token_ids=job.prompt_ids if request.prompt_text else (),
        finish_reason=finish_reason([opened.first_token], opened.finished, self._eos_token_ids),
        timing=specedge_pb2.ServerTiming(queue_time_s=opened.queue_time_s,
                                         forward_time_s=opened.forward_time_s, batch_size=1))
    self.sessions[session.session_id] = session
    if self._slo_admission is not None:
      self._slo_admission.opened(session.session_id, itl_slo_s=session.itl_slo_s,
                                 now=time.monotonic())
    if key is not None:
      session.open_key = key
      self._open_by_key[key] = session.session_id
    state.session = session
    if state.abandoned:
      self._abandon(session)

  def _advise(self, session: _Session, outcome: VerifyOutcome) -> api.TreeLimits:
    """Feeds the controller this round and asks for the next tree. The server's load is the
    verifies in flight over one full batch."""
    controller = self._controller
    assert controller is not None  # the caller checks
    depth = session.inflight_depth
    controller.observe(session.session_id, speculation_controller.RoundObservation(
        tree_depth=depth, accepted=len(outcome.result.accepted),
        rtt_s=session.inflight_edge_rtt_s,
        draft_step_s=session.inflight_edge_draft_s / max(depth, 1),
        server_s=outcome.queue_time_s + outcome.forward_time_s,
        **speculation_controller.tree_report(outcome.sent_nodes, outcome.kept_nodes,
                                             outcome.cut_for_worth)))
    in_flight = sum(s.verify_in_flight for s in self.sessions.values())
    return controller.advise(session.session_id,
                             queue_fraction=in_flight / max(self._limits.max_batch_size, 1),
                             itl_slo_s=session.itl_slo_s)

  def _forget(self, session: _Session) -> None:
    """Removes a session from the table (and its open key): later calls get NOT_FOUND, and its
    slot goes to the oldest queued open."""
    if self._controller is not None:
      self._controller.forget(session.session_id)
    if self._slo_admission is not None:
      self._slo_admission.forget(session.session_id)
    if self.sessions.pop(session.session_id, None) is not None:
      lifetime = time.monotonic() - session.opened_at
      self._mean_session_s += 0.1 * (lifetime - self._mean_session_s)
    key = session.open_key
    if key is not None and self._open_by_key.get(key) == session.session_id:
      del self._open_by_key[key]
    self._wake_admission()

  def _abandon(self, session: _Session) -> None:
    if session.session_id in self.sessions:
      self._forget(session)
      self._worker.submit(_CloseJob(future=self._new_future(), request_id=session.request_id,
                                    slot=session.slot))

  async def _verify(self, request: specedge_pb2.VerifyRequest, caller: str):
    session = self._session(request.session_id, caller)
    if request.HasField("step"):
      replay = await self._replay(session, request)
      if replay is not None:
        return replay
    if session.broken:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"session cannot continue ({session.broken}); close it")
    if session.finished:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         "session already finished; close it")
    if session.verify_in_flight:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         "a Verify for this session is already in flight")
    if not 0 <= request.root_token < self._limits.vocab_size:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"root_token {request.root_token} is outside the vocabulary "
                         f"[0, {self._limits.vocab_size})")
    tree = self._checked_tree(int(request.root_token), request.tokens, request.parents)
    if request.root_token != session.last_token:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"root_token {request.root_token} is not the session's last token "
                         f"{session.last_token}; the client is out of sync")
    session.inflight_edge_rtt_s = max(float(request.edge_rtt_s), 0.0)
    session.inflight_edge_draft_s = max(float(request.edge_draft_s), 0.0)
    return await self._submit_verify(session, tree)

  def _checked_tree(self, root: int, wire_tokens: Sequence[int],
                    wire_parents: Sequence[int]) -> DraftTree:
    """The tree of a Verify (or of an open's first round) from its wire fields, every field
    checked; INVALID_ARGUMENT names what is wrong."""
    if len(wire_tokens) != len(wire_parents):
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tokens ({len(wire_tokens)}) and parents ({len(wire_parents)}) "
                         "differ in length")
    if len(wire_tokens) + 1 > self._limits.max_tree_nodes:  # before copying them
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tree has {len(wire_tokens) + 1} nodes (root included); this "
                         f"server verifies at most {self._limits.max_tree_nodes}")
    tokens = np.asarray(wire_tokens, np.int64)
    parents = np.asarray(wire_parents, np.int64)
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
    tree = DraftTree(tokens=np.concatenate([[root], tokens]).astype(np.int32),
                     parents=np.concatenate([[-1], parents]).astype(np.int32))
    try:  # what the field checks above leave: distinct siblings
      api.validate_tree(tree.tokens, tree.parents, max_nodes=self._limits.max_tree_nodes,
                        vocab_size=self._limits.vocab_size)
    except ValueError as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid tree: {e}") from e
    return tree

  async def _submit_verify(self, session: _Session,
                           tree: DraftTree) -> specedge_pb2.VerifyResponse:
    """Verifies the session's next round (its root checked by the caller) and returns the
    answer, which is also stored for a retry of that step."""
    job = _VerifyJob(future=self._new_future(), request_id=session.request_id, slot=session.slot,
                     tree=tree)
    session.verify_in_flight = True
    session.inflight_step, session.inflight = session.steps_applied, job.future
    session.inflight_depth = tree_depth([int(p) for p in tree.parents])
    session.last_used = time.monotonic()
    root = int(tree.tokens[0])
    job.future.add_done_callback(lambda future: self._verify_done(session, root, future))
    await self._run_job(job)
    if session.last_response is None:  # _verify_done runs first: it was registered first
      raise RuntimeError("a verify succeeded but its answer was not stored")
    return session.last_response

  async def _replay(self, session: _Session,
                    request: specedge_pb2.VerifyRequest) -> specedge_pb2.VerifyResponse | None:
    """The stored answer when `request` retries a round already applied or in flight; None when
    it is the next round; FAILED_PRECONDITION for any other step."""
    step = request.step
    if session.inflight is not None and step == session.inflight_step:
      await asyncio.shield(session.inflight)  # the original is still running: share its answer
      step = session.steps_applied - 1
    if step == session.steps_applied - 1 and session.last_response is not None:
      if request.root_token != session.last_round_root:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"step {request.step} was applied with root {session.last_round_root}, "
                           f"not {request.root_token}")
      return session.last_response
    if step != session.steps_applied:
      raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                         f"step {request.step}, but the session has applied "
                         f"{session.steps_applied} rounds; the client is out of sync")
    return None

  def _verify_done(self, session: _Session, root: int, future: asyncio.Future) -> None:
    """Applies a verify's outcome to the session and stores its answer (on the loop, even if the
    RPC was cancelled meanwhile: a retry of the same step then gets the answer)."""
    session.verify_in_flight = False
    session.inflight_step, session.inflight = -1, None
    session.last_used = time.monotonic()
    if future.cancelled():
      return
    error = future.exception()
    if error is None:
      outcome: VerifyOutcome = future.result()
      result = outcome.result
      session.last_token = int(result.bonus)
      session.generated += len(result.emitted)
      session.finished = bool(result.finished)
      session.steps_applied += 1
      session.last_round_root = root
      session.last_response = specedge_pb2.VerifyResponse(
          accepted_tokens=[int(t) for t in result.accepted], bonus_token=int(result.bonus),
          emitted_tokens=[int(t) for t in result.emitted], finished=bool(result.finished),
          finish_reason=finish_reason(result.emitted, result.finished, self._eos_token_ids),
          timing=specedge_pb2.ServerTiming(queue_time_s=outcome.queue_time_s,
                                           forward_time_s=outcome.forward_time_s,
                                           batch_size=outcome.batch_size))
      if self._slo_admission is not None and self._slo_admission.answered(
          session.session_id, emitted=len(result.emitted), now=time.monotonic(),
          held=len(self.sessions), waiting=bool(self._admission),
          queue_s=outcome.queue_time_s):
        _log.info("SLO admission: hold at most %d sessions (%d held, %d waiting)",
                  self._slo_admission.capacity, len(self.sessions), len(self._admission))
        self._wake_admission()  # a raised capacity lets queued opens in
      if self._controller is not None and not result.finished:
        advice = self._advise(session, outcome)
        session.last_response.next_tree.budget = advice.budget
        session.last_response.next_tree.depth = advice.depth
    elif isinstance(error, RequestError) and error.code == grpc.StatusCode.INTERNAL:
      session.broken = error.message

  async def _close_session(self, request: specedge_pb2.CloseSessionRequest, caller: str):
    session = self._session(request.session_id, caller)
    # Remove first: later calls see NOT_FOUND, and the slot counts as free for new opens, which
    # the engine thread can only run after this close (its inbox is FIFO).
    self._forget(session)
    job = _CloseJob(future=self._new_future(), request_id=session.request_id, slot=session.slot)
    await self._run_job(job)
    return specedge_pb2.CloseSessionResponse(generated_tokens=session.generated)

  def _new_future(self) -> asyncio.Future:
    return asyncio.get_running_loop().create_future()

  async def reap_idle_sessions(self, lease_s: float) -> list[str]:
    """Closes sessions whose lease ran out: no call for longer than lease_s (a verify in flight
    holds the lease). Returns their ids."""
    now = time.monotonic()
    stale = [s for s in self.sessions.values()
             if not s.verify_in_flight and now - s.last_used > lease_s]
    for session in stale:
      _log.warning("closing session %s (request %s): its lease ran out (no call for %.1f s)",
                   session.session_id, short_id(session.request_id), now - session.last_used)
      self._abandon(session)
    return [s.session_id for s in stale]
