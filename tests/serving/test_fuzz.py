"""The verifier under fuzzed, malformed and adversarial requests while two good clients are served.

One scenario, one real grpc.aio verifier on a free 127.0.0.1 port in front of the hand-checkable
fake target (specedge_jax.testing.fakes). On the event loop: the server and two well-behaved
edges (the real `Drafter` with `FakeDraftEngine`, K=2 each) that keep serving requests until the
fuzzing is over. In a worker thread: hypothesis, which generates requests and sends each one
through the loop, one at a time, on a channel of its own:

  fuzz_capacity  concurrent opens beyond the free slots: the ones beyond get RESOURCE_EXHAUSTED,
                 and malformed opens sent while the server is full still get INVALID_ARGUMENT;
  fuzz_fields    one hypothesis run per case (`CASES`, ~60, 25 examples each): one malformed
                 field per request (a valid request with one targeted mutation), several at once,
                 fully random requests, wrong or retried Verify steps, one tree sent twice at
                 once, raw undecodable bytes and invalid UTF-8 through a raw (bytes-in, bytes-out)
                 channel method, corrupted serializations, CloseSession twice, opens abandoned at
                 once and retried, and a few valid controls;
  fuzz_oversized messages above the server's receive limit, on every RPC.

Every response is checked against an explicit oracle (`expect_open`, `expect_verify`,
`expect_close`, `expect_raw`): a model of the server's sessions (the fuzzer's own: one live, one
finished, closed ids) and the protocol's rules give the set of right status codes. A request
with one fault has exactly one right code; one with several faults of different kinds (say an
unknown session and a malformed tree) may get the code of any of them, since gRPC ranks none.
UNKNOWN and INTERNAL are never right. At the end: the good clients' every output equals the
target-only greedy chain (`expected_output`), none of their requests had to resume, the health
service says SERVING, and no session or slot leaked.

Set SPECEDGE_FUZZ_RANDOM=1 to draw fresh examples (the default is derandomized, like the other
hypothesis tests here, so a failure reproduces).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from google.protobuf import message as protobuf_message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from specedge_jax import api
from specedge_jax.measure.events import EventLog
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.proto import specedge_pb2_grpc
from specedge_jax.serving.servicer import (
  MAX_LABEL_CHARS,
  MAX_SESSION_ID_CHARS,
  PROMPT_TEXT_BYTES_PER_ROW,
)
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verifier import VerifierServer
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output, successor

VOCAB = 50
NUM_SLOTS = 10
MAX_LEN = 128
MAX_TREE = 8  # nodes, root included
RECEIVE_LIMIT = 16 << 20  # the verifier's grpc.max_receive_message_length

GOOD_CLIENTS, GOOD_K, GOOD_MAX_NEW = 2, 2, 90
GOOD_MAX_SESSIONS = GOOD_CLIENTS * GOOD_K  # sessions (open or opening) the good clients can hold
MAX_GOOD_BATCHES = 400  # per good client: a bound, never reached while the fuzzing lasts
FUZZER_HELD = 2  # the fuzzer's own sessions between examples: the live one and the finished one
LIVE_MAX_NEW = MAX_LEN - MAX_TREE - 1  # the live session's budget (prompt of one token)

EXAMPLES_PER_CASE = 25  # hypothesis examples per case of fuzz_fields
EXAMPLES_PER_CATEGORY = {"open_valid": 10, "verify_valid": 15, "close_twice": 15,
                         "raw_random_bytes": 40, "raw_corrupted": 40}
CAPACITY_EXAMPLES = 5
OVERSIZED_EXAMPLES = 2
MIN_BAD_REQUESTS = 1000
RPC_TIMEOUT_S = 10.0  # a request that hangs comes back DEADLINE_EXCEEDED: a wrong status
SCENARIO_TIMEOUT_S = 55.0

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

RPCS = ("OpenSession", "Verify", "CloseSession")
REQUEST_TYPES = {"OpenSession": pb.OpenSessionRequest, "Verify": pb.VerifyRequest,
                 "CloseSession": pb.CloseSessionRequest}
RESPONSE_TYPES = {"OpenSession": pb.OpenSessionResponse, "Verify": pb.VerifyResponse,
                  "CloseSession": pb.CloseSessionResponse}
# The fields the oracle models. A raw message that decodes to a field added later (with rules
# this file does not know) is assumed away rather than judged.
MODELED_FIELDS = {
    "OpenSession": {"prompt_text", "prompt_token_ids", "sampling", "seed", "max_new_tokens",
                    "client_id", "request_id", "resume_tokens", "resume_rounds"},
    "Verify": {"session_id", "root_token", "tokens", "parents", "step"},
    "CloseSession": {"session_id"},
}

I32_MIN, I32_MAX = -2**31, 2**31 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1


class FuzzTokenizer:
  """The server's tokenizer: one token per non-space character (so blank text is no prompt)."""

  def encode(self, text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text if not c.isspace()]


# ------------------------------------------------------------------------------------------------
# The model of the fuzzer's sessions, and the oracle


@dataclasses.dataclass
class SessionModel:
  session_id: str
  last_token: int  # the root the next tree must carry
  generated: int
  max_new_tokens: int
  finished: bool
  steps: int = 0  # verify rounds applied (a resumed session starts at its resume_rounds)
  last_root: int = -1  # the root of the last applied round,
  last_answer: tuple | None = None  # and its (accepted, bonus, emitted, finished)


@dataclasses.dataclass
class Model:
  """The server's sessions as far as the fuzzer knows them (it never sees the good clients')."""

  sessions: dict[str, SessionModel] = dataclasses.field(default_factory=dict)
  closed: list[str] = dataclasses.field(default_factory=list)
  live: str = ""  # a session that is open and not finished
  done: str = ""  # a session that is open and finished


@dataclasses.dataclass(frozen=True)
class Expectation:
  codes: frozenset  # the right status codes
  faults: tuple[str, ...]  # what is wrong with the request (empty: nothing)
  replay: bool = False  # a Verify retrying the last applied step: OK is its stored answer

  @property
  def bad(self) -> bool:
    return OK not in self.codes


def _judge(faults: list[tuple[grpc.StatusCode, str]]) -> Expectation:
  if not faults:
    return Expectation(frozenset({OK}), ())
  return Expectation(frozenset(code for code, _ in faults), tuple(why for _, why in faults))


def _f32(x: float, up: bool) -> float:
  """The float32 nearest x on the side asked (x itself when representable)."""
  v = np.float32(x)
  if up and float(v) < x:
    v = np.nextafter(v, np.float32(np.inf))
  if not up and float(v) >= x:
    v = np.nextafter(v, np.float32(-np.inf))
  return float(v)


def sampling_faults(request: pb.OpenSessionRequest) -> list[tuple[grpc.StatusCode, str]]:
  """The protocol's sampling rules, on the values as they arrive (proto floats are float32):
  temperature 0 (greedy) or finite and >= api.MIN_TEMPERATURE; top_p unset (1) or in
  [api.MIN_TOP_P, 1] (no subnormals); top_k >= 0 (0: off)."""
  if not request.HasField("sampling"):
    return []
  sampling, faults = request.sampling, []
  t = sampling.temperature
  if not (t == 0.0 or api.MIN_TEMPERATURE <= t < math.inf):
    faults.append((INVALID, f"temperature {t}"))
  if sampling.HasField("top_p") and not api.MIN_TOP_P <= sampling.top_p <= 1.0:
    faults.append((INVALID, f"top_p {sampling.top_p}"))
  if sampling.top_k < 0:
    faults.append((INVALID, f"top_k {sampling.top_k}"))
  return faults


def resume_faults(request: pb.OpenSessionRequest) -> list[tuple[grpc.StatusCode, str]]:
  """Resuming a request: resume_tokens (the tokens it emitted, 1 to max_new_tokens - 1 of them,
  in the vocabulary) and resume_rounds (in [0, len(resume_tokens))); no rounds without tokens."""
  tokens, rounds = list(request.resume_tokens), request.resume_rounds
  if not tokens:
    return [(INVALID, f"resume_rounds {rounds} without resume_tokens")] if rounds else []
  faults = []
  if len(tokens) >= request.max_new_tokens:
    why = f"{len(tokens)} resume_tokens, max_new_tokens {request.max_new_tokens}"
    faults.append((INVALID, why))
  if any(not 0 <= t < VOCAB for t in tokens):
    faults.append((INVALID, "resume_tokens outside the vocabulary"))
  if not 0 <= rounds < len(tokens):
    faults.append((INVALID, f"resume_rounds {rounds} for {len(tokens)} resume_tokens"))
  return faults


def prompt_of(request: pb.OpenSessionRequest) -> list[int]:
  """The prompt's token ids as the server sees them (of a request the oracle found valid)."""
  if request.prompt_text:
    return FuzzTokenizer().encode(request.prompt_text)
  return list(request.prompt_token_ids)


def expect_open(request: pb.OpenSessionRequest) -> Expectation:
  """Every malformed field is INVALID_ARGUMENT; a valid open succeeds (between examples the
  fuzzer holds FUZZER_HELD slots and the good clients at most GOOD_MAX_SESSIONS, so a slot is
  free)."""
  faults: list[tuple[grpc.StatusCode, str]] = []
  for name in ("client_id", "request_id"):
    if len(getattr(request, name)) > MAX_LABEL_CHARS:
      faults.append((INVALID, f"{name} of {len(getattr(request, name))} characters"))
  text, ids = request.prompt_text, list(request.prompt_token_ids)
  prompt_len = None
  if bool(text) == bool(ids):
    faults.append((INVALID, "both prompt_text and prompt_token_ids" if text else "no prompt"))
  elif text:
    size = len(text.encode("utf-8"))
    if size > PROMPT_TEXT_BYTES_PER_ROW * MAX_LEN:
      faults.append((INVALID, f"prompt_text of {size} bytes"))
    elif not FuzzTokenizer().encode(text):
      faults.append((INVALID, "prompt_text tokenizes to nothing"))
    else:
      prompt_len = len(FuzzTokenizer().encode(text))
  elif len(ids) > MAX_LEN:
    faults.append((INVALID, f"{len(ids)} prompt ids"))
  elif any(not 0 <= t < VOCAB for t in ids):
    faults.append((INVALID, "prompt ids outside the vocabulary"))
  else:
    prompt_len = len(ids)
  faults += sampling_faults(request)
  if request.seed < 0:
    faults.append((INVALID, f"seed {request.seed}"))
  if request.max_new_tokens < 1:
    faults.append((INVALID, f"max_new_tokens {request.max_new_tokens}"))
  elif (prompt_len or 1) + request.max_new_tokens + MAX_TREE > MAX_LEN:
    faults.append((INVALID, f"max_new_tokens {request.max_new_tokens}: no cache room"))
  faults += resume_faults(request)
  return _judge(faults)


def _session_fault(session_id: str, model: Model):
  """(fault, session): a malformed id is INVALID_ARGUMENT, an id of no open session (never
  opened, or closed) is NOT_FOUND."""
  if not session_id:
    return (INVALID, "empty session_id"), None
  if len(session_id) > MAX_SESSION_ID_CHARS:
    return (INVALID, f"session_id of {len(session_id)} characters"), None
  session = model.sessions.get(session_id)
  if session is None:
    return (NOT_FOUND, "no such session"), None
  return None, session


def tree_faults(tokens: list[int], parents: list[int]) -> list[tuple[grpc.StatusCode, str]]:
  """What makes (tokens, parents) no tree, whatever the session: every one INVALID_ARGUMENT."""
  faults = []
  n = len(tokens)
  if n != len(parents):
    faults.append((INVALID, f"{n} tokens but {len(parents)} parents"))
  if n + 1 > MAX_TREE:
    faults.append((INVALID, f"{n + 1} nodes"))
  if any(not 0 <= t < VOCAB for t in tokens):
    faults.append((INVALID, "tokens outside the vocabulary"))
  if any(not 0 <= p <= i for i, p in enumerate(parents)):  # a cycle or a forward reference
    faults.append((INVALID, "a parent that is not an earlier node"))
  if n == len(parents) and len(set(zip(parents, tokens))) != n:
    faults.append((INVALID, "two siblings with the same token"))
  return faults


def expect_verify(request: pb.VerifyRequest, model: Model) -> Expectation:
  """Session faults (malformed id, unknown or closed session), a finished session
  (FAILED_PRECONDITION), tree faults (INVALID_ARGUMENT), a root outside the vocabulary
  (INVALID_ARGUMENT) or another than the session's last token (FAILED_PRECONDITION: out of
  sync). With `step`: the session's count of applied rounds is the next step; the last applied
  step again, with that round's root, is a retry that gets the stored answer (even for a finished
  session); any other step is FAILED_PRECONDITION."""
  faults = []
  session_fault, session = _session_fault(request.session_id, model)
  tree = tree_faults(list(request.tokens), list(request.parents))
  if session is not None and request.HasField("step"):
    if request.step == session.steps - 1 and session.last_answer is not None:
      if request.root_token == session.last_root:
        # A retry: its stored answer, though a server may also refuse a malformed tree.
        return Expectation(frozenset({OK} | {code for code, _ in tree}),
                           tuple(why for _, why in tree), replay=True)
      faults.append((PRECONDITION, "the last step again, with another root"))
    elif request.step != session.steps:
      faults.append((PRECONDITION, f"step {request.step} of a session at {session.steps}"))
  if session_fault is not None:
    faults.append(session_fault)
  elif session.finished:
    faults.append((PRECONDITION, "session finished"))
  faults += tree
  if not 0 <= request.root_token < VOCAB:
    faults.append((INVALID, f"root_token {request.root_token} outside the vocabulary"))
  elif session is not None and not session.finished and request.root_token != session.last_token:
    faults.append((PRECONDITION, "root_token out of sync"))
  return _judge(faults)


def expect_close(request: pb.CloseSessionRequest, model: Model) -> Expectation:
  session_fault, _ = _session_fault(request.session_id, model)
  return _judge([session_fault] if session_fault else [])


def decode(rpc: str, raw: bytes):
  """The request the server decodes from raw bytes, or None when they do not decode."""
  try:
    return REQUEST_TYPES[rpc].FromString(raw)
  except protobuf_message.DecodeError:
    return None


def expect(rpc: str, request, model: Model) -> Expectation:
  if rpc == "OpenSession":
    return expect_open(request)
  if rpc == "Verify":
    return expect_verify(request, model)
  return expect_close(request, model)


def expect_raw(rpc: str, raw: bytes, model: Model) -> tuple[Expectation, object]:
  """Bytes that do not decode (corrupt wire format, invalid UTF-8 in a string) are
  INVALID_ARGUMENT; bytes that do are judged as the request they decode to."""
  request = decode(rpc, raw)
  if request is None:
    return Expectation(frozenset({INVALID}), ("undecodable",)), None
  return expect(rpc, request, model), request


def fake_round(session: SessionModel, tokens: list[int], parents: list[int]):
  """What the fake target answers a valid tree: (accepted, bonus, emitted, finished)."""
  node_tokens = [session.last_token] + tokens
  node, accepted = 0, []
  while True:
    want = successor(node_tokens[node], VOCAB)
    child = next((i + 1 for i in range(len(tokens)) if parents[i] == node and tokens[i] == want),
                 None)
    if child is None:
      break
    accepted.append(want)
    node = child
  bonus = successor(node_tokens[node], VOCAB)
  emitted = accepted + [bonus]
  remaining = session.max_new_tokens - session.generated
  finished = len(emitted) >= remaining
  return accepted, bonus, emitted[:remaining], finished


# ------------------------------------------------------------------------------------------------
# Strategies

UTF8_CHARS = st.characters(codec="utf-8")  # every code point but the surrogates
vocab_tokens = st.integers(0, VOCAB - 1)
out_of_vocab = st.one_of(st.integers(VOCAB, I32_MAX), st.integers(I32_MIN, -1))
int32s = st.integers(I32_MIN, I32_MAX)
near_vocab = st.integers(-3, VOCAB + 3)  # random ints that are often, not always, valid


def long_text(min_chars: int, max_chars: int) -> st.SearchStrategy[str]:
  """Long strings without drawing every character."""
  return st.builds(lambda head, c, n: head + c * (n - len(head)), st.text(UTF8_CHARS, max_size=3),
                   UTF8_CHARS, st.integers(min_chars, max_chars))


def repeated(values: st.SearchStrategy[int], min_len: int, max_len: int):
  return st.builds(lambda v, n: [v] * n, values, st.integers(min_len, max_len))


F32_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
ABOVE_ONE = _f32(1.0 + 1e-7, up=True)
valid_temperatures = st.one_of(
    st.just(0.0), st.floats(_f32(api.MIN_TEMPERATURE, up=True), 100.0, width=32))
bad_temperatures = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(max_value=-F32_SUBNORMAL, width=32),  # negative, subnormal ones included
    st.floats(F32_SUBNORMAL, _f32(api.MIN_TEMPERATURE, up=False), width=32))  # subnormal, tiny
valid_top_ps = st.floats(api.MIN_TOP_P, 1.0, width=32)
bad_top_ps = st.one_of(
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf]),
    st.floats(max_value=-F32_SUBNORMAL, width=32),
    st.floats(ABOVE_ONE, width=32),
    st.floats(F32_SUBNORMAL, _f32(api.MIN_TOP_P, up=False), width=32))  # subnormal
labels = st.one_of(st.text(UTF8_CHARS, max_size=12), long_text(MAX_LABEL_CHARS, MAX_LABEL_CHARS))
oversized_labels = long_text(MAX_LABEL_CHARS + 1, 1 << 16)


@st.composite
def valid_sampling(draw) -> dict:
  fields = {"temperature": draw(valid_temperatures), "top_k": draw(st.integers(0, I32_MAX))}
  if draw(st.booleans()):
    fields["top_p"] = draw(valid_top_ps)
  return fields


@st.composite
def valid_open(draw) -> dict:
  """The fields of a valid OpenSessionRequest (sampling as a dict, or absent)."""
  if draw(st.booleans()):
    text = draw(st.sampled_from("abcxyz")) + draw(st.text(UTF8_CHARS, max_size=10))
    prompt = {"prompt_text": text}
    prompt_len = len(FuzzTokenizer().encode(prompt["prompt_text"]))
  else:
    ids = draw(st.lists(vocab_tokens, min_size=1, max_size=MAX_LEN - MAX_TREE - 1))
    prompt, prompt_len = {"prompt_token_ids": ids}, len(ids)
  fields = dict(prompt, seed=draw(st.integers(0, I64_MAX)),
                max_new_tokens=draw(st.integers(1, MAX_LEN - MAX_TREE - prompt_len)),
                client_id=draw(labels), request_id=draw(labels))
  if draw(st.booleans()):
    fields["sampling"] = draw(valid_sampling())
  return fields


def open_request(fields: dict) -> pb.OpenSessionRequest:
  fields = dict(fields)
  if "sampling" in fields:
    fields["sampling"] = pb.SamplingParams(**fields["sampling"])
  return pb.OpenSessionRequest(**fields)


def _without_prompt(fields: dict) -> dict:
  return {k: v for k, v in fields.items() if k not in ("prompt_text", "prompt_token_ids")}


def _insert(draw, values: list, value) -> list:
  i = draw(st.integers(0, len(values)))
  return values[:i] + [value] + values[i:]


def _ids(fields: dict) -> list[int]:
  return list(fields.get("prompt_token_ids") or [1])


def _sampling(fields: dict, **changes) -> dict:
  return dict(fields, sampling=dict(fields.get("sampling") or {}, **changes))


# Each mutation makes one field of a valid open malformed: (draw, fields) -> fields.
OPEN_MUTATIONS: dict[str, Callable] = {
    "prompt_none": lambda draw, f: _without_prompt(f),
    "prompt_both": lambda draw, f: dict(_without_prompt(f), prompt_text=draw(st.text(
        UTF8_CHARS, min_size=1, max_size=8)), prompt_token_ids=draw(st.lists(
            vocab_tokens, min_size=1, max_size=8))),
    "prompt_ids_out_of_vocab": lambda draw, f: dict(_without_prompt(f), prompt_token_ids=_insert(
        draw, _ids(f), draw(st.integers(VOCAB, I32_MAX)))),
    "prompt_ids_negative": lambda draw, f: dict(_without_prompt(f), prompt_token_ids=_insert(
        draw, _ids(f), draw(st.integers(I32_MIN, -1)))),
    "prompt_ids_huge": lambda draw, f: dict(_without_prompt(f), prompt_token_ids=draw(repeated(
        st.one_of(vocab_tokens, int32s), MAX_LEN + 1, 100_000))),
    "prompt_text_huge": lambda draw, f: dict(_without_prompt(f), prompt_text=draw(long_text(
        PROMPT_TEXT_BYTES_PER_ROW * MAX_LEN + 1, 1 << 18))),
    "prompt_text_blank": lambda draw, f: dict(_without_prompt(f), prompt_text=draw(st.text(
        st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2003\u3000"), min_size=1, max_size=40))),
    "prompt_text_too_many_tokens": lambda draw, f: dict(_without_prompt(f), prompt_text=draw(
        st.builds(lambda c, n: c * n, st.sampled_from("ab\u00e9z"),
                  st.integers(MAX_LEN - MAX_TREE, PROMPT_TEXT_BYTES_PER_ROW * MAX_LEN // 2)))),
    "temperature_bad": lambda draw, f: _sampling(f, temperature=draw(bad_temperatures)),
    "top_p_bad": lambda draw, f: _sampling(f, top_p=draw(bad_top_ps)),
    "top_k_negative": lambda draw, f: _sampling(f, top_k=draw(st.integers(I32_MIN, -1))),
    "seed_negative": lambda draw, f: dict(f, seed=draw(st.integers(I64_MIN, -1))),
    "max_new_zero": lambda draw, f: dict(f, max_new_tokens=0),
    "max_new_negative": lambda draw, f: dict(f, max_new_tokens=draw(st.integers(I32_MIN, -1))),
    "max_new_huge": lambda draw, f: dict(f, max_new_tokens=draw(st.integers(
        MAX_LEN - MAX_TREE, I32_MAX))),
    "client_id_oversized": lambda draw, f: dict(f, client_id=draw(oversized_labels)),
    "request_id_oversized": lambda draw, f: dict(f, request_id=draw(oversized_labels)),
    "resume_rounds_without_tokens": lambda draw, f: dict(f, resume_rounds=draw(
        st.integers(I32_MIN, I32_MAX).filter(bool))),
    "resume_tokens_too_many": lambda draw, f: dict(f, resume_tokens=draw(repeated(
        vocab_tokens, max(1, f["max_new_tokens"]), f["max_new_tokens"] + 300))),
    "resume_tokens_out_of_vocab": lambda draw, f: dict(f, resume_tokens=[draw(out_of_vocab)]),
    "resume_rounds_out_of_range": lambda draw, f: dict(
        f, resume_tokens=(tokens := [draw(vocab_tokens)] * draw(
            st.integers(1, max(1, f["max_new_tokens"] - 1)))),
        resume_rounds=draw(st.one_of(st.integers(I32_MIN, -1), st.integers(len(tokens),
                                                                            I32_MAX)))),
}
# Every field, resume fields included, is checked before the capacity check: on a full server a
# malformed open still gets INVALID_ARGUMENT, not RESOURCE_EXHAUSTED (which a drafter retries).
MUTATIONS_CHECKED_BEFORE_CAPACITY = sorted(OPEN_MUTATIONS)


@st.composite
def random_open(draw) -> pb.OpenSessionRequest:
  """Every field random, each often valid: the oracle sorts it out."""
  fields: dict = {}
  if draw(st.booleans()):
    fields["prompt_text"] = draw(st.text(UTF8_CHARS, max_size=6))
  if draw(st.booleans()):
    fields["prompt_token_ids"] = draw(st.lists(st.one_of(near_vocab, int32s), max_size=6))
  if draw(st.booleans()):
    fields["sampling"] = {"temperature": draw(st.floats(width=32)),
                          "top_k": draw(st.one_of(st.integers(-2, 5), int32s))}
    if draw(st.booleans()):
      fields["sampling"]["top_p"] = draw(st.floats(width=32))
  fields["seed"] = draw(st.one_of(st.integers(-2, 5), st.integers(I64_MIN, I64_MAX)))
  fields["max_new_tokens"] = draw(st.one_of(st.integers(-2, MAX_LEN), int32s))
  fields["client_id"] = draw(st.one_of(st.text(UTF8_CHARS, max_size=4), oversized_labels))
  fields["request_id"] = draw(st.text(UTF8_CHARS, max_size=4))
  return open_request(fields)


@st.composite
def valid_tree(draw, root: int, min_nodes: int = 0) -> tuple[list[int], list[int]]:
  """A well-formed tree under root (wire format: nodes without the root), often following the
  target's chain so that some of it is accepted."""
  n = draw(st.integers(min_nodes, MAX_TREE - 1))
  node_tokens, tokens, parents = [root], [], []
  children = collections.defaultdict(set)
  for i in range(n):
    parent = draw(st.integers(0, i))
    token = (successor(node_tokens[parent], VOCAB) if draw(st.booleans())
             else draw(vocab_tokens))
    while token in children[parent]:  # siblings stay distinct (at most 7 of 50 tokens)
      token = (token + 1) % VOCAB
    children[parent].add(token)
    tokens.append(token)
    parents.append(parent)
    node_tokens.append(token)
  return tokens, parents


def _mutate_length(draw, tokens, parents):
  if parents and draw(st.booleans()):
    i = draw(st.integers(0, len(parents) - 1))
    return tokens, parents[:i] + parents[i + 1:]
  extra = draw(st.lists(st.integers(0, len(tokens)), min_size=1, max_size=3))
  return (tokens, parents + extra) if draw(st.booleans()) else (tokens + extra, parents)


def _mutate_cycle(draw, tokens, parents):
  """A node that is its own parent, or two nodes that are each other's."""
  n = len(parents)
  i = draw(st.integers(0, n - 1))
  parents = list(parents)
  if n >= 2 and draw(st.booleans()):
    j = draw(st.integers(0, n - 1).filter(lambda j: j != i))
    i, j = min(i, j), max(i, j)
    parents[i], parents[j] = j + 1, i + 1
  else:
    parents[i] = i + 1
  return tokens, parents


def _set_parent(values: st.SearchStrategy[int] | Callable[[int, int], st.SearchStrategy[int]]):
  def mutate(draw, tokens, parents):
    i = draw(st.integers(0, len(parents) - 1))
    strategy = values(i, len(parents)) if callable(values) else values
    return tokens, parents[:i] + [draw(strategy)] + parents[i + 1:]
  return mutate


def _set_token(values: st.SearchStrategy[int]):
  def mutate(draw, tokens, parents):
    i = draw(st.integers(0, len(tokens) - 1))
    return tokens[:i] + [draw(values)] + tokens[i + 1:], parents
  return mutate


def _duplicate_sibling(draw, tokens, parents):
  """A copy of a node (same parent, same token) appended; the last node (a leaf) makes room."""
  if len(tokens) == MAX_TREE - 1:
    tokens, parents = tokens[:-1], parents[:-1]
  i = draw(st.integers(0, len(tokens) - 1))
  return tokens + [tokens[i]], parents + [parents[i]]


def _oversized_tree(draw, tokens, parents):
  n = draw(st.integers(MAX_TREE, 100_000))
  token = draw(vocab_tokens)
  return [token] * n, list(range(n))  # a chain: nothing wrong but its size


# Each tree mutation makes a well-formed tree (of at least one node) malformed in one way.
TREE_MUTATIONS: dict[str, Callable] = {
    "length_mismatch": _mutate_length,
    "parent_cycle": _mutate_cycle,
    "parent_forward": _set_parent(lambda i, n: st.integers(i + 2, max(i + 2, n + 2))),
    "parent_negative": _set_parent(st.integers(I32_MIN, -1)),
    "parent_out_of_range": _set_parent(lambda i, n: st.integers(n + 1, I32_MAX)),
    "duplicate_siblings": _duplicate_sibling,
    "token_out_of_vocab": _set_token(st.integers(VOCAB, I32_MAX)),
    "token_negative": _set_token(st.integers(I32_MIN, -1)),
    "oversized": _oversized_tree,
}

# Invalid UTF-8: a lone continuation byte, bytes never valid, an overlong encoding, a surrogate,
# a code point above U+10FFFF, a truncated sequence, a 5-byte form.
INVALID_UTF8 = (b"\x80", b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xc3", b"\xe2\x82", b"\xf8\x88\x80\x80\x80")
STRING_FIELDS = {"OpenSession": (1, 6, 7), "Verify": (1,), "CloseSession": (1,)}


def varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
  return varint(field << 3 | 2) + varint(len(payload)) + payload


# ------------------------------------------------------------------------------------------------
# The fuzzer


@dataclasses.dataclass
class Stats:
  bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  controls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  single_code: int = 0  # bad requests with exactly one right code
  undecodable: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  assumed_away: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  fuzzing: bool = False
  good_started: set = dataclasses.field(default_factory=set)
  good_rounds_while_fuzzing: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  good_requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  fuzz_s: float = 0.0
  phase: str = "starting"  # what the scenario is doing (for a timeout's message)


def _short(value, limit: int = 300) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Fuzzer:
  """Sends hypothesis' requests through the event loop and checks every answer. Its methods run
  in one worker thread (hypothesis is synchronous); each request runs on the loop."""

  def __init__(self, loop: asyncio.AbstractEventLoop, channel: grpc.aio.Channel, stats: Stats,
               stop: threading.Event):
    self.loop, self.stats, self.stop = loop, stats, stop
    self.model = Model()
    self.bursts = self.abandoned = 0
    self.stub = specedge_pb2_grpc.VerifierStub(channel)
    self.raw = {rpc: channel.unary_unary(f"/specedge.v1.Verifier/{rpc}", request_serializer=None,
                                         response_deserializer=None) for rpc in RPCS}

  # -- transport ---------------------------------------------------------------------------------

  async def _rpc(self, rpc: str, payload, raw: bool, timeout: float = RPC_TIMEOUT_S):
    method = self.raw[rpc] if raw else getattr(self.stub, rpc)
    try:
      response = await method(payload, timeout=timeout)
    except grpc.aio.AioRpcError as e:
      return e.code(), e.details() or "", None
    if raw:
      response = RESPONSE_TYPES[rpc].FromString(response)
    return OK, "", response

  def _on_loop(self, coroutine):
    if self.stop.is_set():
      coroutine.close()
      raise RuntimeError("the scenario timed out or failed; not sending more")
    return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(RPC_TIMEOUT_S * 3)

  # -- one exchange ------------------------------------------------------------------------------

  def send(self, category: str, rpc: str, request=None, raw: bytes | None = None, *,
           keep_open: bool = False):
    """Sends one request (a message, or raw bytes), checks its status against the oracle and
    applies a success to the model. Returns (code, response)."""
    if raw is not None:
      expectation, decoded = expect_raw(rpc, raw, self.model)
      if decoded is not None:
        modeled = {f.name for f, _ in decoded.ListFields()} <= MODELED_FIELDS[rpc]
        self.stats.assumed_away[category] += not modeled
        assume(modeled)
      else:
        self.stats.undecodable[category] += 1
    else:
      expectation, decoded = expect(rpc, request, self.model), request
    code, details, response = self._on_loop(
        self._rpc(rpc, raw if raw is not None else request, raw is not None))
    self.check(category, rpc, decoded if decoded is not None else raw, expectation, code,
               details)
    if code == OK:
      self._apply(rpc, decoded, response, expectation, keep_open=keep_open)
    return code, response

  def check(self, category: str, rpc: str, request, expectation: Expectation,
            code: grpc.StatusCode, details: str) -> None:
    self.stats.codes[code] += 1
    if expectation.bad:
      self.stats.bad[category] += 1
      self.stats.single_code += len(expectation.codes) == 1
    else:
      self.stats.controls[category] += 1
    assert code in expectation.codes, (
        f"{category}: {rpc} got {code.name} ({details!r}); right: "
        f"{sorted(c.name for c in expectation.codes)} for {expectation.faults}; request "
        f"{_short(request)}")
    assert len(details) <= 1024, f"{category}: status details echo the request: {_short(details)}"

  def _apply(self, rpc: str, request, response, expectation: Expectation, *,
             keep_open: bool) -> None:
    model = self.model
    if rpc == "OpenSession":
      prompt, resumed = prompt_of(request), list(request.resume_tokens)
      # A new request's first token is the target's; a resumed one's echoes its last token.
      assert response.first_token == (resumed[-1] if resumed else successor(prompt[-1], VOCAB))
      assert response.prompt_tokens == len(prompt)
      assert list(response.prompt_token_ids) == (prompt if request.prompt_text else [])
      assert response.finished == (not resumed and request.max_new_tokens == 1)
      assert response.finish_reason == ("length" if response.finished else "")
      model.sessions[response.session_id] = SessionModel(
          response.session_id, last_token=response.first_token, generated=max(1, len(resumed)),
          max_new_tokens=request.max_new_tokens, finished=response.finished,
          steps=request.resume_rounds)
      if not keep_open:
        self.close(response.session_id, "open_control")
    elif rpc == "Verify":
      session = model.sessions[request.session_id]
      answer = (list(response.accepted_tokens), response.bonus_token,
                list(response.emitted_tokens), response.finished)
      if expectation.replay:  # the stored answer, and nothing changes
        assert answer == session.last_answer, (request, response, session)
        return
      accepted, bonus, emitted, finished = fake_round(session, list(request.tokens),
                                                      list(request.parents))
      assert answer == (accepted, bonus, emitted, finished), (request, response)
      session.last_token, session.finished = bonus, finished
      session.generated += len(emitted)
      session.steps += 1
      session.last_root, session.last_answer = request.root_token, answer
      if finished and request.session_id == model.live:
        self.close(model.live, "verify_control")
        self.open_live()
    else:
      session = model.sessions.pop(request.session_id)
      assert response.generated_tokens == session.generated
      model.closed.append(request.session_id)

  # -- the fuzzer's own sessions -----------------------------------------------------------------

  def open_session(self, category: str, **fields) -> str:
    code, response = self.send(category, "OpenSession", open_request(fields), keep_open=True)
    assert code == OK
    return response.session_id

  def close(self, session_id: str, category: str) -> None:
    code, _ = self.send(category, "CloseSession", pb.CloseSessionRequest(session_id=session_id))
    assert code == OK

  def open_live(self) -> None:
    self.model.live = self.open_session("setup", prompt_token_ids=[len(self.model.closed) % VOCAB],
                                        max_new_tokens=LIVE_MAX_NEW, client_id="fuzzer")

  def setup(self) -> None:
    self.open_live()
    self.model.done = self.open_session("setup", prompt_token_ids=[3], max_new_tokens=1)
    self.close(self.open_session("setup", prompt_token_ids=[4], max_new_tokens=4), "setup")

  def teardown(self) -> None:
    for session_id in (self.model.live, self.model.done):
      self.close(session_id, "teardown")

  def live(self) -> SessionModel:
    return self.model.sessions[self.model.live]

  def closed_id(self, draw) -> str:
    # Drawn as an index of fixed range: hypothesis wants draws that do not depend on the state.
    return self.model.closed[draw(st.integers(0, 1 << 16)) % len(self.model.closed)]

  # -- the runs ----------------------------------------------------------------------------------

  def run(self) -> None:
    common = {"deadline": None, "database": None, "print_blob": True,
              "derandomize": not os.environ.get("SPECEDGE_FUZZ_RANDOM"),
              "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much,
                                        HealthCheck.large_base_example]}

    def fuzz_fields(category: str):
      """One hypothesis run per case: each gets its share (hypothesis' own choice among ~60
      cases is far from uniform), and a case with few distinct requests ends early."""

      @settings(max_examples=EXAMPLES_PER_CATEGORY.get(category, EXAMPLES_PER_CASE), **common)
      @given(data=st.data())
      def fuzz(data):
        CASES[category](self, data.draw, category)

      self.stats.phase = category
      fuzz()

    @settings(max_examples=CAPACITY_EXAMPLES, **common)
    @given(extra=st.integers(1, 8), data=st.data())
    def fuzz_capacity(extra, data):
      self.burst(extra, data.draw)

    @settings(max_examples=OVERSIZED_EXAMPLES, **common)
    @given(data=st.data())
    def fuzz_oversized(data):
      for rpc in RPCS:
        self.oversized(rpc, data.draw)

    self.stats.phase = "setup"
    self.setup()
    self.stats.phase = "capacity"
    fuzz_capacity()
    for category in sorted(CASES):
      fuzz_fields(category)
    self.stats.phase = "oversized"
    fuzz_oversized()
    self.stats.phase = "teardown"
    self.teardown()
    self.stats.phase = "fuzzing done"

  def burst(self, extra: int, draw) -> None:
    """Opens beyond the free slots, all at once: the ones beyond get RESOURCE_EXHAUSTED, the rest
    succeed (and are closed). Free slots: the fuzzer holds FUZZER_HELD and the good clients,
    opening and closing meanwhile, between 0 and GOOD_MAX_SESSIONS."""
    most = NUM_SLOTS - FUZZER_HELD
    least = most - GOOD_MAX_SESSIONS
    self.bursts += 1
    # Distinct request ids: opens that share one are retries of one open (they get its session).
    requests = [open_request(dict(draw(valid_open()), request_id=f"burst{self.bursts}-{i}"))
                for i in range(most + extra)]
    assert all(expect_open(r).codes == {OK} for r in requests)

    async def gather():
      return await asyncio.gather(*(self._rpc("OpenSession", r, False) for r in requests))

    results = self._on_loop(gather())
    codes = collections.Counter(code for code, _, _ in results)
    opened = [(r, response) for r, (code, _, response) in zip(requests, results) if code == OK]
    for request, response in opened:
      self.model.sessions[response.session_id] = SessionModel(
          response.session_id, response.first_token, 1, request.max_new_tokens, response.finished)
    try:
      # While the server is (about) full: a malformed open is still INVALID_ARGUMENT, never the
      # RESOURCE_EXHAUSTED that a client would retry.
      for name in draw(st.lists(st.sampled_from(MUTATIONS_CHECKED_BEFORE_CAPACITY), min_size=3,
                                max_size=6), label="malformed_while_full"):
        self.send("malformed_while_full", "OpenSession",
                  open_request(OPEN_MUTATIONS[name](draw, draw(valid_open()))))
    finally:
      for _, response in opened:  # free the slots
        self.close(response.session_id, "capacity_close")
    for code, n in codes.items():
      self.stats.codes[code] += n
    self.stats.bad["capacity_refused"] += codes[EXHAUSTED]
    self.stats.single_code += codes[EXHAUSTED]
    self.stats.controls["capacity_opened"] += codes[OK]
    details = {d for code, d, _ in results if code != OK}
    assert set(codes) <= {OK, EXHAUSTED}, (codes, details)
    assert least <= codes[OK] <= most, (
        f"{len(requests)} concurrent opens with {least} to {most} free slots: {codes}, {details}")
    for request, response in opened:
      assert response.first_token == successor(prompt_of(request)[-1], VOCAB)

  def oversized(self, rpc: str, draw) -> None:
    """A message above the receive limit, well-formed or garbage: RESOURCE_EXHAUSTED before it
    is parsed."""
    size = draw(st.integers(RECEIVE_LIMIT + 1, RECEIVE_LIMIT + (256 << 10)), label="size")
    if draw(st.booleans(), label="well_formed"):
      field = {"OpenSession": 1, "Verify": 3, "CloseSession": 1}[rpc]  # a string or packed ints
      raw = length_delimited(field, b"\x01" * size)
    else:
      chunk = draw(st.binary(min_size=1, max_size=16))
      raw = chunk * (size // len(chunk) + 1)
    assert len(raw) > RECEIVE_LIMIT
    code, details, _ = self._on_loop(self._rpc(rpc, raw, True))
    self.stats.codes[code] += 1
    self.stats.bad[f"oversized_{rpc}"] += 1
    self.stats.single_code += 1
    assert code == EXHAUSTED, (rpc, len(raw), code, details)


# ------------------------------------------------------------------------------------------------
# The cases of fuzz_fields: (fuzzer, draw, category) -> None, each sending one or more requests

CASES: dict[str, Callable] = {}


def case(name: str):
  def register(fn):
    CASES[name] = fn
    return fn
  return register


def _open_case(mutation: str):
  def run(fuzzer: Fuzzer, draw, category: str) -> None:
    fields = OPEN_MUTATIONS[mutation](draw, draw(valid_open()))
    fuzzer.send(category, "OpenSession", open_request(fields))
  return run


for _name in OPEN_MUTATIONS:
  CASES[f"open_{_name}"] = _open_case(_name)


@case("open_several_faults")
def _(fuzzer, draw, category):
  fields = draw(valid_open())
  for name in draw(st.lists(st.sampled_from(sorted(OPEN_MUTATIONS)), min_size=2, max_size=4)):
    fields = OPEN_MUTATIONS[name](draw, fields)
  fuzzer.send(category, "OpenSession", open_request(fields))


@case("open_random")
def _(fuzzer, draw, category):
  fuzzer.send(category, "OpenSession", draw(random_open()))


@case("open_valid")
def _(fuzzer, draw, category):
  fuzzer.send(category, "OpenSession", open_request(draw(valid_open())))


def _verify(fuzzer, category, session_id, root, tokens, parents):
  fuzzer.send(category, "Verify", pb.VerifyRequest(session_id=session_id, root_token=root,
                                                   tokens=tokens, parents=parents))


def _tree_case(mutation: str):
  def run(fuzzer: Fuzzer, draw, category: str) -> None:
    live = fuzzer.live()
    tokens, parents = TREE_MUTATIONS[mutation](draw, *draw(valid_tree(live.last_token, 1)))
    _verify(fuzzer, category, live.session_id, live.last_token, tokens, parents)
  return run


for _name in TREE_MUTATIONS:
  CASES[f"verify_{_name}"] = _tree_case(_name)

unknown_ids = st.one_of(st.text(UTF8_CHARS, min_size=1, max_size=MAX_SESSION_ID_CHARS),
                        st.text("0123456789abcdef", min_size=32, max_size=32))
oversized_ids = long_text(MAX_SESSION_ID_CHARS + 1, 1 << 16)


def _other_session(kind: str):
  """A well-formed tree for a session id that is empty, unknown, oversized, closed or finished."""
  def run(fuzzer: Fuzzer, draw, category: str) -> None:
    model = fuzzer.model
    session_id = {"empty": lambda: "", "unknown": lambda: draw(unknown_ids),
                  "oversized": lambda: draw(oversized_ids),
                  "closed": lambda: fuzzer.closed_id(draw),
                  "finished": lambda: model.done}[kind]()
    root = (model.sessions[model.done].last_token if kind == "finished"
            else draw(vocab_tokens))
    _verify(fuzzer, category, session_id, root, *draw(valid_tree(root)))
  return run


for _kind in ("empty", "unknown", "oversized", "closed", "finished"):
  CASES[f"verify_session_{_kind}"] = _other_session(_kind)


@case("verify_root_out_of_sync")
def _(fuzzer, draw, category):
  live = fuzzer.live()
  root = (live.last_token + draw(st.integers(1, VOCAB - 1))) % VOCAB
  _verify(fuzzer, category, live.session_id, root, *draw(valid_tree(root)))


@case("verify_root_out_of_vocab")
def _(fuzzer, draw, category):
  live = fuzzer.live()
  _verify(fuzzer, category, live.session_id, draw(out_of_vocab),
          *draw(valid_tree(live.last_token)))


@case("verify_several_faults")
def _(fuzzer, draw, category):
  live = fuzzer.live()
  tokens, parents = draw(valid_tree(live.last_token, 1))
  for name in draw(st.lists(st.sampled_from(sorted(TREE_MUTATIONS)), min_size=2, max_size=3)):
    if tokens and parents:
      tokens, parents = TREE_MUTATIONS[name](draw, tokens, parents)
  root = draw(st.sampled_from([live.last_token, (live.last_token + 1) % VOCAB, -1, VOCAB]))
  session_id = draw(st.sampled_from([live.session_id, fuzzer.model.done, "", "nope"]))
  _verify(fuzzer, category, session_id, root, tokens, parents)


@case("verify_random")
def _(fuzzer, draw, category):
  model = fuzzer.model
  session_id = draw(st.one_of(st.sampled_from([model.live, model.done, model.closed[0], ""]),
                              unknown_ids))
  small = st.lists(st.one_of(near_vocab, st.integers(-2, 10)), max_size=MAX_TREE)
  tokens = draw(st.one_of(small, st.lists(int32s, max_size=MAX_TREE)))
  parents = draw(st.one_of(small, st.lists(st.integers(-1, MAX_TREE), max_size=MAX_TREE)))
  root = draw(st.one_of(st.just(fuzzer.live().last_token), near_vocab, int32s))
  _verify(fuzzer, category, session_id, root, tokens, parents)


@case("verify_valid")
def _(fuzzer, draw, category):
  live = fuzzer.live()
  tokens, parents = draw(valid_tree(live.last_token))
  step = {"step": live.steps} if draw(st.booleans()) else {}
  fuzzer.send(category, "Verify", pb.VerifyRequest(
      session_id=live.session_id, root_token=live.last_token, tokens=tokens, parents=parents,
      **step))


@case("verify_step_wrong")
def _(fuzzer, draw, category):
  """A step that is neither the session's next one nor a retry of its last one."""
  live = fuzzer.live()
  # An offset from the session's step, so that what is drawn does not depend on the state.
  step = live.steps + draw(st.one_of(st.integers(-(1 << 30), -2), st.integers(1, 1 << 30)))
  fuzzer.send(category, "Verify", pb.VerifyRequest(
      session_id=live.session_id, root_token=live.last_token, step=step,
      **dict(zip(("tokens", "parents"), draw(valid_tree(live.last_token))))))


@case("verify_step_retry")
def _(fuzzer, draw, category):
  """A round, its retry (the stored answer, nothing applied twice) and a retry with another
  root (FAILED_PRECONDITION)."""
  live = fuzzer.live()
  tokens, parents = draw(valid_tree(live.last_token))
  request = pb.VerifyRequest(session_id=live.session_id, root_token=live.last_token,
                             tokens=tokens, parents=parents, step=live.steps)
  fuzzer.send("verify_step_retry_control", "Verify", request)
  fuzzer.send("verify_step_retry_control", "Verify", request)  # NOT_FOUND if it finished
  wrong = pb.VerifyRequest()
  wrong.CopyFrom(request)
  wrong.root_token = (request.root_token + draw(st.integers(1, VOCAB - 1))) % VOCAB
  fuzzer.send(category, "Verify", wrong)


@case("verify_concurrent_twice")
def _(fuzzer, draw, category):
  """One tree sent twice at once: one is applied, the other is FAILED_PRECONDITION (still in
  flight, or its root is no longer the session's)."""
  live = fuzzer.live()
  tokens, parents = draw(valid_tree(live.last_token))
  assume(fake_round(live, tokens, parents)[1] != live.last_token)  # else both could apply
  request = pb.VerifyRequest(session_id=live.session_id, root_token=live.last_token,
                             tokens=tokens, parents=parents)
  expectation = expect_verify(request, fuzzer.model)
  assert expectation.codes == {OK}

  async def both():
    return await asyncio.gather(*(fuzzer._rpc("Verify", request, False) for _ in range(2)))

  results = fuzzer._on_loop(both())
  assert sorted(code.name for code, _, _ in results) == ["FAILED_PRECONDITION", "OK"], results
  for code, details, response in results:
    if code == OK:
      fuzzer.check("verify_concurrent_twice_control", "Verify", request, expectation, code, "")
      fuzzer._apply("Verify", request, response, expectation, keep_open=False)
    else:
      fuzzer.check(category, "Verify", request, Expectation(frozenset({PRECONDITION}),
                                                            ("concurrent twin",)), code, details)


@case("open_abandoned")
def _(fuzzer, draw, category):
  """A valid open whose client gives up at once (OK or DEADLINE_EXCEEDED), then retries it with
  the same request_id, as the protocol has it: the retry gets the session the first made, if its
  reply was lost, or a new one, so nothing leaks (a session the client never learns of would be
  the lease's to reclaim). The leak check at the end holds the server to it."""
  fuzzer.abandoned += 1
  request = open_request(dict(draw(valid_open()), request_id=f"abandoned-{fuzzer.abandoned}"))
  timeout = draw(st.floats(1e-4, 5e-3))
  code, details, response = fuzzer._on_loop(fuzzer._rpc("OpenSession", request, False, timeout))
  expectation = Expectation(frozenset({OK, grpc.StatusCode.DEADLINE_EXCEEDED}), ("abandoned",))
  fuzzer.check(category, "OpenSession", request, expectation, code, details)
  if code == OK:
    fuzzer._apply("OpenSession", request, response, expect_open(request), keep_open=False)
  else:
    fuzzer.send("open_abandoned_retry", "OpenSession", request)


@case("open_resume_valid")
def _(fuzzer, draw, category):
  fields = draw(valid_open())
  assume(fields["max_new_tokens"] >= 2)
  tokens = draw(st.lists(vocab_tokens, min_size=1, max_size=fields["max_new_tokens"] - 1))
  fuzzer.send(category, "OpenSession", open_request(dict(
      fields, resume_tokens=tokens, resume_rounds=draw(st.integers(0, len(tokens) - 1)))))


def _close_case(kind: str):
  def run(fuzzer: Fuzzer, draw, category: str) -> None:
    session_id = {"empty": lambda: "", "unknown": lambda: draw(unknown_ids),
                  "oversized": lambda: draw(oversized_ids),
                  "closed": lambda: fuzzer.closed_id(draw)}[kind]()
    fuzzer.send(category, "CloseSession", pb.CloseSessionRequest(session_id=session_id))
  return run


for _kind in ("empty", "unknown", "oversized", "closed"):
  CASES[f"close_session_{_kind}"] = _close_case(_kind)


@case("close_twice")
def _(fuzzer, draw, category):
  """Open, close (OK), close again (NOT_FOUND) and verify on the closed session (NOT_FOUND)."""
  fields = draw(valid_open())
  session_id = fuzzer.open_session("close_twice_control", **fields)
  fuzzer.close(session_id, "close_twice_control")
  fuzzer.send(category, "CloseSession", pb.CloseSessionRequest(session_id=session_id))
  fuzzer.send(category, "Verify", pb.VerifyRequest(session_id=session_id, root_token=1))


@case("raw_random_bytes")
def _(fuzzer, draw, category):
  rpc = draw(st.sampled_from(RPCS))
  fuzzer.send(category, rpc, raw=draw(st.binary(max_size=96)))


@case("raw_invalid_utf8")
def _(fuzzer, draw, category):
  """A string field holding invalid UTF-8, alone or after an otherwise valid request."""
  rpc = draw(st.sampled_from(RPCS))
  ascii_text = st.binary(max_size=6).map(lambda b: bytes(c & 0x7F for c in b))
  payload = draw(ascii_text) + draw(st.sampled_from(INVALID_UTF8)) + draw(ascii_text)
  field = length_delimited(draw(st.sampled_from(STRING_FIELDS[rpc])), payload)
  prefix = b""
  if draw(st.booleans()):
    prefix = {"OpenSession": lambda: open_request(draw(valid_open())),
              "Verify": lambda: pb.VerifyRequest(session_id=fuzzer.model.live),
              "CloseSession": lambda: pb.CloseSessionRequest(session_id="x")}[rpc]()
    prefix = prefix.SerializeToString()
  fuzzer.send(category, rpc, raw=prefix + field)


@case("raw_corrupted")
def _(fuzzer, draw, category):
  """A serialized request cut short, with a byte changed, or with bytes spliced in."""
  rpc = draw(st.sampled_from(RPCS))
  live = fuzzer.live()
  if rpc == "OpenSession":
    request = open_request(draw(valid_open()))
  elif rpc == "Verify":
    tokens, parents = draw(valid_tree(live.last_token))
    request = pb.VerifyRequest(session_id=live.session_id, root_token=live.last_token,
                               tokens=tokens, parents=parents)
  else:
    request = pb.CloseSessionRequest(session_id=draw(unknown_ids))
  raw = request.SerializeToString()
  at = draw(st.integers(0, max(0, len(raw) - 1)))
  how = draw(st.sampled_from(["cut", "change", "splice"]))
  if how == "cut":
    raw = raw[:at]
  elif how == "change" and raw:
    raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
  else:
    raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
  fuzzer.send(category, rpc, raw=raw)


REQUIRED_CATEGORIES = set(CASES) - {"open_valid", "verify_valid", "open_abandoned",
                                     "open_resume_valid"}


# ------------------------------------------------------------------------------------------------
# The scenario


async def good_client(c: int, channel: grpc.aio.Channel, fuzz_done: asyncio.Event, stats: Stats,
                      events: EventLog) -> None:
  """A well-behaved edge: K=2 interleaved requests at a time, batch after batch until the
  fuzzing is over; every output must be the target's own chain."""

  def on_tokens(request_id, tokens, finished):
    stats.good_started.add(c)
    if stats.fuzzing:
      stats.good_rounds_while_fuzzing[c] += 1

  for batch in range(MAX_GOOD_BATCHES):
    requests = [EdgeRequest(request_id=f"good{c}b{batch}r{i}",
                            prompt_ids=(c + 1, (7 * batch + 3 * i + c) % VOCAB))
                for i in range(GOOD_K)]
    drafter = Drafter(  # a fresh draft engine per run: each run has its own device thread
        FakeDraftEngine(vocab_size=VOCAB, num_slots=GOOD_K, correct_depth=2), channel,
        DrafterConfig(client_id=f"good{c}", max_concurrent_requests=GOOD_K,
                      max_new_tokens=GOOD_MAX_NEW, simulated_rtt_ms=2.0,
                      open_retry_initial_s=0.002, open_retry_max_s=0.02, rpc_timeout_s=20.0),
        event_log=events, on_tokens=on_tokens)
    outputs = await drafter.run(requests)
    for request, output in zip(requests, outputs):
      assert output.error == "", (request.request_id, output.error)
      assert output.tokens == expected_output(request.prompt_ids, GOOD_MAX_NEW, VOCAB), (
          request.request_id)
      assert output.finish_reason == "length"
      stats.good_requests[c] += 1
    if fuzz_done.is_set():
      return


async def scenario(target: FakeTargetEngine, stats: Stats) -> None:
  loop = asyncio.get_running_loop()
  server = VerifierServer(target, batching=BatchingConfig(mode="dynamic", max_wait_ms=1.0),
                          tokenizer=FuzzTokenizer(), session_timeout_s=300.0)
  port = await server.start("127.0.0.1:0")
  good_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
  # A connection of its own, so that the good clients' calls never queue behind a fuzzed one.
  fuzz_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                           options=[("grpc.use_local_subchannel_pool", 1)])
  stop = threading.Event()
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzzer")
  good: list[asyncio.Task] = []
  try:
    fuzz_done = asyncio.Event()
    events = EventLog(None, "specedge")
    good = [asyncio.create_task(good_client(c, good_channel, fuzz_done, stats, events))
            for c in range(GOOD_CLIENTS)]
    for _ in range(1000):  # both good clients are being served before the fuzzing starts
      if len(stats.good_started) == GOOD_CLIENTS or any(t.done() for t in good):
        break
      await asyncio.sleep(0.01)
    assert len(stats.good_started) == GOOD_CLIENTS, "the good clients never started"
    fuzzer = Fuzzer(loop, fuzz_channel, stats, stop)
    stats.fuzzing, started = True, time.monotonic()
    try:
      await loop.run_in_executor(executor, fuzzer.run)
    finally:
      stats.fuzzing, stats.fuzz_s = False, time.monotonic() - started
      fuzz_done.set()
    stats.phase = "waiting for the good clients"
    await asyncio.gather(*good)
    stats.phase = "final checks"
    assert not [e for e in events.events if e["kind"] == "request_resumed"], (
        "a good client lost its session")
    health = health_pb2_grpc.HealthStub(good_channel)
    for service in ("", "specedge.v1.Verifier"):
      reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
      assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert server.servicer.sessions == {}, ("sessions leaked", [
        (s.request_id, s.client_id, s.generated) for s in server.servicer.sessions.values()])
    assert target.num_free_slots == NUM_SLOTS, "slots leaked"
  finally:
    stop.set()
    for task in good:
      task.cancel()
    executor.shutdown(wait=False)
    await good_channel.close()
    await fuzz_channel.close()
    await server.stop(grace=None)


def test_fuzzed_requests_get_their_status_while_good_clients_get_target_only_outputs():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=NUM_SLOTS, max_len=MAX_LEN,
                            max_tree_nodes=MAX_TREE, max_batch_size=4)
  stats = Stats()
  try:
    asyncio.run(asyncio.wait_for(scenario(target, stats), timeout=SCENARIO_TIMEOUT_S))
  except TimeoutError:
    raise AssertionError(f"the scenario timed out in phase {stats.phase!r}: {stats}") from None

  total_bad = sum(stats.bad.values())
  report = (f"{total_bad} bad requests in {stats.fuzz_s:.1f} s ({stats.single_code} with one "
            f"right code), controls {dict(stats.controls)}, codes "
            f"{ {c.name: n for c, n in stats.codes.items()} }, bad by category "
            f"{dict(sorted(stats.bad.items()))}, undecodable {dict(stats.undecodable)}, "
            f"assumed away {dict(stats.assumed_away)}, good requests "
            f"{dict(stats.good_requests)}, good rounds while fuzzing "
            f"{dict(stats.good_rounds_while_fuzzing)}")
  print(report)
  assert total_bad >= MIN_BAD_REQUESTS, report
  missing = {c for c in REQUIRED_CATEGORIES if not stats.bad[c]}
  assert not missing, f"categories that sent no bad request: {sorted(missing)}; {report}"
  for rpc in RPCS:
    assert stats.bad[f"oversized_{rpc}"] >= 1, report
  assert stats.bad["capacity_refused"] >= CAPACITY_EXAMPLES, report
  assert stats.bad["malformed_while_full"] >= 3 * CAPACITY_EXAMPLES, report
  assert stats.undecodable["raw_invalid_utf8"] >= 3 and stats.undecodable["raw_random_bytes"] >= 3
  assert stats.codes[grpc.StatusCode.UNKNOWN] == stats.codes[grpc.StatusCode.INTERNAL] == 0
  # The good clients were served all along the fuzzing, not just before or after it.
  assert all(stats.good_rounds_while_fuzzing[c] >= 20 for c in range(GOOD_CLIENTS)), report


RESUME_MUTATIONS = sorted(m for m in OPEN_MUTATIONS if m.startswith("resume"))


def test_malformed_resume_fields_get_invalid_argument_even_when_the_server_is_full():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=1, max_len=MAX_LEN,
                            max_tree_nodes=MAX_TREE, max_batch_size=1)

  async def scenario():
    loop = asyncio.get_running_loop()
    server = VerifierServer(target, tokenizer=FuzzTokenizer(), session_timeout_s=300.0)
    port = await server.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = specedge_pb2_grpc.VerifierStub(channel)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzzer")
    try:
      held = await stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1],
                                                          max_new_tokens=4))  # the only slot

      async def status(request):
        try:
          await stub.OpenSession(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
          return e.code(), e.details()
        return OK, ""

      @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
      @given(data=st.data())
      def fuzz(data):
        name = data.draw(st.sampled_from(RESUME_MUTATIONS), label="mutation")
        request = open_request(OPEN_MUTATIONS[name](data.draw, data.draw(valid_open())))
        assert expect_open(request).codes == {INVALID}
        code, details = asyncio.run_coroutine_threadsafe(status(request), loop).result(30)
        assert code == INVALID, (name, code, details)

      await loop.run_in_executor(executor, fuzz)
      await stub.CloseSession(pb.CloseSessionRequest(session_id=held.session_id))
    finally:
      executor.shutdown(wait=False)
      await channel.close()
      await server.stop(grace=None)

  asyncio.run(asyncio.wait_for(scenario(), timeout=30))
