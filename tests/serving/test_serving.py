"""The serving stack against engines whose outputs can be worked out by hand (specedge_jax.testing.fakes).

Every test runs the real grpc.aio verifier on a free 127.0.0.1 port and real gRPC clients (the
drafter, or a raw stub for bad input). Real-engine end-to-end tests are in
test_serving_engines.py.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specedge_jax.measure import metrics
from specedge_jax.measure.events import EventLog
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeDevice, EdgeRequest
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output, successor
from specedge_jax.testing.servers import running_verifier

VOCAB = 50


serving = running_verifier


def run(coro):
  return asyncio.run(asyncio.wait_for(coro, timeout=60))


def requests_for(client: int, n: int) -> list[EdgeRequest]:
  return [EdgeRequest(request_id=f"c{client}r{i}", prompt_ids=(client + 1, 7 * i + 3 + client))
          for i in range(n)]


async def open_session(stub, prompt=(1, 2, 3), max_new_tokens=8, **kwargs):
  return await stub.OpenSession(pb.OpenSessionRequest(
      prompt_token_ids=list(prompt), max_new_tokens=max_new_tokens, **kwargs))


def chain_tree(root: int, depth: int) -> tuple[list[int], list[int]]:
  """The true continuation of root as a chain (wire format: nodes without the root)."""
  tokens, token = [], root
  for _ in range(depth):
    token = successor(token, VOCAB)
    tokens.append(token)
  return tokens, list(range(depth))


async def expect_status(code: grpc.StatusCode, call, match: str = ""):
  with pytest.raises(grpc.aio.AioRpcError) as info:
    await call
  assert info.value.code() == code, info.value.details()
  assert match in info.value.details(), info.value.details()
  return info.value.details()


@pytest.mark.parametrize("mode,proactive,interleave", [
    ("dynamic", False, True),
    ("dynamic", True, True),
    ("static", True, True),
    # Not static with interleave off: static batching waits for every active session, and an
    # edge that does not interleave holds K-1 of its sessions back (see docs/notes/serving.md).
    ("dynamic", False, False),
])
def test_drafters_emit_the_target_chain(mode, proactive, interleave):
  """Three edges x K=2 interleaved requests: every output is the target's own chain."""
  # A forward that takes a little time, as a real one does: the proactive job (low priority on
  # the edge device) then runs while its tree is verified even on a loaded CI box, so every
  # full acceptance is a hit (a zero-time forward let the answer overtake it there once).
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=6, max_batch_size=4,
                            forward_delay_s=0.005)
  server_log = EventLog(None, "specedge")
  edge_log = EventLog(None, "specedge")
  streamed: dict[str, list[int]] = {}

  def on_tokens(request_id, tokens, finished):
    streamed.setdefault(request_id, []).extend(tokens)

  async def scenario():
    async with serving(target, batching=BatchingConfig(mode=mode, max_wait_ms=1.0),
                       event_log=server_log) as (_, channel, _):
      drafters = [
          Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2,
                                  proactive=proactive), channel,
                  DrafterConfig(client_id=f"edge{c}", max_concurrent_requests=2,
                                proactive=proactive, interleave=interleave, max_new_tokens=11),
                  event_log=edge_log, on_tokens=on_tokens)
          for c in range(3)]
      return await asyncio.gather(*(d.run(requests_for(c, 3)) for c, d in enumerate(drafters)))

  outputs = run(scenario())
  for c, client_outputs in enumerate(outputs):
    for request, output in zip(requests_for(c, 3), client_outputs):
      want = expected_output(request.prompt_ids, 11, VOCAB)
      assert output.tokens == want, (request.request_id, output.error)
      assert streamed[request.request_id] == want
      assert output.finish_reason == "length"
      # The fake draft always gets its 2 correct nodes accepted (until max_new_tokens cuts).
      assert output.accepted_depths[:-1] == [2] * (len(output.accepted_depths) - 1)
      if proactive:
        assert output.proactive_hits and all(output.proactive_hits[:-1])
  assert target.num_free_slots == 6  # every session was closed
  assert max(target.verify_batch_sizes) > 1  # trees of several requests shared a forward
  # Events: the report can read both sides together.
  _, summaries = metrics.summarize_events(server_log.events + edge_log.events)
  summary = summaries[0]
  assert summary.requests.n_requests == 9
  assert summary.generated_tokens == 9 * 11
  assert summary.requests.n_verifications == sum(len(o.accepted_depths)
                                                 for client in outputs for o in client)
  assert summary.n_edges == 3
  assert summary.throughput_per_compute_s is not None
  batch_events = [e for e in server_log.events if e["op"] == "verify"]
  assert sum(e["batch_size"] for e in batch_events) == summary.requests.n_verifications
  assert all(e["batch_size"] == len(e["request_ids"]) for e in batch_events)


def test_static_batching_waits_for_every_active_session():
  """Static mode: one forward for all three sessions even though their trees arrive apart."""
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    async with serving(target, batching=BatchingConfig(mode="static", static_timeout_s=30)) as (
        _, _, stub):
      sessions = [await open_session(stub, prompt=(i + 1,)) for i in range(3)]

      async def verify(i, delay):
        await asyncio.sleep(delay)
        tokens, parents = chain_tree(sessions[i].first_token, 1)
        return await stub.Verify(pb.VerifyRequest(session_id=sessions[i].session_id,
                                                  root_token=sessions[i].first_token,
                                                  tokens=tokens, parents=parents))

      responses = await asyncio.gather(*(verify(i, 0.1 * i) for i in range(3)))
      assert [r.timing.batch_size for r in responses] == [3, 3, 3]
      assert responses[0].timing.queue_time_s > responses[2].timing.queue_time_s

  run(scenario())
  assert target.verify_batch_sizes == [3]


def test_dynamic_batching_does_not_wait():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    async with serving(target, batching=BatchingConfig(mode="dynamic", max_wait_ms=0)) as (
        _, _, stub):
      a = await open_session(stub, prompt=(1,))
      await open_session(stub, prompt=(2,))  # active, never sends a tree
      tokens, parents = chain_tree(a.first_token, 2)
      response = await stub.Verify(pb.VerifyRequest(session_id=a.session_id,
                                                    root_token=a.first_token, tokens=tokens,
                                                    parents=parents))
      assert response.timing.batch_size == 1
      assert list(response.accepted_tokens) == tokens

  run(scenario())


def test_sessions_beyond_slots_are_refused_and_close_frees_a_slot():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with serving(target) as (server, _, stub):
      a = await open_session(stub, prompt=(1,), max_new_tokens=20)
      b = await open_session(stub, prompt=(2,))
      await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, open_session(stub, prompt=(3,)),
                          "slots")
      # The open sessions are unaffected and keep verifying.
      tokens, parents = chain_tree(a.first_token, 3)
      response = await stub.Verify(pb.VerifyRequest(session_id=a.session_id,
                                                    root_token=a.first_token, tokens=tokens,
                                                    parents=parents))
      assert list(response.emitted_tokens) == expected_output((1,), 5, VOCAB)[1:]
      closed = await stub.CloseSession(pb.CloseSessionRequest(session_id=b.session_id))
      assert closed.generated_tokens == 1
      c = await open_session(stub, prompt=(3,))
      assert c.first_token == successor(3, VOCAB)
      assert len(server.servicer.sessions) == 2
      await expect_status(grpc.StatusCode.NOT_FOUND,
                          stub.CloseSession(pb.CloseSessionRequest(session_id=b.session_id)))
      await expect_status(grpc.StatusCode.NOT_FOUND, stub.Verify(pb.VerifyRequest(
          session_id=b.session_id, root_token=b.first_token)))

  run(scenario())
  assert target.num_free_slots == 0  # a and c are still open: nothing else was freed


def test_bad_input_gets_a_clear_status_and_leaves_other_sessions_alone():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_tree_nodes=8, max_batch_size=4,
                            max_len=64)

  async def scenario():
    async with serving(target) as (_, _, stub):
      healthy = await open_session(stub, prompt=(5,), max_new_tokens=50)
      root = healthy.first_token
      victim = await open_session(stub, prompt=(9,), max_new_tokens=30)
      vroot = victim.first_token
      verify = lambda **kw: stub.Verify(pb.VerifyRequest(**kw))

      # Calls are built lazily (a grpc.aio call starts as soon as it is created).
      def victim_tree(**kw):
        fields = dict(session_id=victim.session_id, root_token=vroot) | kw
        return lambda: verify(**fields)

      def opening(**kw):
        return lambda: stub.OpenSession(pb.OpenSessionRequest(**kw))

      def opening_ids(**kw):
        return lambda: open_session(stub, **kw)

      invalid, precondition = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
      bad_calls = [
          (grpc.StatusCode.NOT_FOUND, victim_tree(session_id="nope"), "no open session"),
          (invalid, victim_tree(session_id=""), "empty"),
          (invalid, victim_tree(tokens=[1, 2], parents=[0]), "differ in length"),
          (invalid, victim_tree(tokens=[1, 2], parents=[0, 2]), "parents[1] = 2"),
          (invalid, victim_tree(tokens=[1], parents=[-1]), "parents[0] = -1"),
          (invalid, victim_tree(tokens=[VOCAB], parents=[0]), "outside the vocabulary"),
          (invalid, victim_tree(tokens=[-3], parents=[0]), "outside the vocabulary"),
          (invalid, victim_tree(root_token=-1), "root_token"),
          (invalid, victim_tree(tokens=list(range(1000)), parents=[0] * 1000), "at most 8"),
          # Caught by api.validate_tree after the field checks (distinct siblings).
          (invalid, victim_tree(tokens=[4, 4], parents=[0, 0]), "siblings"),
          (precondition, victim_tree(root_token=(vroot + 1) % VOCAB), "out of sync"),
          (invalid, opening(prompt_text="hi", prompt_token_ids=[1], max_new_tokens=4), "both"),
          (invalid, opening(max_new_tokens=4), "neither"),
          (precondition, opening(prompt_text="hi", max_new_tokens=4), "no tokenizer"),
          (invalid, opening_ids(prompt=(1, VOCAB + 5)), "outside the vocabulary"),
          (invalid, opening_ids(max_new_tokens=0), "max_new_tokens"),
          (invalid, opening_ids(max_new_tokens=60), "max_len"),
          (invalid, opening_ids(seed=-1), "seed"),
          (invalid, opening_ids(sampling=pb.SamplingParams(top_p=0.0)), "top_p"),
          (invalid, opening_ids(sampling=pb.SamplingParams(temperature=math.nan)), "temperature"),
          (invalid, opening_ids(sampling=pb.SamplingParams(top_k=-2)), "top_k"),
      ]
      for code, call, match in bad_calls:
        await expect_status(code, call(), match)
        # After every bad call the healthy session takes one correct step.
        tokens, parents = chain_tree(root, 1)
        response = await verify(session_id=healthy.session_id, root_token=root, tokens=tokens,
                                parents=parents)
        assert list(response.accepted_tokens) == tokens
        root = response.bonus_token
      # The victim of all those bad calls is intact too.
      tokens, parents = chain_tree(vroot, 1)
      response = await verify(session_id=victim.session_id, root_token=vroot, tokens=tokens,
                              parents=parents)
      assert list(response.emitted_tokens) == expected_output((9,), 3, VOCAB)[1:]

  run(scenario())


def test_one_verify_in_flight_per_session_and_close_aborts_a_pending_verify():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    # Static batching with a second, silent session: a's verify waits in the queue.
    async with serving(target, batching=BatchingConfig(mode="static", static_timeout_s=30)) as (
        server, _, stub):
      a = await open_session(stub, prompt=(1,))
      await open_session(stub, prompt=(2,))
      request = pb.VerifyRequest(session_id=a.session_id, root_token=a.first_token)
      pending = asyncio.ensure_future(stub.Verify(request))
      while not server.servicer.sessions[a.session_id].verify_in_flight:
        await asyncio.sleep(0.01)
      await expect_status(grpc.StatusCode.FAILED_PRECONDITION, stub.Verify(request), "in flight")
      await stub.CloseSession(pb.CloseSessionRequest(session_id=a.session_id))
      await expect_status(grpc.StatusCode.ABORTED, pending, "closed")

  run(scenario())
  assert target.verify_batch_sizes == []  # the aborted tree never reached the engine


def test_finished_session_refuses_verify_and_reports_eos():
  eos = successor(successor(4, VOCAB), VOCAB)  # the second generated token
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2,
                            eos_token_ids=(eos,))

  async def scenario():
    async with serving(target) as (_, _, stub):
      a = await open_session(stub, prompt=(4,), max_new_tokens=20)
      tokens, parents = chain_tree(a.first_token, 3)
      response = await stub.Verify(pb.VerifyRequest(session_id=a.session_id,
                                                    root_token=a.first_token, tokens=tokens,
                                                    parents=parents))
      assert list(response.emitted_tokens) == [eos]
      assert response.finished and response.finish_reason == "eos"
      await expect_status(grpc.StatusCode.FAILED_PRECONDITION, stub.Verify(pb.VerifyRequest(
          session_id=a.session_id, root_token=response.bonus_token)), "finished")
      one = await open_session(stub, prompt=(4,), max_new_tokens=1)
      assert one.finished and one.finish_reason == "length"

  run(scenario())


class ExplodingTarget(FakeTargetEngine):
  """Fails any batch holding a tree with token 13 (an engine bug, from the server's view)."""

  def verify(self, requests):
    if any(13 in tree.tokens[1:] for _, tree in requests):
      raise RuntimeError("device fell over")
    return super().verify(requests)


def test_an_engine_failure_fails_its_batch_only_and_the_server_keeps_serving():
  target = ExplodingTarget(vocab_size=VOCAB, num_slots=4, max_batch_size=1)

  async def scenario():
    async with serving(target) as (_, _, stub):
      a = await open_session(stub, prompt=(1,))
      b = await open_session(stub, prompt=(2,))
      await expect_status(grpc.StatusCode.INTERNAL, stub.Verify(pb.VerifyRequest(
          session_id=a.session_id, root_token=a.first_token, tokens=[13], parents=[0])),
                          "device fell over")
      await expect_status(grpc.StatusCode.FAILED_PRECONDITION, stub.Verify(pb.VerifyRequest(
          session_id=a.session_id, root_token=a.first_token)), "cannot continue")
      tokens, parents = chain_tree(b.first_token, 2)
      response = await stub.Verify(pb.VerifyRequest(session_id=b.session_id,
                                                    root_token=b.first_token, tokens=tokens,
                                                    parents=parents))
      assert list(response.accepted_tokens) == tokens
      await stub.CloseSession(pb.CloseSessionRequest(session_id=a.session_id))

  run(scenario())


def test_health_service_and_idle_session_reaping():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with serving(target, session_timeout_s=0.3) as (server, channel, stub):
      health = health_pb2_grpc.HealthStub(channel)
      for service in ("", "specedge.v1.Verifier"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
      a = await open_session(stub, prompt=(1,))
      await asyncio.sleep(0.8)
      assert a.session_id not in server.servicer.sessions
      await expect_status(grpc.StatusCode.NOT_FOUND, stub.Verify(pb.VerifyRequest(
          session_id=a.session_id, root_token=a.first_token)))
      await open_session(stub, prompt=(1,))
      await open_session(stub, prompt=(2,))  # both slots are free again

  run(scenario())


class FakeTokenizer:
  def encode(self, text):
    return [ord(c) % VOCAB for c in text]


def test_text_prompts_use_the_server_tokenizer():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with serving(target, tokenizer=FakeTokenizer()) as (_, channel, stub):
      opened = await stub.OpenSession(pb.OpenSessionRequest(prompt_text="abc",
                                                            max_new_tokens=4))
      assert list(opened.prompt_token_ids) == FakeTokenizer().encode("abc")
      assert opened.prompt_tokens == 3
      await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=1), channel,
                        DrafterConfig(max_concurrent_requests=1, max_new_tokens=6))
      (output,) = await drafter.run([EdgeRequest(request_id="t", prompt_text="xyz")])
      assert output.tokens == expected_output(FakeTokenizer().encode("xyz"), 6, VOCAB)

  run(scenario())
  assert target.opened_prompts[-1] == tuple(FakeTokenizer().encode("xyz"))


def test_drafter_retries_when_the_server_is_full():
  """Two edges, K=2 each, but only 2 server slots: requests queue on RESOURCE_EXHAUSTED."""
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with serving(target) as (_, channel, _):
      drafters = [Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=2), channel,
                          DrafterConfig(client_id=f"e{c}", max_concurrent_requests=2,
                                        max_new_tokens=7, open_retry_initial_s=0.005))
                  for c in range(2)]
      return await asyncio.gather(*(d.run(requests_for(c, 3)) for c, d in enumerate(drafters)))

  outputs = run(scenario())
  for c, client_outputs in enumerate(outputs):
    for request, output in zip(requests_for(c, 3), client_outputs):
      assert output.tokens == expected_output(request.prompt_ids, 7, VOCAB), output.error


def test_edge_device_runs_critical_jobs_before_proactive_ones_and_drops_cancelled_ones():
  import threading  # pylint: disable=g-import-not-at-top

  ran: list[str] = []
  gate = threading.Event()

  async def scenario():
    device = EdgeDevice(asyncio.get_running_loop(), client_id="e", event_log=EventLog(None, "x"))
    blocker = device.submit(gate.wait, op="draft")  # occupies the device
    proactive = device.submit(ran.append, "proactive", op="proactive",
                              priority=EdgeDevice.PROACTIVE)
    dropped = device.submit(ran.append, "dropped", op="proactive", priority=EdgeDevice.PROACTIVE)
    critical = device.submit(ran.append, "critical", op="draft")
    assert EdgeDevice.cancel(dropped)
    gate.set()
    await asyncio.gather(blocker.future, proactive.future, dropped.future, critical.future)
    assert not EdgeDevice.cancel(critical)  # already ran
    await asyncio.get_running_loop().run_in_executor(None, device.stop)
    return device

  device = run(scenario())
  assert ran == ["critical", "proactive"]
  busy = [e["op"] for e in device._events.events]  # pylint: disable=protected-access
  assert busy == ["draft", "draft", "proactive"]  # the dropped job never occupied the device


def test_proactive_drafting_runs_while_trees_are_in_flight():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2,
                            forward_delay_s=0.05)
  draft = FakeDraftEngine(vocab_size=VOCAB, num_slots=2, proactive=True)

  async def scenario():
    async with serving(target, batching=BatchingConfig(mode="dynamic")) as (_, channel, _):
      drafter = Drafter(draft, channel, DrafterConfig(max_concurrent_requests=2, proactive=True,
                                                      max_new_tokens=9))
      return await drafter.run(requests_for(0, 2))

  outputs = run(scenario())
  for request, output in zip(requests_for(0, 2), outputs):
    assert output.tokens == expected_output(request.prompt_ids, 9, VOCAB)
    assert output.proactive_hits[:-1] and all(output.proactive_hits[:-1])
  ops = [op for op, _ in draft.calls]
  # Every proactive job ran between its request's draft and commit.
  for slot in (0, 1):
    slot_ops = [op for op, s in draft.calls if s == slot and op != "open" and op != "close"]
    for i, op in enumerate(slot_ops):
      if op == "proactive":
        assert slot_ops[i - 1] == "draft" and slot_ops[i + 1] == "commit"
  assert ops.count("proactive") >= 4


def test_a_cancelled_verify_still_advances_its_session():
  """The client gives up on a Verify that is queued (static batching waits for b); the tree is
  still verified when the batch runs, and the session continues from the new root."""
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    async with serving(target, batching=BatchingConfig(mode="static", static_timeout_s=30)) as (
        server, _, stub):
      a = await open_session(stub, prompt=(1,), max_new_tokens=20)
      b = await open_session(stub, prompt=(2,), max_new_tokens=20)
      tokens, parents = chain_tree(a.first_token, 2)
      await expect_status(grpc.StatusCode.DEADLINE_EXCEEDED, stub.Verify(pb.VerifyRequest(
          session_id=a.session_id, root_token=a.first_token, tokens=tokens, parents=parents),
                                                                        timeout=0.2))
      b_response = await stub.Verify(pb.VerifyRequest(session_id=b.session_id,
                                                      root_token=b.first_token))
      while server.servicer.sessions[a.session_id].verify_in_flight:
        await asyncio.sleep(0.01)
      want = expected_output((1,), 6, VOCAB)  # first token, 2 accepted, bonus, then 2 more
      root = want[3]
      assert server.servicer.sessions[a.session_id].last_token == root
      tokens, parents = chain_tree(root, 1)
      response, _ = await asyncio.gather(
          stub.Verify(pb.VerifyRequest(session_id=a.session_id, root_token=root, tokens=tokens,
                                       parents=parents)),
          stub.Verify(pb.VerifyRequest(session_id=b.session_id,
                                       root_token=b_response.bonus_token)))
      assert list(response.emitted_tokens) == want[4:6]
      assert response.timing.batch_size == 2

  run(scenario())


def test_an_open_abandoned_by_its_client_frees_its_slot():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2, open_delay_s=0.3)

  async def scenario():
    async with serving(target) as (server, _, stub):
      await expect_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                          stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1],
                                                                 max_new_tokens=4), timeout=0.05))
      await asyncio.sleep(0.6)  # the open completes on the engine thread, then gets closed
      assert server.servicer.sessions == {}
      await open_session(stub, prompt=(1,))
      await open_session(stub, prompt=(2,))  # both slots are usable

  run(scenario())
  assert target.num_free_slots == 0 and len(target.opened_prompts) == 3
