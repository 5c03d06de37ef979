"""Sessions as leases, batching that never waits for the absent, ownership, quotas and bounds.

The verifier against the hand-checkable fake engines: a silent session costs the others one
bounded static-batching wait, not one per round, and frees its slot when its lease runs out; a
session answers only the client that opened it; one client cannot hold more than its quota;
oversized fields are refused before any work, with messages that never echo them; degenerate
sampling parameters are refused; tokenizing a long text does not block the event loop.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specedge_jax import api
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.testing.fakes import FakeTargetEngine, successor
from specedge_jax.testing.servers import running_verifier

VOCAB = 50


serving = running_verifier


def run(coro):
  return asyncio.run(asyncio.wait_for(coro, timeout=60))


async def open_session(stub, prompt=(1, 2, 3), max_new_tokens=32, metadata=None, **kwargs):
  return await stub.OpenSession(pb.OpenSessionRequest(
      prompt_token_ids=list(prompt), max_new_tokens=max_new_tokens, **kwargs), metadata=metadata)


async def step(stub, session_id, root, metadata=None):
  """One verify of a one-node chain (the true next token): returns the new root."""
  response = await stub.Verify(pb.VerifyRequest(
      session_id=session_id, root_token=root, tokens=[successor(root, VOCAB)], parents=[0]),
      metadata=metadata)
  return response.bonus_token


async def expect_status(code, call, match=""):
  with pytest.raises(grpc.aio.AioRpcError) as info:
    await call
  assert info.value.code() == code, info.value.details()
  assert match in info.value.details(), info.value.details()
  return info.value.details()


def test_a_silent_session_costs_one_bounded_wait_not_one_per_round():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)
  timeout = 0.6

  async def scenario():
    batching = BatchingConfig(mode="static", static_timeout_s=timeout)
    async with serving(target, batching=batching) as (_, _, stub):
      live = await open_session(stub, prompt=(1,))
      silent = await open_session(stub, prompt=(2,))  # opens, then never sends a tree
      root, waits = live.first_token, []
      for _ in range(4):
        started = time.monotonic()
        root = await step(stub, live.session_id, root)
        waits.append(time.monotonic() - started)
      assert waits[0] >= timeout * 0.9, "the first round waits for the silent session"
      assert max(waits[1:]) < timeout / 2, f"later rounds waited again: {waits}"
      # Back from silence, the session is served and waited for again: both join one batch.
      sizes_before = list(target.verify_batch_sizes)
      await asyncio.gather(step(stub, silent.session_id, silent.first_token),
                           step(stub, live.session_id, root))
      assert target.verify_batch_sizes[len(sizes_before):] == [2]

  run(scenario())


def test_a_session_whose_lease_runs_out_frees_its_slot():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)
  lease = 0.4

  async def scenario():
    async with serving(target, session_timeout_s=lease, admission_queue=1) as (_, _, stub):
      kept = await open_session(stub, prompt=(1,))
      dropped = await open_session(stub, prompt=(2,))
      newcomer = asyncio.ensure_future(open_session(stub, prompt=(3,)))  # queues for a slot
      root = kept.first_token
      started = time.monotonic()
      while not newcomer.done():  # every call renews the kept session's lease
        assert time.monotonic() - started < lease * 3, "the silent session kept its slot"
        root = await step(stub, kept.session_id, root)
        await asyncio.sleep(lease / 8)
      assert time.monotonic() - started >= lease * 0.9  # not before its lease ran out
      await expect_status(grpc.StatusCode.NOT_FOUND,
                          step(stub, dropped.session_id, dropped.first_token), "lease")
      await step(stub, kept.session_id, root)  # the renewed one is alive
      opened = await newcomer  # and the freed slot went to the queued newcomer
      await step(stub, opened.session_id, opened.first_token)

  run(scenario())


TOKENS = {"alice-token": "alice", "bob-token": "bob"}


def _identify(metadata):
  for key, value in metadata:
    if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
      return TOKENS.get(value[len("Bearer "):])
  return None


def _as(name):
  token = next(t for t, n in TOKENS.items() if n == name)
  return (("authorization", f"Bearer {token}"),)


def test_a_session_answers_only_the_client_that_opened_it():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    async with serving(target) as (server, _, stub):
      server.servicer._identify = _identify  # what security.Authenticator.client_of provides
      alice = await open_session(stub, metadata=_as("alice"))
      await expect_status(grpc.StatusCode.PERMISSION_DENIED,
                          step(stub, alice.session_id, alice.first_token, _as("bob")),
                          "another client")
      await expect_status(grpc.StatusCode.PERMISSION_DENIED, stub.CloseSession(
          pb.CloseSessionRequest(session_id=alice.session_id), metadata=_as("bob")))
      await expect_status(grpc.StatusCode.UNAUTHENTICATED,
                          step(stub, alice.session_id, alice.first_token))
      # Alice's session is untouched by all of it.
      root = await step(stub, alice.session_id, alice.first_token, _as("alice"))
      assert root == successor(successor(alice.first_token, VOCAB), VOCAB)
      await stub.CloseSession(pb.CloseSessionRequest(session_id=alice.session_id),
                              metadata=_as("alice"))

  run(scenario())


def test_one_client_cannot_hold_more_than_its_quota():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=6, max_batch_size=4)

  async def scenario():
    async with serving(target, max_sessions_per_client=2) as (_, _, stub):
      held = [await open_session(stub, client_id="greedy", prompt=(i + 1,)) for i in range(2)]
      await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          open_session(stub, client_id="greedy", prompt=(5,)), "quota")
      # A keep-alive client renews its sessions but gets no more of them; others still get in.
      for session in held:
        await step(stub, session.session_id, session.first_token)
      await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          open_session(stub, client_id="greedy", prompt=(6,)), "quota")
      await open_session(stub, client_id="polite", prompt=(7,))
      await stub.CloseSession(pb.CloseSessionRequest(session_id=held[0].session_id))
      await open_session(stub, client_id="greedy", prompt=(8,))  # a closed one frees quota

  run(scenario())


def test_oversized_fields_are_refused_without_echoing_them():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2, max_len=64)

  async def scenario():
    async with serving(target) as (_, _, stub):
      huge_id = "x" * 16384
      details = await expect_status(
          grpc.StatusCode.INVALID_ARGUMENT,
          stub.Verify(pb.VerifyRequest(session_id=huge_id, root_token=1)), "at most 64")
      assert len(details) < 200
      details = await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                                    open_session(stub, request_id="r" * (1 << 20)), "request_id")
      assert len(details) < 200
      await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                          open_session(stub, client_id="c" * 300), "client_id")
      await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                          open_session(stub, prompt=[1] * 100_000), "max_len 64")
      session = await open_session(stub, max_new_tokens=8)
      await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Verify(pb.VerifyRequest(
          session_id=session.session_id, root_token=session.first_token,
          tokens=[1] * 100_000, parents=[0] * 100_000)), "at most 16")
      await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                          open_session(stub, sampling=pb.SamplingParams(temperature=1.0,
                                                                        top_p=1e-45)), "top_p")
      await expect_status(grpc.StatusCode.INVALID_ARGUMENT,
                          open_session(stub, sampling=pb.SamplingParams(temperature=1e-30)),
                          "temperature")
      await step(stub, session.session_id, session.first_token)  # the good one still works

  run(scenario())


def test_degenerate_sampling_parameters_are_refused():
  for kwargs, match in ((dict(top_p=1e-45), "top_p"), (dict(top_p=0.0), "top_p"),
                        (dict(temperature=1e-30), "temperature"),
                        (dict(temperature=float("nan")), "temperature")):
    with pytest.raises(ValueError, match=match):
      api.SamplingParams(**kwargs)
  api.SamplingParams(temperature=api.MIN_TEMPERATURE, top_p=api.MIN_TOP_P)  # the edges are fine


class SlowTokenizer:
  def encode(self, text):
    time.sleep(1.0)
    return [1 + len(text) % 10]


def test_tokenizing_a_prompt_does_not_block_the_event_loop():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with serving(target, tokenizer=SlowTokenizer()) as (_, channel, stub):
      health = health_pb2_grpc.HealthStub(channel)
      opening = asyncio.ensure_future(stub.OpenSession(pb.OpenSessionRequest(
          prompt_text="a long prompt", max_new_tokens=4)))
      await asyncio.sleep(0.2)  # the tokenizer is busy now
      started = time.monotonic()
      answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
      assert answer.status == health_pb2.HealthCheckResponse.SERVING
      assert time.monotonic() - started < 0.5, "the health check waited for the tokenizer"
      assert not opening.done()
      opened = await opening
      assert opened.prompt_tokens == 1

  run(scenario())


def test_undecodable_requests_get_invalid_argument_and_one_log_line(caplog):
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)
  # Field 6 (client_id, a string) holding bytes that are not UTF-8; then plain garbage.
  bad_utf8 = b"\x32\x02\xff\xfe"
  garbage = b"\xff\xff\xff\xff\x0f"

  async def scenario():
    async with serving(target) as (_, channel, stub):
      raw = channel.unary_unary("/specedge.v1.Verifier/OpenSession")
      for payload in [bad_utf8, garbage] * 50:
        await expect_status(grpc.StatusCode.INVALID_ARGUMENT, raw(payload), "does not decode")
      session = await open_session(stub)  # the server is fine
      await step(stub, session.session_id, session.first_token)

  with caplog.at_level("WARNING", logger="specedge_jax.serving.servicer"):
    run(scenario())
  lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
  assert 1 <= len(lines) <= 5, f"{len(lines)} log lines for 100 bad requests"
  assert all(r.exc_info is None for r in lines), "no traceback per request"


def test_a_verify_whose_reply_was_lost_is_answered_again_not_applied_twice():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2, forward_delay_s=0.5)

  async def scenario():
    async with serving(target) as (_, _, stub):
      session = await open_session(stub, prompt=(4,), max_new_tokens=16)
      root = session.first_token
      chain = [successor(root, VOCAB)]
      chain.append(successor(chain[-1], VOCAB))

      def verify(step, timeout=None, root=root):
        return stub.Verify(pb.VerifyRequest(session_id=session.session_id, root_token=root,
                                            tokens=chain, parents=[0, 1], step=step),
                           timeout=timeout)

      # The client gives up before the server answers; the server applies the round anyway.
      await expect_status(grpc.StatusCode.DEADLINE_EXCEEDED, verify(0, timeout=0.1))
      retried = await verify(0)  # waits for the round in flight and shares its answer
      again = await verify(0)  # and a later retry gets the stored answer
      assert list(retried.accepted_tokens) == chain == list(again.accepted_tokens)
      assert retried.bonus_token == again.bonus_token == successor(chain[-1], VOCAB)
      assert target.verify_batch_sizes == [1], "the tree was verified once"
      await expect_status(grpc.StatusCode.FAILED_PRECONDITION, verify(3), "out of sync")
      await expect_status(grpc.StatusCode.FAILED_PRECONDITION, verify(0, root=root + 1),
                          "applied with root")
      nxt = await stub.Verify(pb.VerifyRequest(
          session_id=session.session_id, root_token=retried.bonus_token,
          tokens=[successor(retried.bonus_token, VOCAB)], parents=[0], step=1))
      assert list(nxt.accepted_tokens) == [successor(retried.bonus_token, VOCAB)]
      assert target.verify_batch_sizes == [1, 1]

  run(scenario())


def test_the_drafter_retries_a_lost_verify_and_loses_no_token():
  from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
  from specedge_jax.testing.fakes import FakeDraftEngine, expected_output

  # Every forward outlasts the drafter's deadline: each round's first reply is lost, the retry
  # (same step) gets the stored answer.
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2,
                            forward_delay_s=0.3)
  streamed: list[int] = []

  async def scenario():
    async with serving(target) as (_, channel, _):
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=1, correct_depth=2), channel,
                        DrafterConfig(max_concurrent_requests=1, max_new_tokens=9,
                                      rpc_timeout_s=0.1, verify_retries=3),
                        on_tokens=lambda _, tokens, __: streamed.extend(tokens))
      return await drafter.run([EdgeRequest(request_id="r", prompt_ids=(5, 6))])

  (output,) = run(scenario())
  assert output.error == "", output.error
  assert output.tokens == expected_output((5, 6), 9, VOCAB) == streamed
  assert len(target.verify_batch_sizes) == output.steps, "each round was verified once"


def test_an_open_whose_reply_was_lost_gets_the_session_it_made():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    async with serving(target) as (_, _, stub):
      first = await open_session(stub, client_id="edge", request_id="r1")
      again = await open_session(stub, client_id="edge", request_id="r1")  # a retry
      assert again.session_id == first.session_id
      assert target.num_free_slots == 3 and len(target.opened_prompts) == 1
      other = await open_session(stub, client_id="edge", request_id="r2")
      assert other.session_id != first.session_id
      root = await step(stub, first.session_id, first.first_token)
      # After a round, the same request_id is a new request again, not a retry.
      fresh = await open_session(stub, client_id="edge", request_id="r1")
      assert fresh.session_id != first.session_id
      resumed = await open_session(stub, client_id="edge", request_id="r1",
                                   resume_tokens=[first.first_token, root], resume_rounds=1)
      assert resumed.session_id not in (first.session_id, fresh.session_id)
      assert resumed.first_token == root

  run(scenario())


def test_opens_beyond_capacity_wait_their_turn_in_a_bounded_fifo_queue():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with serving(target, admission_queue=3) as (_, _, stub):
      held = [await open_session(stub, prompt=(i + 1,), request_id=f"held{i}") for i in range(2)]
      order: list[str] = []

      async def queued(name):
        response = await open_session(stub, prompt=(7,), request_id=name)
        order.append(name)
        return response

      waiting = []
      for i in range(3):  # arrive in this order
        waiting.append(asyncio.ensure_future(queued(f"q{i}")))
        await asyncio.sleep(0.05)
      with pytest.raises(grpc.aio.AioRpcError) as info:  # the queue is full
        await open_session(stub, prompt=(8,))
      assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
      hint = dict(info.value.trailing_metadata())["retry-after-ms"]
      assert int(hint) > 0
      assert not any(w.done() for w in waiting)
      for session in held:  # each close admits the oldest waiter
        await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
      first_two = await asyncio.gather(waiting[0], waiting[1])
      assert order == ["q0", "q1"]
      await stub.CloseSession(pb.CloseSessionRequest(session_id=first_two[0].session_id))
      await waiting[2]
      assert order == ["q0", "q1", "q2"]

  run(scenario())


def test_a_queued_open_gives_up_after_its_wait_and_a_cancelled_one_leaves_the_queue():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=1, max_batch_size=1)

  async def scenario():
    async with serving(target, admission_queue=2, admission_wait_s=0.2) as (server, _, stub):
      held = await open_session(stub, prompt=(1,))
      await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, open_session(stub, prompt=(2,)),
                          "no slot came free")
      await expect_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                          stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[3],
                                                                 max_new_tokens=4),
                                           timeout=0.05))
      await asyncio.sleep(0.1)
      assert not server.servicer._admission, "a gone caller still holds a place in the queue"
      await stub.CloseSession(pb.CloseSessionRequest(session_id=held.session_id))
      await open_session(stub, prompt=(4,))  # the slot is not lost to either of them

  run(scenario())
