"""The edge's OpenAI-compatible HTTP API and its chat page, on FastAPI + uvicorn.

What this module owns: the HTTP surface of one edge drafter (vLLM / SGLang convention):
`POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events or not),
`GET /v1/models`, `GET /health`, `GET /metrics` (when given a metrics object) and the browser
chat page at `GET /`. It validates requests, checks bearer keys, tokenizes prompts at the edge
(the target's tokenizer and chat template), submits `EdgeRequest`s to the backend (the
`Drafter`), turns its per-round `RoundUpdate`s into text (detokenization, stop strings) and maps
failures to HTTP statuses in OpenAI's error shape. `serve` runs the app on uvicorn inside the
caller's event loop, beside the drafter's gRPC client. It never drafts, verifies or talks gRPC:
everything below the HTTP layer is the backend's (`EdgeBackend`).

Streaming is per verification round, not per token: one SSE chunk per `RoundUpdate` (a round
emits the accepted path plus the bonus token at once), each with a `specedge` extension field
`{"round", "accepted_tokens", "tree_size", "tokens"}` that the chat page reads.

Headers wait for the first round: a request that fails before its first token (verifier
unavailable, prompt too long) gets a proper status (503, 400) instead of a 200 stream that
breaks. A failure after the first token can only be reported inside the stream: an SSE event
`{"error": {...}}` followed by `[DONE]`, as vLLM does (the `openai` client raises `APIError`).

Cancellation: a request whose HTTP client goes away is cancelled on the backend, so its draft
slot and server session are freed at once rather than at the end of generation. Streaming:
Starlette cancels the task that iterates the SSE generator when the client disconnects; the
generator's `finally` and the response's own `finally` (for a generator left suspended at a
`yield`, which Python finalizes only when it is collected) both call `_cancel_request`.
Non-streaming: Starlette never cancels a handler whose client left (uvicorn only reports it on
`receive()`), so the handler races the generation against an `http.disconnect` watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, Protocol, TypeVar

import fastapi
import pydantic
import uvicorn
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from specedge_jax.api import SamplingParams
from specedge_jax.serving.drafter import EdgeRequest, QueueFull, RoundUpdate

_log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_TOKENS = 256
# The wire's max_new_tokens is an int32 and the seed an int64 >= 0 (specedge.proto).
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 4  # as OpenAI
# gRPC status names of failures that mean the verifier could not serve (not the caller's fault,
# worth a retry): 503. RESOURCE_EXHAUSTED is the verifier staying full past the drafter's
# give-up time.
_UNAVAILABLE_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"})
# Failures that are the request's own (a prompt longer than the caches, say): 400.
_BAD_INPUT_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
_FINISH_REASONS = {"eos": "stop", "length": "length"}  # the backend's -> OpenAI's


# ------------------------------------------------------------------------------------------------
# The backend contract.


class UpdateStream(Protocol):
  """What `EdgeBackend.submit` returns (`drafter.RequestStream`): the request's `RoundUpdate`s,
  the last one `finished`, and `cancel()` to stop it early (idempotent)."""

  def __aiter__(self) -> UpdateStream: ...

  async def __anext__(self) -> RoundUpdate: ...

  async def cancel(self) -> None: ...


class EdgeBackend(Protocol):
  """What the HTTP layer needs of the edge (`drafter.Drafter`; tests pass a fake)."""

  def submit(self, request: EdgeRequest) -> UpdateStream: ...

  def stats(self) -> dict[str, int]: ...


# ------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape.


class APIError(Exception):
  """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = (status, message, type, param,
                                                                   code)

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}

  def response(self) -> responses.JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
    return responses.JSONResponse(self.body(), status_code=self.status, headers=headers)


def _bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
  return APIError(400, message, param=param, code=code)


def _backend_error(update: RoundUpdate) -> APIError:
  """The HTTP error for a request the backend ended with an error (or cancelled under us)."""
  code = update.error_code or ("CANCELLED" if update.finish_reason == "cancelled" else "")
  message = update.error or f"the request ended with {update.finish_reason or 'no result'}"
  if code in _BAD_INPUT_CODES:
    return APIError(400, message, code=code.lower())
  if code in _UNAVAILABLE_CODES:
    return APIError(503, f"the verifier is unavailable: {message}",
                    type="service_unavailable_error", code=code.lower())
  return APIError(500, message, type="server_error", code=code.lower() or None)


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
  """One readable message and the offending parameter, from pydantic's / FastAPI's errors."""
  if not errors:
    return "invalid request", None
  first = errors[0]
  loc = [str(part) for part in first.get("loc", ()) if part != "body"]
  if first.get("type") == "json_invalid":
    detail = (first.get("ctx") or {}).get("error", "")
    return f"could not parse the JSON body{': ' + detail if detail else ''}", None
  if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
    return "the body must be a JSON object (Content-Type: application/json)", None
  param = ".".join(loc) or None
  message = first.get("msg", "invalid value")
  return (f"{param}: {message}" if param else message), param


# ------------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are ignored (clients send many); the ones that would change the
# answer and that the edge cannot honour are refused by name.


class _StreamOptions(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  include_usage: bool = False


class _GenerationBody(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")

  model: str
  max_tokens: int | None = pydantic.Field(default=None, ge=1, le=MAX_TOKENS_LIMIT, strict=True)
  temperature: float | None = pydantic.Field(default=None, ge=0.0, allow_inf_nan=False)
  top_p: float | None = pydantic.Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
  seed: int | None = pydantic.Field(default=None, ge=0, le=MAX_SEED, strict=True)
  stop: str | list[str] | None = None
  n: int = pydantic.Field(default=1, strict=True)
  stream: bool = False
  stream_options: _StreamOptions | None = None
  logprobs: Any = None


class CompletionBody(_GenerationBody):
  prompt: str | list[Any]
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None


class _TextPart(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  type: Literal["text"]
  text: str


class _ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  role: Literal["system", "user", "assistant", "developer"]
  content: str | list[_TextPart]

  def text(self) -> str:
    if isinstance(self.content, str):
      return self.content
    return "".join(part.text for part in self.content)


class ChatBody(_GenerationBody):
  messages: list[_ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: int | None = pydantic.Field(default=None, ge=1, le=MAX_TOKENS_LIMIT,
                                                     strict=True)
  chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: e.g. {"enable_thinking": false}


@dataclasses.dataclass(frozen=True)
class _Job:
  """One validated generation request, whichever endpoint it came from."""

  chat: bool
  prompt_ids: tuple[int, ...]
  max_tokens: int
  sampling: SamplingParams | None
  seed: int | None
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool


def _common_params(body: _GenerationBody) -> dict[str, Any]:
  """Checks what both endpoints share and returns the _Job fields it gives."""
  if body.n != 1:
    raise _bad_request("only n=1 is supported", param="n")
  if body.logprobs not in (None, False, 0):
    raise _bad_request("logprobs are not supported", param="logprobs")
  if body.stream_options is not None and not body.stream:
    raise _bad_request("stream_options is only allowed when stream is true",
                       param="stream_options")
  stop: tuple[str, ...]
  if body.stop is None:
    stop = ()
  elif isinstance(body.stop, str):
    stop = (body.stop,)
  else:
    stop = tuple(body.stop)
  if len(stop) > MAX_STOP_STRINGS:
    raise _bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop")
  if any(not s for s in stop):
    raise _bad_request("stop strings must not be empty", param="stop")
  sampling = None  # neither given: the drafter's configured sampling
  if body.temperature is not None or body.top_p is not None:
    try:
      sampling = SamplingParams(
          temperature=1.0 if body.temperature is None else body.temperature,
          top_p=1.0 if body.top_p is None else body.top_p)
    except ValueError as e:
      raise _bad_request(str(e), param="temperature" if "temperature" in str(e) else "top_p")
  return dict(sampling=sampling, seed=body.seed, stop=stop, stream=body.stream,
              include_usage=bool(body.stream_options and body.stream_options.include_usage))


# ------------------------------------------------------------------------------------------------
# Detokenization and stop strings.


class _TextAssembler:
  """Turns the generated ids into text deltas: decodes every id so far each round (a round adds a
  few tokens; decoding the whole is what keeps multi-byte characters and merges right) and emits
  what is new, holding back a trailing '\\ufffd' (an incomplete UTF-8 sequence that the next token
  completes) and any suffix that may be the start of a stop string.

  With a stop string, the text is cut before it and `completion_tokens` counts the tokens up to
  and including the one that completes the stop string (as a token-by-token server such as vLLM
  counts them), not the rest of that round, which the user never sees.
  """

  def __init__(self, tokenizer, stop: tuple[str, ...]):
    self._tokenizer = tokenizer
    self._stop = stop
    self.ids: list[int] = []
    self.sent = ""  # the text emitted so far
    self.stopped = False
    self.completion_tokens = 0

  def _decode(self, ids: list[int]) -> str:
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def _find_stop(self, text: str) -> int | None:
    found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
    return min(found) if found else None

  def _held_back(self, text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in self._stop:
      for n in range(min(len(stop) - 1, len(text)), longest, -1):
        if text.endswith(stop[:n]):
          longest = n
          break
    return longest

  def push(self, tokens: tuple[int, ...] | list[int], final: bool) -> str:
    """Adds one round's tokens; returns the text to emit now. `final`: nothing follows."""
    before = len(self.ids)
    self.ids.extend(int(t) for t in tokens)
    text = self._decode(self.ids)
    cut = self._find_stop(text) if self._stop else None
    if cut is not None:
      self.stopped = True
      self.completion_tokens = self._tokens_through_stop(before)
      return self._advance(text[:cut])
    self.completion_tokens = len(self.ids)
    if not final:
      text = text.rstrip("\ufffd")
      text = text[:len(text) - self._held_back(text)]
    return self._advance(text)

  def _tokens_through_stop(self, before: int) -> int:
    for n in range(before + 1, len(self.ids)):
      if self._find_stop(self._decode(self.ids[:n])) is not None:
        return n
    return len(self.ids)

  def _advance(self, text: str) -> str:
    # Decoding a longer id list extends the text of a shorter one (byte-level BPE; the held-back
    # tail aside), so what was sent is a prefix of `text`. Should a tokenizer ever rewrite its
    # past text, nothing can be taken back from the user: emit only what lies beyond.
    if len(text) <= len(self.sent):
      return ""
    delta = text[len(self.sent):]
    self.sent = text
    return delta


class _Generation:
  """One request in flight: its stream, its text and its round figures."""

  def __init__(self, stream: UpdateStream, tokenizer, job: _Job):
    self.stream = stream
    self.job = job
    self.text = _TextAssembler(tokenizer, job.stop)
    self.rounds = 0  # verification rounds (round 0, the prefill, excluded)
    self.accepted = 0
    self.draft_tokens = 0
    self.finish_reason: str | None = None  # OpenAI's, once done
    self.backend_done = False  # the backend sent its last update (nothing to cancel)
    self.cancelled = False

  async def next_update(self) -> RoundUpdate | None:
    """The next update, or None when the stream ended without a finished one."""
    try:
      return await self.stream.__anext__()
    except StopAsyncIteration:
      return None

  def apply(self, update: RoundUpdate) -> str:
    """Takes one round in; returns its text delta. Sets `finish_reason` when the reply is done."""
    if update.round > 0:
      self.rounds += 1
      self.accepted += update.accepted
      self.draft_tokens += update.tree_size
    if update.finished:
      self.backend_done = True
    tokens = tuple(update.tokens)
    room = self.job.max_tokens - len(self.text.ids)
    over = len(tokens) > room  # the backend should stop at max_tokens; never pass more on
    tokens = tokens[:max(room, 0)]
    delta = self.text.push(tokens, final=update.finished or over)
    if self.text.stopped:
      self.finish_reason = "stop"
    elif over or (update.finished and update.finish_reason == "length"):
      self.finish_reason = "length"
    elif update.finished:
      self.finish_reason = _FINISH_REASONS.get(update.finish_reason, "stop")
    return delta

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  def specedge(self, update: RoundUpdate) -> dict[str, int]:
    return {"round": update.round, "accepted_tokens": update.accepted,
            "tree_size": update.tree_size, "tokens": len(update.tokens)}

  def usage(self) -> dict[str, Any]:
    completion = self.text.completion_tokens
    prompt = len(self.job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "specedge": {"rounds": self.rounds, "accepted_tokens": self.accepted,
                         "draft_tokens": self.draft_tokens,
                         "accepted_per_round": (self.accepted / self.rounds if self.rounds
                                                else 0.0)}}

  async def cancel(self) -> None:
    """Cancels the backend request unless it already ended (idempotent)."""
    if self.backend_done or self.cancelled:
      return
    self.cancelled = True
    await _cancel_request(self.stream)


# The cancel tasks in flight: the loop keeps only weak references to tasks.
_cancelling: set[asyncio.Task] = set()


async def _cancel_request(stream: UpdateStream) -> None:
  """`await stream.cancel()`, robust to the caller itself being cancelled.

  The callers are the SSE generator's `finally` and the handlers' clean-up, which run exactly
  when anyio cancels the request's task (the client went away): in a cancelled anyio scope every
  await raises CancelledError again at once, so a plain `await stream.cancel()` would be cut
  short before the backend freed anything. The cancel runs in a task of its own, which that
  cancellation does not reach (`shield`), and is awaited when the caller is not being cancelled.
  """
  try:
    task = asyncio.ensure_future(stream.cancel())
  except RuntimeError:  # the loop is closing: nothing left to free
    return
  _cancelling.add(task)
  task.add_done_callback(_cancelling.discard)
  task.add_done_callback(_log_cancel_failure)
  await asyncio.shield(task)


def _log_cancel_failure(task: asyncio.Task) -> None:
  if not task.cancelled() and task.exception() is not None:
    _log.error("cancelling a request failed: %r", task.exception())


class _ClientGone(Exception):
  """The HTTP client disconnected before the answer was ready."""


async def _wait_disconnect(request: fastapi.Request) -> None:
  # The body is read already, so the next ASGI message is the disconnect (uvicorn sends it when
  # the connection closes, or once the response is complete).
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      return


async def _unless_disconnected(request: fastapi.Request, work: Awaitable[T]) -> T:
  """Awaits `work`; raises _ClientGone (and cancels `work`) if the client disconnects first."""
  work_task = asyncio.ensure_future(work)
  watcher = asyncio.ensure_future(_wait_disconnect(request))
  try:
    await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    watcher.cancel()
    if not work_task.done():
      work_task.cancel()
  if work_task.done() and not work_task.cancelled():
    return work_task.result()
  raise _ClientGone()


class _EventStreamResponse(responses.StreamingResponse):
  """A StreamingResponse that cancels its generation however the response ends.

  The SSE generator's own `finally` covers a cancellation delivered inside it; this one covers
  the one delivered while Starlette awaits `send()`, which leaves the generator suspended at a
  `yield` (its `finally` would then run only when the generator is garbage-collected).
  """

  def __init__(self, content: AsyncIterator[str], generation: _Generation):
    super().__init__(content, media_type="text/event-stream",
                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    self._generation = generation

  async def __call__(self, scope, receive, send) -> None:
    try:
      await super().__call__(scope, receive, send)
    finally:
      await self._generation.cancel()


def _sse(payload: Any) -> str:
  return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------------------------------
# The app.


_STATIC = importlib.resources.files("specedge_jax.serving") / "static"


def create_app(backend: EdgeBackend, tokenizer, *, model_name: str,
               api_keys: frozenset[str] = frozenset(), metrics=None) -> fastapi.FastAPI:
  """The edge's HTTP app over `backend`, answering for `model_name`.

  `tokenizer`: the target's HF tokenizer (prompts are tokenized here, outputs decoded here).
  `api_keys`: accepted bearer keys for `/v1/*`; empty: no authentication. `metrics`: an object
  with a prometheus_client `registry`, served at `/metrics` (None: 404).
  """
  app = fastapi.FastAPI(title="SpecEdge edge API", docs_url=None, redoc_url=None,
                        openapi_url=None)
  chat_page = (_STATIC / "chat.html").read_text(encoding="utf-8")
  keys = tuple(k.encode("utf-8") for k in api_keys)

  @app.exception_handler(APIError)
  async def _api_error(_: fastapi.Request, exc: APIError):
    return exc.response()

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def _validation_error(_: fastapi.Request, exc: fastapi_exceptions.RequestValidationError):
    message, param = _validation_message(list(exc.errors()))
    return _bad_request(message, param=param).response()

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http_error(_: fastapi.Request, exc: starlette_exceptions.HTTPException):
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), type=kind, code=code).response()

  @app.exception_handler(Exception)
  async def _internal_error(_: fastapi.Request, exc: Exception):
    _log.exception("unhandled error in the HTTP API")
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

  def check_key(request: fastapi.Request) -> None:
    if not keys:
      return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
      raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                     type="authentication_error", code="invalid_api_key")
    given_bytes = given.strip().encode("utf-8")
    # Every key is compared, in constant time, so the time taken tells nothing of which matched.
    ok = False
    for key in keys:
      ok |= hmac.compare_digest(given_bytes, key)
    if not ok:
      raise APIError(401, "invalid API key", type="authentication_error",
                     code="invalid_api_key")

  async def parse(request: fastapi.Request, model: type[_GenerationBody]) -> Any:
    check_key(request)
    raw = await request.body()
    try:
      # NaN and Infinity are not JSON; Python's parser would take them.
      data = json.loads(raw, parse_constant=_refuse_constant) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
      raise _bad_request(f"could not parse the JSON body: {e}") from None
    if not isinstance(data, dict):
      raise _bad_request("the body must be a JSON object (Content-Type: application/json)")
    try:
      body = model.model_validate(data)
    except pydantic.ValidationError as e:
      message, param = _validation_message(list(e.errors()))
      raise _bad_request(message, param=param) from None
    if body.model != model_name:
      raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                     f"{model_name!r}", param="model", code="model_not_found")
    return body

  def encode(text: str, *, add_special_tokens: bool) -> tuple[int, ...]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return tuple(int(t) for t in ids)

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    body: CompletionBody = await parse(request, CompletionBody)
    prompt = body.prompt
    if isinstance(prompt, list):
      if len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
      elif prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise _bad_request("token-id prompts are not supported: send the prompt as text",
                           param="prompt")
      else:
        raise _bad_request("send exactly one prompt string per request", param="prompt")
    if body.echo:
      raise _bad_request("echo is not supported", param="echo")
    if body.best_of not in (None, 1):
      raise _bad_request("only best_of=1 is supported", param="best_of")
    if body.suffix:
      raise _bad_request("suffix is not supported", param="suffix")
    # As vLLM: a completion prompt gets the tokenizer's special tokens (a BOS, for models that
    # have one; the embedded and Qwen3 tokenizers add none).
    prompt_ids = encode(prompt, add_special_tokens=True)
    if not prompt_ids:
      raise _bad_request("the prompt is empty", param="prompt")
    job = _Job(chat=False, prompt_ids=prompt_ids,
               max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS, **_common_params(body))
    return await generate(request, job)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    body: ChatBody = await parse(request, ChatBody)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
      text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           **(body.chat_template_kwargs or {}))
    except Exception as e:  # pylint: disable=broad-except (template errors are the input's)
      raise _bad_request(f"the chat template failed on these messages: {e}",
                         param="messages") from None
    if not isinstance(text, str):
      raise APIError(500, "the chat template did not give text", type="server_error")
    # The template writes any BOS itself: no special tokens added on top (vLLM's default too).
    prompt_ids = encode(text, add_special_tokens=False)
    if not prompt_ids:
      raise _bad_request("the messages give an empty prompt", param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    job = _Job(chat=True, prompt_ids=prompt_ids, max_tokens=max_tokens, **_common_params(body))
    return await generate(request, job)

  async def generate(request: fastapi.Request, job: _Job):
    edge_request = EdgeRequest(request_id=f"http-{uuid.uuid4().hex}", prompt_ids=job.prompt_ids,
                               seed=job.seed, max_new_tokens=job.max_tokens,
                               sampling=job.sampling)
    try:
      stream = backend.submit(edge_request)
    except QueueFull as e:
      raise APIError(429, f"the edge is at capacity: {e}", type="rate_limit_error",
                     code="queue_full") from None
    generation = _Generation(stream, tokenizer, job)
    try:
      first = await _unless_disconnected(request, generation.next_update())
      if first is None:
        raise APIError(500, "the request ended before its first token", type="server_error")
      if first.finished and first.finish_reason in ("error", "cancelled"):
        generation.backend_done = True
        raise _backend_error(first)
      if job.stream:
        response_id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        events = sse_events(generation, first, response_id, int(time.time()))
        return _EventStreamResponse(events, generation)
      return await _unless_disconnected(request, complete(generation, first))
    except _ClientGone:
      await generation.cancel()
      return fastapi.Response(status_code=499)  # nobody reads it (nginx's "client closed")
    except BaseException:
      await generation.cancel()
      raise

  async def complete(generation: _Generation, first: RoundUpdate):
    """The whole reply of a non-streaming request."""
    update: RoundUpdate | None = first
    while True:
      if update is None:
        raise APIError(500, "the request ended without finishing", type="server_error")
      if update.finished and update.finish_reason in ("error", "cancelled"):
        generation.backend_done = True
        raise _backend_error(update)
      generation.apply(update)
      if generation.done:
        break
      update = await generation.next_update()
    await generation.cancel()  # a stop string or max_tokens ended it before the backend did
    job = generation.job
    choice: dict[str, Any] = {"index": 0, "logprobs": None,
                              "finish_reason": generation.finish_reason}
    if job.chat:
      choice["message"] = {"role": "assistant", "content": generation.text.sent}
    else:
      choice["text"] = generation.text.sent
    return {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [choice],
            "usage": generation.usage()}

  async def sse_events(generation: _Generation, first: RoundUpdate, response_id: str,
                       created: int) -> AsyncIterator[str]:
    """One SSE chunk per round, then usage (if asked) and [DONE]."""
    job = generation.job
    base = {"id": response_id, "object": "chat.completion.chunk" if job.chat
            else "text_completion", "created": created, "model": model_name}
    try:
      update: RoundUpdate | None = first
      while True:
        if update is None or (update.finished and update.finish_reason in ("error", "cancelled")):
          if update is not None:
            generation.backend_done = True
          error = (_backend_error(update) if update is not None else
                   APIError(500, "the request ended without finishing", type="server_error"))
          yield _sse(error.body())
          break
        delta = generation.apply(update)
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": generation.finish_reason}
        if job.chat:
          choice["delta"] = ({"role": "assistant", "content": delta} if update is first
                             else {"content": delta})
        else:
          choice["text"] = delta
        chunk: dict[str, Any] = dict(base, choices=[choice],
                                     specedge=generation.specedge(update))
        if job.include_usage:
          chunk["usage"] = None  # OpenAI: null on every chunk but the usage one
        yield _sse(chunk)
        if generation.done:
          await generation.cancel()  # a stop string or max_tokens ended it before the backend
          if job.include_usage:
            yield _sse(dict(base, choices=[], usage=generation.usage(),
                            specedge={"round": update.round, "accepted_tokens": 0,
                                      "tree_size": 0, "tokens": 0}))
          break
        update = await generation.next_update()
      yield "data: [DONE]\n\n"
    finally:
      await generation.cancel()

  @app.get("/v1/models")
  async def models(request: fastapi.Request):
    check_key(request)
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "specedge"}]}

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "stats": dict(backend.stats())}

  @app.get("/metrics")
  async def metrics_endpoint():
    if metrics is None:
      raise APIError(404, "no metrics on this server", code="not_found")
    import prometheus_client  # pylint: disable=g-import-not-at-top (only with metrics)
    return fastapi.Response(prometheus_client.generate_latest(metrics.registry),
                            media_type=prometheus_client.CONTENT_TYPE_LATEST)

  @app.get("/", response_class=responses.HTMLResponse)
  async def page():
    return responses.HTMLResponse(chat_page)

  return app


def _refuse_constant(name: str):
  raise ValueError(f"{name} is not valid JSON")


# ------------------------------------------------------------------------------------------------
# Serving inside the caller's event loop.


class _Server(uvicorn.Server):
  """uvicorn's server without its signal handling: the process that embeds it (the drafter)
  owns SIGINT/SIGTERM and calls `HttpServer.shutdown()`. (uvicorn's `capture_signals` replaces
  the process's handlers while it serves and re-raises the signals it caught when it stops.)"""

  @contextlib.contextmanager
  def capture_signals(self):
    yield


@dataclasses.dataclass
class HttpServer:
  """A running `serve()`: its address and its shutdown."""

  host: str
  port: int
  _server: uvicorn.Server
  _task: asyncio.Task

  @property
  def url(self) -> str:
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}"

  async def shutdown(self, timeout_s: float = 10.0) -> None:
    """Stops accepting, lets open responses end (uvicorn cancels them after its graceful
    timeout, which cancels their requests on the backend), then returns."""
    self._server.should_exit = True
    try:
      await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
    except TimeoutError:
      self._server.force_exit = True
      await self._task


async def serve(app: fastapi.FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                port_file: str | os.PathLike | None = None,
                ready: Callable[[int], None] | None = None, log_level: str = "warning",
                graceful_s: int = 5) -> HttpServer:
  """Starts uvicorn on `host:port` (0: a free port) in the running loop and returns once it
  accepts connections. `port_file`: the bound port is written there (atomically); `ready`: called
  with the bound port.

  The socket is bound here, not by uvicorn, so a taken port raises OSError to the caller (uvicorn
  would log it and `sys.exit`, and a SystemExit raised in a task stops the whole event loop) and
  the port is known before serving starts.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
  except BaseException:
    sock.close()
    raise
  bound = sock.getsockname()[1]
  config = uvicorn.Config(app, host=host, port=bound, log_level=log_level, lifespan="off",
                          timeout_graceful_shutdown=graceful_s, access_log=False)
  server = _Server(config)

  async def run() -> None:
    try:
      await server.serve(sockets=[sock])
    except SystemExit as e:  # uvicorn's way to fail a startup; keep it from ending the loop
      raise RuntimeError(f"the HTTP server on {host}:{bound} failed to start") from e
    finally:
      sock.close()

  task = asyncio.get_running_loop().create_task(run(), name=f"http-{bound}")
  while not server.started:
    if task.done():
      task.result()  # raises what stopped it
      raise RuntimeError(f"the HTTP server on {host}:{bound} stopped before it started")
    await asyncio.sleep(0.005)
  if port_file is not None:
    tmp = f"{os.fspath(port_file)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(f"{bound}\n")
    os.replace(tmp, port_file)
  if ready is not None:
    ready(bound)
  return HttpServer(host=host, port=bound, _server=server, _task=task)


__all__ = ["DEFAULT_MAX_TOKENS", "APIError", "ChatBody", "CompletionBody", "EdgeBackend",
           "HttpServer", "UpdateStream", "create_app", "serve"]
