"""The edge's OpenAI-compatible HTTP API (serving/http_api.py) over a real uvicorn server.

A fake backend stands in for the drafter (scripted RoundUpdates, a capacity that raises
QueueFull, a cancellation flag); the client is the official `openai` package, and the standard
library's http.client / socket for malformed bodies and for clients that hang up. The tokenizer
is the embedded target's, so detokenization and the chat template are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable

import openai
import pytest
from prometheus_client import CollectorRegistry, Counter

from specedge_jax.api import SamplingParams
from specedge_jax.data import assets
from specedge_jax.data.tokenizers import load_tokenizer
from specedge_jax.serving import http_api
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest, QueueFull
from specedge_jax.serving.drafter import RoundUpdate
from specedge_jax.testing import fakes
from specedge_jax.testing.servers import running_verifier

MODEL = "specedge-embedded"
KEY = "sk-test-0123456789"
# Multi-byte characters whose byte tokens the round boundaries below split ('é', '☃', '日本').
ANSWER = ("Speculative decoding drafts a tree of tokens, the server verifies it. "
          "Café ☃ 日本, done.")
# Where rounds end, in tokens of ANSWER: 29 and 33 fall inside '☃' and '日' (their decoded text
# ends in U+FFFD), 20 between 'server' and ' verifies'.
ROUND_ENDS = (1, 4, 8, 10, 14, 17, 20, 24, 29, 33, 36)
TREE_SIZE = 8


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(assets.DEFAULT_TARGET_DIR)


def scripted_rounds(ids: list[int], ends=ROUND_ENDS, *, eos: int | None,
                    max_new_tokens: int | None = None) -> list[RoundUpdate]:
  """The updates of a request that emits `ids` (then `eos`, if given), one round per slice:
  round 0 the first token, then each verification round accepting all but its bonus token. Cut at
  max_new_tokens as the drafter does (finish 'length')."""
  tokens = list(ids) + ([eos] if eos is not None else [])
  if max_new_tokens is not None and len(tokens) > max_new_tokens:
    tokens = tokens[:max_new_tokens]
    reason = "length"
  else:
    reason = "eos" if eos is not None else "length"
  bounds = [0] + [e for e in ends if e < len(tokens)] + [len(tokens)]
  updates = []
  for r, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
    last = hi == len(tokens)
    updates.append(RoundUpdate(tokens=tuple(tokens[lo:hi]), round=r,
                               accepted=0 if r == 0 else hi - lo - 1,
                               tree_size=0 if r == 0 else TREE_SIZE, finished=last,
                               finish_reason=reason if last else ""))
  return updates


class FakeStream:
  """A RequestStream that plays scripted updates, `delay_s` apart."""

  def __init__(self, backend: FakeBackend, updates: list[RoundUpdate], delay_s: float):
    self._backend = backend
    self._updates = list(updates)
    self._delay_s = delay_s
    self._next = 0
    self._stopping = False
    self.cancelled = threading.Event()  # set once cancel() is done; the test thread waits on it
    self.served = 0

  def __aiter__(self):
    return self

  async def __anext__(self) -> RoundUpdate:
    if self._stopping or self._next >= len(self._updates):
      raise StopAsyncIteration
    if self._delay_s:
      await asyncio.sleep(self._delay_s)
    update = self._updates[self._next]
    self._next += 1
    self.served += 1
    if update.finished:
      self._backend.active.discard(self)
    return update

  async def cancel(self) -> None:
    self._stopping = True
    self._backend.active.discard(self)
    # A clean-up that awaits, as the drafter's frees slots: a cancel that the HTTP layer lets be
    # cut short (an await in a cancelled anyio scope raises at once) never gets past this.
    await asyncio.sleep(0.02)
    self.cancelled.set()


@dataclasses.dataclass
class Script:
  updates: Callable[[EdgeRequest], list[RoundUpdate]]
  delay_s: float = 0.0


class FakeBackend:
  """The drafter's submit/stats semantics: at most `capacity` requests at once, else QueueFull."""

  def __init__(self, default: Script):
    self.default = default
    self.script = default
    self.capacity = 8
    self.submitted: list[EdgeRequest] = []
    self.streams: list[FakeStream] = []
    self.active: set[FakeStream] = set()

  def reset(self) -> None:
    self.script, self.capacity = self.default, 8

  def submit(self, request: EdgeRequest) -> FakeStream:
    if len(self.active) >= self.capacity:
      raise QueueFull(f"{len(self.active)} requests are running and the queue is full")
    stream = FakeStream(self, self.script.updates(request), self.script.delay_s)
    self.submitted.append(request)
    self.streams.append(stream)
    self.active.add(stream)
    return stream

  def stats(self) -> dict[str, int]:
    return dict(running=len(self.active), queued=0,
                free_slots=max(self.capacity - len(self.active), 0), max_running=self.capacity,
                max_queued=0)


class LoopThread:
  """An event loop in a thread of its own: the HTTP server (and, end to end, the drafter and
  the verifier) live there while the test thread plays the client."""

  def __init__(self):
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                    name="http-api-test")
    self._thread.start()

  def run(self, coro, timeout_s: float = 30):
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

  def close(self) -> None:
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(10)
    self.loop.close()


@contextlib.contextmanager
def serving(app, **serve_kwargs):
  """Runs `http_api.serve(app)` on 127.0.0.1:0 in a loop thread."""
  loop = LoopThread()
  try:
    server = loop.run(http_api.serve(app, "127.0.0.1", 0, **serve_kwargs))
    try:
      yield server
    finally:
      loop.run(server.shutdown(timeout_s=5))
  finally:
    loop.close()


class FakeMetrics:
  def __init__(self):
    self.registry = CollectorRegistry()
    self.requests = Counter("specedge_test_requests", "a counter the test sets",
                            registry=self.registry)


@pytest.fixture(scope="module")
def answer_ids(tokenizer):
  return [int(t) for t in tokenizer(ANSWER, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def backend(tokenizer, answer_ids):
  eos = tokenizer.eos_token_id
  return FakeBackend(Script(lambda request: scripted_rounds(
      answer_ids, eos=eos, max_new_tokens=request.max_new_tokens)))


@pytest.fixture(scope="module")
def metrics():
  return FakeMetrics()


@pytest.fixture(scope="module")
def server(backend, tokenizer, metrics):
  app = http_api.create_app(backend, tokenizer, model_name=MODEL, api_keys=frozenset({KEY}),
                            metrics=metrics)
  with serving(app) as running:
    yield running


@pytest.fixture(autouse=True)
def fresh_backend(backend):
  backend.reset()
  yield
  backend.reset()


@pytest.fixture
def client(server):
  return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=20)


def raw(server, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict, str]:
  """One plain HTTP request: (status, headers, body text)."""
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
  try:
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                   **(headers or {})})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read().decode("utf-8")
  finally:
    conn.close()


def assert_openai_error(status_body: tuple[int, dict, str], status: int, *,
                        code: str | None = None, param: str | None = None) -> dict:
  got_status, _, text = status_body
  assert got_status == status, text
  body = json.loads(text)
  assert set(body) == {"error"}, body
  error = body["error"]
  assert set(error) == {"message", "type", "param", "code"}, error
  assert isinstance(error["message"], str) and error["message"]
  if code is not None:
    assert error["code"] == code, error
  if param is not None:
    assert error["param"] == param, error
  return error


def extra(obj, name):
  """An extension field of an openai response object (the client keeps unknown fields)."""
  return obj.to_dict()[name]


def decoded(tokenizer, ids) -> str:
  return tokenizer.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------
# Text assembly, without a server.


def test_text_assembler_holds_back_incomplete_utf8_and_stop_prefixes(tokenizer, answer_ids):
  assembler = http_api._TextAssembler(tokenizer, stop=())
  deltas = [assembler.push([t], final=False) for t in answer_ids]
  assert all("\ufffd" not in d for d in deltas), deltas
  assert "".join(deltas) == ANSWER
  assert assembler.completion_tokens == len(answer_ids)

  # "Caf" then "é": the suffix "Caf" may start the stop string "Café!", so it waits; the stop
  # never comes, and the final round releases what was held.
  assembler = http_api._TextAssembler(tokenizer, stop=("Café!",))
  n = next(k for k in range(len(answer_ids)) if decoded(tokenizer, answer_ids[:k]).endswith("Caf"))
  first = assembler.push(answer_ids[:n], final=False)
  assert first == decoded(tokenizer, answer_ids[:n])[:-len("Caf")]
  rest = assembler.push(answer_ids[n:], final=True)
  assert first + rest == ANSWER and not assembler.stopped


# ------------------------------------------------------------------------------------------------
# Completions and chat completions.


def test_completion_non_streaming(client, backend, tokenizer, answer_ids):
  response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=100)
  assert response.object == "text_completion" and response.model == MODEL
  choice = response.choices[0]
  assert choice.text == ANSWER
  assert choice.finish_reason == "stop"  # the backend's 'eos'
  prompt_ids = tuple(tokenizer("Once upon a time", add_special_tokens=True)["input_ids"])
  request = backend.submitted[-1]
  assert request.prompt_ids == prompt_ids and request.max_new_tokens == 100
  assert request.sampling is None and request.seed is None  # the drafter's defaults
  assert request.request_id.startswith("http-") and len(request.request_id) <= 64
  usage = response.usage
  assert usage.prompt_tokens == len(prompt_ids)
  assert usage.completion_tokens == len(answer_ids) + 1  # the EOS token counts
  assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
  rounds = scripted_rounds(answer_ids, eos=tokenizer.eos_token_id)
  spec = extra(response, "usage")["specedge"]
  assert spec["rounds"] == len(rounds) - 1
  assert spec["accepted_tokens"] == sum(u.accepted for u in rounds)
  assert spec["draft_tokens"] == TREE_SIZE * (len(rounds) - 1)
  assert spec["accepted_per_round"] == pytest.approx(spec["accepted_tokens"] / spec["rounds"])
  assert not backend.streams[-1].cancelled.is_set()  # finished on its own: nothing to cancel


def test_completion_streaming_one_chunk_per_round(client, backend, tokenizer, answer_ids):
  rounds = scripted_rounds(answer_ids, eos=tokenizer.eos_token_id)
  chunks = list(client.completions.create(model=MODEL, prompt=["Once upon a time"],
                                          max_tokens=100, stream=True,
                                          stream_options={"include_usage": True}))
  content, usage_chunk = chunks[:-1], chunks[-1]
  assert len(content) == len(rounds)  # per verification round, not per token
  texts = [c.choices[0].text for c in content]
  assert all("\ufffd" not in t for t in texts), texts  # split characters are held back
  assert "".join(texts) == ANSWER
  assert [c.choices[0].finish_reason for c in content] == [None] * (len(rounds) - 1) + ["stop"]
  for chunk, update in zip(content, rounds):
    assert chunk.object == "text_completion" and chunk.model == MODEL
    assert extra(chunk, "specedge") == {"round": update.round, "accepted_tokens": update.accepted,
                                        "tree_size": update.tree_size,
                                        "tokens": len(update.tokens)}
  assert usage_chunk.choices == []
  assert usage_chunk.usage.completion_tokens == len(answer_ids) + 1
  assert len({c.id for c in chunks}) == 1
  # The same request without streaming gives the same text.
  whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=100)
  assert whole.choices[0].text == "".join(texts)


def test_chat_completion_streaming_and_not(client, backend, tokenizer, answer_ids):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is speculative decoding?"}]
  whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.7,
                                         top_p=0.9, seed=5, max_completion_tokens=120)
  assert whole.object == "chat.completion"
  assert whole.choices[0].message.role == "assistant"
  assert whole.choices[0].message.content == ANSWER
  assert whole.choices[0].finish_reason == "stop"
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  prompt_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
  request = backend.submitted[-1]
  assert request.prompt_ids == prompt_ids
  assert request.sampling == SamplingParams(temperature=0.7, top_p=0.9)
  assert request.seed == 5 and request.max_new_tokens == 120
  assert whole.usage.prompt_tokens == len(prompt_ids)

  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                               stream=True))
  assert backend.submitted[-1].sampling == SamplingParams(temperature=0.0)
  assert len(chunks) == len(scripted_rounds(answer_ids, eos=tokenizer.eos_token_id))
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert all(c.choices[0].delta.role is None for c in chunks[1:])
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
  assert chunks[-1].choices[0].finish_reason == "stop"
  assert [extra(c, "specedge")["round"] for c in chunks] == list(range(len(chunks)))


def test_max_tokens_gives_length(client, backend, tokenizer, answer_ids):
  response = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5)
  assert response.choices[0].finish_reason == "length"
  assert response.choices[0].text == decoded(tokenizer, answer_ids[:5])
  assert response.usage.completion_tokens == 5
  assert backend.submitted[-1].max_new_tokens == 5


def test_a_backend_that_overshoots_max_tokens_is_cut_and_cancelled(client, backend, tokenizer,
                                                                   answer_ids):
  backend.script = Script(lambda request: scripted_rounds(answer_ids, eos=None))  # ignores it
  chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == decoded(tokenizer, answer_ids[:6])
  assert chunks[-1].choices[0].finish_reason == "length"
  assert backend.streams[-1].cancelled.wait(5)


def _stop_across_rounds(tokenizer, answer_ids) -> tuple[str, int, int]:
  """A stop string that starts two characters before the end of round `k`'s text and ends two
  into round k + 1's; returns (stop, its offset in ANSWER, k)."""
  k = ROUND_ENDS.index(20)
  boundary = len(decoded(tokenizer, answer_ids[:20]))
  stop = ANSWER[boundary - 2:boundary + 2]
  assert ANSWER.find(stop) == boundary - 2 and stop.isascii()
  return stop, boundary - 2, k


def test_stop_string_spanning_two_rounds(client, backend, tokenizer, answer_ids):
  stop, at, k = _stop_across_rounds(tokenizer, answer_ids)
  chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=100,
                                          stop=[stop, "never-there"], stream=True,
                                          stream_options={"include_usage": True}))
  content, usage_chunk = chunks[:-1], chunks[-1]
  texts = [c.choices[0].text for c in content]
  assert "".join(texts) == ANSWER[:at]
  # Round k ends with the stop string's first two characters: they are held back, not sent.
  assert "".join(texts[:k + 1]) == ANSWER[:at]
  assert len(content) == k + 2  # the round that completes the stop string is the last
  assert content[-1].choices[0].finish_reason == "stop"
  assert backend.streams[-1].cancelled.wait(5)  # the rest of the request is not generated
  # completion_tokens: up to the token that completes the stop string.
  through = next(n for n in range(1, len(answer_ids) + 1)
                 if stop in decoded(tokenizer, answer_ids[:n]))
  assert usage_chunk.usage.completion_tokens == through

  whole = client.completions.create(model=MODEL, prompt="Hi", max_tokens=100, stop=stop)
  assert whole.choices[0].text == ANSWER[:at]
  assert whole.choices[0].finish_reason == "stop"
  assert whole.usage.completion_tokens == through
  assert backend.streams[-1].cancelled.wait(5)


def test_stop_prefix_that_does_not_complete_is_released(client, backend, tokenizer, answer_ids):
  stop, at, k = _stop_across_rounds(tokenizer, answer_ids)
  held = stop[:2] + "#never#"  # its first two characters end round k, the rest never comes
  chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=100, stop=held,
                                          stream=True))
  texts = [c.choices[0].text for c in chunks]
  assert "".join(texts[:k + 1]) == ANSWER[:at]  # held back at the end of round k ...
  assert "".join(texts[:k + 2]).startswith(ANSWER[:at + 2])  # ... and sent with round k + 1
  assert "".join(texts) == ANSWER
  assert chunks[-1].choices[0].finish_reason == "stop"
  assert not backend.streams[-1].cancelled.is_set()


# ------------------------------------------------------------------------------------------------
# Errors: OpenAI's shape, statuses, and the openai client's exception classes.


def test_unknown_model_is_404(client, server):
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="gpt-9", prompt="Hi")
  assert e.value.status_code == 404 and e.value.code == "model_not_found"
  body = json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]}).encode()
  assert_openai_error(raw(server, "POST", "/v1/chat/completions", body,
                          {"Content-Type": "application/json"}), 404, code="model_not_found",
                      param="model")


@pytest.mark.parametrize("params, param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=2), "n"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(prompt=[1, 2, 3]), "prompt"),
    (dict(prompt=["one", "two"]), "prompt"),
])
def test_bad_parameters_are_400(client, server, params, param):
  kwargs = {"model": MODEL, "prompt": "Hi", **params}
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(**kwargs)
  assert e.value.status_code == 400
  error = assert_openai_error(raw(server, "POST", "/v1/completions", json.dumps(kwargs).encode(),
                                  {"Content-Type": "application/json"}), 400, param=param)
  assert error["type"] == "invalid_request_error"


def test_n_greater_than_one_is_refused_clearly(client):
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model=MODEL, n=2,
                                   messages=[{"role": "user", "content": "Hi"}])
  assert "n=1" in e.value.message


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": "x", "prompt": NaN}', b""])
def test_malformed_bodies_are_400(server, backend, body):
  submitted = len(backend.submitted)
  error = assert_openai_error(raw(server, "POST", "/v1/completions", body,
                                  {"Content-Type": "application/json"}), 400)
  assert error["type"] == "invalid_request_error"
  assert len(backend.submitted) == submitted


def test_missing_fields_are_400_not_422(server):
  body = json.dumps({"model": MODEL}).encode()
  assert_openai_error(raw(server, "POST", "/v1/chat/completions", body,
                          {"Content-Type": "application/json"}), 400, param="messages")


def test_api_key_required(server, backend):
  submitted = len(backend.submitted)
  wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0,
                        timeout=20)
  with pytest.raises(openai.AuthenticationError) as e:
    wrong.completions.create(model=MODEL, prompt="Hi")
  assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
  # (The openai client refuses to send no key at all, so the missing key goes by hand.)
  body = json.dumps({"model": MODEL, "prompt": "Hi"}).encode()
  for path, headers in (("/v1/models", {}), ("/v1/completions", {"Authorization": "Bearer "}),
                        ("/v1/completions", {"Authorization": f"Basic {KEY}"})):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    conn.request("POST" if path.endswith("completions") else "GET", path, body=body,
                 headers={"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    assert response.getheader("WWW-Authenticate") == "Bearer"
    assert_openai_error((response.status, {}, response.read().decode()), 401,
                        code="invalid_api_key")
    conn.close()
  assert len(backend.submitted) == submitted


def test_queue_full_is_429(client, backend):
  backend.capacity = 0
  with pytest.raises(openai.RateLimitError) as e:
    client.completions.create(model=MODEL, prompt="Hi")
  assert e.value.status_code == 429 and e.value.code == "queue_full"


def _failing(code: str, message: str = "the verifier went away") -> Script:
  return Script(lambda request: [RoundUpdate(tokens=(), round=0, finished=True,
                                             finish_reason="error", error=message,
                                             error_code=code)])


@pytest.mark.parametrize("code, status, exc", [
    ("UNAVAILABLE", 503, openai.InternalServerError),
    ("DEADLINE_EXCEEDED", 503, openai.InternalServerError),
    ("INVALID_ARGUMENT", 400, openai.BadRequestError),
    ("OUT_OF_RANGE", 400, openai.BadRequestError),
    ("INTERNAL", 500, openai.InternalServerError),
])
@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_the_first_token_is_an_http_status(client, backend, code, status, exc,
                                                          stream):
  backend.script = _failing(code)
  with pytest.raises(exc) as e:
    result = client.completions.create(model=MODEL, prompt="Hi", stream=stream)
    if stream:
      list(result)
  assert e.value.status_code == status


def test_failure_after_the_first_token_ends_the_stream_with_an_error(client, backend, tokenizer,
                                                                    answer_ids):
  def script(request):
    rounds = scripted_rounds(answer_ids, eos=tokenizer.eos_token_id)[:3]
    return rounds + [RoundUpdate(tokens=(), round=3, finished=True, finish_reason="error",
                                 error="the verifier went away", error_code="UNAVAILABLE")]
  backend.script = Script(script)
  received = []
  with pytest.raises(openai.APIError) as e:
    for chunk in client.completions.create(model=MODEL, prompt="Hi", stream=True):
      received.append(chunk.choices[0].text)
  assert len(received) == 3 and "verifier" in str(e.value)
  with pytest.raises(openai.InternalServerError) as e2:  # not streamed: a status, at any point
    client.completions.create(model=MODEL, prompt="Hi")
  assert e2.value.status_code == 503


# ------------------------------------------------------------------------------------------------
# Clients that go away.


def _slow_script(answer_ids) -> Script:
  # Hundreds of rounds 50 ms apart: the request is still running when the client leaves.
  return Script(lambda request: scripted_rounds(answer_ids * 20, ends=range(1, 800, 2), eos=None),
                delay_s=0.05)


def _send_raw_key(port: int, key: str | None, path: str, payload: dict) -> socket.socket:
  """A POST sent by hand on a socket the test can close whenever it likes."""
  body = json.dumps(payload).encode()
  sock = socket.create_connection(("127.0.0.1", port), timeout=20)
  auth = f"Authorization: Bearer {key}\r\n" if key else ""
  sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
               + body)
  return sock


def _send_raw(port: int, path: str, payload: dict) -> socket.socket:
  return _send_raw_key(port, KEY, path, payload)


def test_client_disconnect_mid_stream_cancels_the_request(server, backend, answer_ids):
  backend.script = _slow_script(answer_ids)
  sock = _send_raw(server.port, "/v1/completions",
                   {"model": MODEL, "prompt": "Hi", "max_tokens": 2000, "stream": True})
  received = b""
  while received.count(b"data: ") < 3:  # a few rounds have arrived
    data = sock.recv(65536)
    assert data, "the server closed the stream"
    received += data
  assert b" 200 " in received.split(b"\r\n", 1)[0]
  stream = backend.streams[-1]
  assert not stream.cancelled.is_set()
  sock.close()
  assert stream.cancelled.wait(5), "the backend request was not cancelled after the disconnect"
  served = stream.served
  time.sleep(0.3)
  assert stream.served == served  # nothing more is asked of the backend


def test_client_disconnect_while_waiting_for_a_whole_reply_cancels_it(server, backend,
                                                                     answer_ids):
  backend.script = _slow_script(answer_ids)
  before = len(backend.streams)
  sock = _send_raw(server.port, "/v1/chat/completions",
                   {"model": MODEL, "max_tokens": 2000,
                    "messages": [{"role": "user", "content": "Hi"}]})
  deadline = time.monotonic() + 10
  while len(backend.streams) == before or backend.streams[-1].served < 2:
    assert time.monotonic() < deadline, "the request never reached the backend"
    time.sleep(0.02)
  stream = backend.streams[-1]
  sock.close()
  assert stream.cancelled.wait(5), "the backend request was not cancelled after the disconnect"


# ------------------------------------------------------------------------------------------------
# The other endpoints, and serve().


def test_models_health_page_and_metrics(client, server, metrics):
  models = client.models.list()
  assert [m.id for m in models.data] == [MODEL]
  status, _, text = raw(server, "GET", "/health")
  assert status == 200
  health = json.loads(text)
  assert health["status"] == "ok" and set(health["stats"]) == {
      "running", "queued", "free_slots", "max_running", "max_queued"}
  status, headers, text = raw(server, "GET", "/", headers={"Authorization": ""})
  assert status == 200 and headers["content-type"].startswith("text/html")
  for element in ('id="prompt"', 'id="send"', 'id="stats"', 'id="tokens-per-s"',
                  'id="accepted-per-round"', 'id="itl-ms"'):
    assert element in text
  assert "http://" not in text and "https://" not in text  # nothing loaded from elsewhere
  metrics.requests.inc(3)
  status, headers, text = raw(server, "GET", "/metrics")
  assert status == 200 and headers["content-type"].startswith("text/plain")
  assert "specedge_test_requests_total 3.0" in text
  assert_openai_error(raw(server, "GET", "/v1/nowhere"), 404)


def test_serve_reports_its_port_and_no_metrics_is_404(backend, tokenizer, tmp_path):
  app = http_api.create_app(backend, tokenizer, model_name=MODEL)
  ports = []
  port_file = tmp_path / "port"
  with serving(app, port_file=port_file, ready=ports.append) as running:
    assert ports == [running.port] and port_file.read_text().strip() == str(running.port)
    assert_openai_error(raw(running, "GET", "/metrics"), 404)
    # No keys configured: no authentication.
    open_client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="anything",
                                max_retries=0, timeout=20)
    assert open_client.completions.create(model=MODEL, prompt="Hi").choices[0].text == ANSWER
  with pytest.raises(OSError):  # the port is free again, and a taken one is refused
    with socket.socket() as taken:
      taken.bind(("127.0.0.1", 0))
      taken.listen()
      asyncio.run(http_api.serve(app, "127.0.0.1", taken.getsockname()[1]))


# ------------------------------------------------------------------------------------------------
# End to end: the real Drafter over gRPC to a verifier, both on fake engines.

VOCAB = 4096  # the embedded tokenizer's, so that the fakes' tokens decode


@contextlib.contextmanager
def edge_stack(tokenizer, *, forward_delay_s: float = 0.0):
  """(HTTP server, drafter, fake target engine): verifier + Drafter + HTTP API in one loop."""
  target = fakes.FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_len=2048,
                                  forward_delay_s=forward_delay_s)
  draft = fakes.FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2)
  loop = LoopThread()
  stack = contextlib.AsyncExitStack()

  async def start():
    _, channel, _ = await stack.enter_async_context(running_verifier(target))
    drafter = Drafter(draft, channel, DrafterConfig(client_id="edge-http", max_new_tokens=64))
    await drafter.start()
    stack.push_async_callback(drafter.stop)
    app = http_api.create_app(drafter, tokenizer, model_name=MODEL)
    server = await http_api.serve(app, "127.0.0.1", 0)
    stack.push_async_callback(server.shutdown, 5)
    return server, drafter

  try:
    server, drafter = loop.run(start())
    try:
      yield server, drafter, target
    finally:
      loop.run(stack.aclose())
  finally:
    loop.close()


def _wait_until(condition, timeout_s: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(0.02)
  return condition()


def test_end_to_end_with_the_real_drafter(tokenizer):
  prompt = "The edge drafts, the server verifies."
  prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  expected_ids = fakes.expected_output(prompt_ids, 40, VOCAB)
  expected = decoded(tokenizer, expected_ids)
  with edge_stack(tokenizer) as (server, drafter, target):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                           timeout=30)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 40
    spec = extra(whole, "usage")["specedge"]
    assert spec["rounds"] >= 1 and spec["accepted_tokens"] >= spec["rounds"]  # depth 2 drafts

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected
    assert len(chunks) - 1 == extra(chunks[-1], "usage")["specedge"]["rounds"] + 1

    # A stop string ends the request early: its slots come back on the edge and the server.
    stop = expected[len(expected) // 3:len(expected) // 3 + 3]
    cut = expected.find(stop)
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=stop)
    assert stopped.choices[0].text == expected[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    assert _wait_until(lambda: drafter.stats()["running"] == 0 and target.num_free_slots == 2)


def test_end_to_end_disconnect_frees_the_server_session(tokenizer):
  with edge_stack(tokenizer, forward_delay_s=0.02) as (server, drafter, target):
    sock = _send_raw_key(server.port, None, "/v1/completions",
                         {"model": MODEL, "prompt": "Hello there", "max_tokens": 1500,
                          "stream": True})
    received = b""
    while received.count(b"data: ") < 3:
      data = sock.recv(65536)
      assert data, "the server closed the stream"
      received += data
    assert target.num_free_slots == 1 and drafter.stats()["running"] == 1
    sock.close()
    assert _wait_until(lambda: drafter.stats()["running"] == 0 and target.num_free_slots == 2), (
        drafter.stats(), target.num_free_slots)
