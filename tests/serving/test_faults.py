"""Faults: a verifier restarted mid-run, a drafter that dies mid-request.

Against the hand-checkable fake engines: every request still ends with the target's own output,
and no token reaches the user twice or not at all (the streamed tokens equal the output); a dead
client's slot comes back within its lease while the other clients' verify latency stays near an
undisturbed run's.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import grpc

from specedge_jax.measure.events import EventLog
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.proto import specedge_pb2_grpc
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verifier import VerifierServer
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output

VOCAB = 50
# Reconnect quickly after the server comes back (gRPC's default first backoff is 1 s).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 200)]


def run(coro, timeout=60):
  return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def requests_for(client: int, n: int) -> list[EdgeRequest]:
  return [EdgeRequest(request_id=f"c{client}r{i}", prompt_ids=(client + 1, 7 * i + 3 + client))
          for i in range(n)]


def assert_exact_and_streamed(outputs, streamed: dict[str, list[int]], max_new: int) -> None:
  """Every request of `requests_for` ended with the target's own output, and its user saw
  exactly that stream: no token lost or repeated."""
  for output in outputs:
    assert output.error == "", output.error
    client, index = int(output.request_id[1]), int(output.request_id[3:])
    prompt = requests_for(client, 3)[index].prompt_ids
    assert output.tokens == expected_output(prompt, max_new, VOCAB), output.request_id
    assert streamed[output.request_id] == output.tokens, "a token was lost or repeated"


def test_every_request_survives_a_verifier_restart_with_no_token_lost_or_repeated():
  max_new = 40
  port = free_port()
  address = f"127.0.0.1:{port}"
  streamed: dict[str, list[int]] = {}
  edge_log = EventLog(None, "specedge")
  first = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4, forward_delay_s=0.01)

  def on_tokens(request_id, tokens, finished):
    streamed.setdefault(request_id, []).extend(tokens)

  async def scenario():
    server = VerifierServer(first, batching=BatchingConfig(mode="dynamic"))
    await server.start(address)
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    drafters = [Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2), channel,
                        DrafterConfig(client_id=f"edge{c}", max_concurrent_requests=2,
                                      max_new_tokens=max_new, rpc_timeout_s=5.0,
                                      open_retry_max_s=0.1, reconnect_give_up_s=20.0),
                        event_log=edge_log, on_tokens=on_tokens)
                for c in range(2)]
    running = asyncio.gather(*(d.run(requests_for(c, 3)) for c, d in enumerate(drafters)))
    while len(first.verify_batch_sizes) < 6:  # mid-run: some rounds done, most to come
      await asyncio.sleep(0.005)
    await server.stop(grace=None)  # the verifier dies with every session
    await asyncio.sleep(0.3)
    second = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)
    restarted = VerifierServer(second, batching=BatchingConfig(mode="dynamic"))
    await restarted.start(address)
    try:
      outputs = await running
    finally:
      await channel.close()
      await restarted.stop(grace=None)
    assert second.verify_batch_sizes, "the restarted verifier served the rest"
    assert second.num_free_slots == 4, "every resumed session was closed"
    return [o for per_drafter in outputs for o in per_drafter]

  outputs = run(scenario())
  assert len(outputs) == 6
  assert_exact_and_streamed(outputs, streamed, max_new)
  resumed = [e for e in edge_log.events if e["kind"] == "request_resumed"]
  assert resumed, "no request had to resume: the restart came too late to test anything"


def test_a_dead_drafter_frees_its_slot_within_the_lease_and_barely_slows_the_others():
  lease, static_timeout = 0.6, 0.3

  async def verify_waits(with_dead_client: bool):
    target = FakeTargetEngine(vocab_size=VOCAB, num_slots=3, max_batch_size=3,
                              forward_delay_s=0.005)
    server = VerifierServer(target, batching=BatchingConfig(mode="static",
                                                            static_timeout_s=static_timeout),
                            session_timeout_s=lease)
    port = await server.start("127.0.0.1:0")
    edge_log = EventLog(None, "specedge")
    try:
      async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        freed_after = None
        if with_dead_client:
          # A drafter killed mid-request: its session is open, and no call ever comes again.
          stub = specedge_pb2_grpc.VerifierStub(channel)
          await stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[9, 9],
                                                       max_new_tokens=30, client_id="dead"))
          died = time.monotonic()
        drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=1, correct_depth=1),
                          channel, DrafterConfig(client_id="alive", max_concurrent_requests=1,
                                                 max_new_tokens=60),
                          event_log=edge_log)
        (output,) = await drafter.run([EdgeRequest(request_id="r", prompt_ids=(1, 2))])
        assert output.tokens == expected_output((1, 2), 60, VOCAB)
        if with_dead_client:
          while target.num_free_slots < 3:
            await asyncio.sleep(0.02)
            assert time.monotonic() - died < lease + 1.5, "the dead client's slot was kept"
          freed_after = time.monotonic() - died
    finally:
      await server.stop(grace=None)
    waits = [e["wait_time_s"] for e in edge_log.events
             if e["kind"] == "request_step" and e.get("phase") == "verify"]
    return waits, freed_after

  async def scenario():
    undisturbed, _ = await verify_waits(False)
    disturbed, freed_after = await verify_waits(True)
    return undisturbed, disturbed, freed_after

  undisturbed, disturbed, freed_after = run(scenario())
  assert freed_after is not None and freed_after >= lease * 0.9
  # One bounded wait for the dead session at most, then rounds as fast as before.
  assert sum(w > static_timeout * 0.8 for w in disturbed) <= 1, disturbed
  assert statistics.median(disturbed) <= 2 * statistics.median(undisturbed) + 0.005, (
      statistics.median(disturbed), statistics.median(undisturbed))


def test_outputs_are_unchanged_under_injected_delays_drops_reordering_and_cuts():
  from specedge_jax.testing.fault_proxy import FaultProxy, Faults

  max_new = 30
  streamed: dict[str, list[int]] = {}
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=8, max_batch_size=4,
                            forward_delay_s=0.002)
  faults = Faults(delay_p=0.5, max_delay_s=0.02, drop_request_p=0.05, drop_reply_p=0.05,
                  cut_before_p=0.05, cut_after_p=0.05)

  def on_tokens(request_id, tokens, finished):
    streamed.setdefault(request_id, []).extend(tokens)

  async def scenario():
    server = VerifierServer(target, batching=BatchingConfig(mode="dynamic"),
                            session_timeout_s=5.0)
    port = await server.start("127.0.0.1:0")
    proxy = FaultProxy(f"127.0.0.1:{port}", faults, seed=3)
    proxy_port = await proxy.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy_port}", options=CHANNEL_OPTIONS)
    try:
      drafters = [Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2),
                          channel,
                          DrafterConfig(client_id=f"edge{c}", max_concurrent_requests=2,
                                        max_new_tokens=max_new, rpc_timeout_s=0.3,
                                        verify_retries=4, verify_retry_initial_s=0.01,
                                        open_retry_max_s=0.05, reconnect_give_up_s=20.0),
                          on_tokens=on_tokens)
                  for c in range(2)]
      outputs = await asyncio.gather(*(d.run(requests_for(c, 3))
                                       for c, d in enumerate(drafters)))
    finally:
      await channel.close()
      await proxy.stop()
      await server.stop(grace=None)
    return [o for per_drafter in outputs for o in per_drafter], proxy.counts

  outputs, counts = run(scenario(), timeout=120)
  assert counts.faults >= 10, f"too few faults to test anything: {counts}"
  assert_exact_and_streamed(outputs, streamed, max_new)


def test_a_draining_verifier_finishes_open_sessions_and_admits_no_new_ones():
  from grpc_health.v1 import health_pb2, health_pb2_grpc

  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4,
                            forward_delay_s=0.01)

  async def scenario():
    server = VerifierServer(target, batching=BatchingConfig(mode="dynamic"))
    port = await server.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=1, correct_depth=1),
                        channel, DrafterConfig(max_concurrent_requests=1, max_new_tokens=40))
      serving = asyncio.ensure_future(drafter.run([EdgeRequest(request_id="r", prompt_ids=(3,))]))
      while not target.verify_batch_sizes:  # the request is mid-way
        await asyncio.sleep(0.005)
      draining = asyncio.ensure_future(server.drain(timeout_s=20.0))
      await asyncio.sleep(0.05)
      stub = specedge_pb2_grpc.VerifierStub(channel)
      try:
        await stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1], max_new_tokens=4))
        raise AssertionError("a draining verifier admitted a session")
      except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "going away" in e.details()
      health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
      assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
      (output,) = await serving
      left = await asyncio.wait_for(draining, timeout=5.0)  # it ends when the last session does
    await server.stop(grace=None)
    return output, left

  output, left = run(scenario())
  assert left == 0
  assert output.error == "" and output.tokens == expected_output((3,), 40, VOCAB)
