"""The drafter as a long-lived service (`start`, `submit`, `RequestStream`, `stop`): the backend
of the HTTP API. Against the fake engines, whose outputs are known: streamed rounds concatenate
to the target's own output, K run and a bounded queue waits, a full queue is refused, and a
cancelled request frees its draft slot and its server session at once while the others go on.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specedge_jax.api import SamplingParams
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest, QueueFull
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output
from specedge_jax.testing.servers import running_verifier

VOCAB = 50


def run(coro, timeout=60):
  return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


def request(i: int, **kwargs) -> EdgeRequest:
  return EdgeRequest(request_id=f"r{i}", prompt_ids=(1, 7 * i + 3), **kwargs)


async def collect(stream) -> list:
  return [update async for update in stream]


def make_drafter(channel, *, k=2, queue=2, max_new=24, correct_depth=2):
  engine = FakeDraftEngine(vocab_size=VOCAB, num_slots=k, correct_depth=correct_depth)
  drafter = Drafter(engine, channel, DrafterConfig(
      client_id="edge0", max_concurrent_requests=k, max_queued_requests=queue,
      max_new_tokens=max_new, rpc_timeout_s=5.0, open_give_up_s=2.0))
  return drafter, engine


def test_submitted_requests_stream_one_update_per_round_that_add_up_to_the_target_output():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic")) as (_, ch, _):
      drafter, _ = make_drafter(ch, correct_depth=2)
      await drafter.start()
      try:
        streams = [drafter.submit(request(i, max_new_tokens=10 + i)) for i in range(3)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        outputs = [await s.closed() for s in streams]
        return results, outputs
      finally:
        await drafter.stop()

  results, outputs = run(scenario())
  for i, (updates, output) in enumerate(zip(results, outputs)):
    tokens = [t for u in updates for t in u.tokens]
    assert tokens == expected_output((1, 7 * i + 3), 10 + i, VOCAB)  # per-request max_new_tokens
    assert [u.round for u in updates] == list(range(len(updates)))
    assert updates[0].tokens and updates[0].accepted == 0 and updates[0].tree_size == 0
    # The fake draft gets `correct_depth` tokens right: each full round accepts 2, emits 3.
    assert all(u.accepted == 2 and len(u.tokens) == 3 for u in updates[1:-1])
    assert [u.finished for u in updates] == [False] * (len(updates) - 1) + [True]
    assert updates[-1].finish_reason == "length"
    assert output is not None and output.tokens == tokens


def test_k_run_the_queue_waits_and_a_request_beyond_it_is_refused():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4,
                            forward_delay_s=0.02)

  async def scenario():
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic")) as (_, ch, _):
      drafter, _ = make_drafter(ch, k=2, queue=2, max_new=12)
      await drafter.start()
      try:
        streams = [drafter.submit(request(i)) for i in range(4)]
        stats = drafter.stats()
        with pytest.raises(QueueFull, match="2 requests are running .* 2 are queued"):
          drafter.submit(request(4))
        results = await asyncio.gather(*(collect(s) for s in streams))
        for s in streams:
          await s.closed()  # a place is held until the request's slots are freed
        after = drafter.stats()
        drafter.submit(request(5))  # room again
        return stats, results, after
      finally:
        await drafter.stop()

  stats, results, after = run(scenario())
  # Just submitted: none has taken its place yet, all four count as waiting.
  assert stats == dict(running=0, queued=4, free_slots=2, max_running=2, max_queued=2)
  for i, updates in enumerate(results):
    assert [t for u in updates for t in u.tokens] == expected_output((1, 7 * i + 3), 12, VOCAB)
  assert after["running"] == 0 and after["queued"] == 0 and after["free_slots"] == 2


def test_a_cancelled_request_frees_its_slots_on_both_sides_and_the_others_finish_exactly():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4,
                            forward_delay_s=0.03)

  async def scenario():
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic")) as (
        server, ch, _):
      drafter, draft_engine = make_drafter(ch, k=2, max_new=40)
      await drafter.start()
      try:
        doomed, kept = drafter.submit(request(0)), drafter.submit(request(1))
        seen = []
        async for update in doomed:
          seen.append(update)
          if len(seen) == 3:
            break
        sessions_before = len(server.servicer.sessions)
        await doomed.cancel()
        await doomed.cancel()  # idempotent
        assert [u async for u in doomed] == []  # nothing more after a cancel
        assert await doomed.closed() is None  # cancelled: no output, and its clean-up is done
        deadline = asyncio.get_running_loop().time() + 5
        while len(server.servicer.sessions) > 1 or len(draft_engine._free) < 1:
          assert asyncio.get_running_loop().time() < deadline, "slots were not freed"
          await asyncio.sleep(0.01)
        freed_while_other_runs = (len(server.servicer.sessions), drafter.stats()["running"])
        kept_updates = await collect(kept)
        return seen, sessions_before, freed_while_other_runs, kept_updates, doomed
      finally:
        await drafter.stop()

  seen, sessions_before, freed, kept_updates, doomed = run(scenario())
  assert sessions_before == 2
  assert freed == (1, 1)  # the cancelled one's session is gone, the other still runs
  assert [t for u in seen for t in u.tokens] == expected_output((1, 3), 40, VOCAB)[
      :sum(len(u.tokens) for u in seen)]
  assert [t for u in kept_updates for t in u.tokens] == expected_output((1, 10), 40, VOCAB)
  assert target.num_slots - len(target._free) == 0  # every server slot came back


def test_stop_cancels_what_runs_and_frees_every_slot():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4,
                            forward_delay_s=0.03)

  async def scenario():
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic")) as (
        server, ch, _):
      drafter, draft_engine = make_drafter(ch, k=2, max_new=200)
      await drafter.start()
      streams = [drafter.submit(request(i)) for i in range(3)]
      await streams[0].__anext__()
      await drafter.stop()
      await asyncio.sleep(0.05)
      return len(server.servicer.sessions), len(draft_engine._free), drafter.stats()

  sessions, free_draft, stats = run(scenario())
  assert sessions == 0 and free_draft == 2
  assert stats["running"] == 0 and stats["queued"] == 0


def test_a_verifier_that_is_down_ends_the_stream_with_an_unavailable_error():
  async def scenario():
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:  # nothing listens there
      drafter, _ = make_drafter(channel)
      await drafter.start()
      try:
        return await collect(drafter.submit(request(0, sampling=SamplingParams(temperature=0.7))))
      finally:
        await drafter.stop()

  updates = run(scenario())
  assert len(updates) == 1 and updates[0].finished and updates[0].finish_reason == "error"
  assert updates[0].error_code == "UNAVAILABLE" and "OpenSession" in updates[0].error


def test_submit_before_start_is_refused():
  async def scenario():
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
      drafter, _ = make_drafter(channel)
      with pytest.raises(RuntimeError, match="before start"):
        drafter.submit(request(0))

  run(scenario())


def test_a_live_request_clock_starts_at_submission_so_ttft_holds_its_queue_wait():
  from specedge_jax.measure.events import EventLog  # pylint: disable=g-import-not-at-top
  from specedge_jax.measure import metrics  # pylint: disable=g-import-not-at-top

  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2,
                            forward_delay_s=0.02)
  log = EventLog(None, "specedge")

  async def scenario():
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic")) as (_, ch, _):
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=1), ch,
                        DrafterConfig(max_concurrent_requests=1, max_queued_requests=1,
                                      max_new_tokens=12), event_log=log)
      await drafter.start()
      try:
        first, second = drafter.submit(request(0)), drafter.submit(request(1))
        await asyncio.gather(collect(first), collect(second))
      finally:
        await drafter.stop()

  run(scenario())
  starts = {e["request_id"]: e for e in log.events if e["kind"] == "request_start"}
  ends = {e["request_id"]: e for e in log.events if e["kind"] == "request_end"}
  assert starts["r0"]["queue_wait_s"] < starts["r1"]["queue_wait_s"]  # r0 took the place at once
  # r1 arrived with r0 and took the place only once r0 had ended: its wait spans r0's request.
  assert starts["r1"]["t"] <= starts["r0"]["t"] + 0.05
  assert starts["r1"]["t"] + starts["r1"]["queue_wait_s"] >= ends["r0"]["t"]
  _, (summary,) = metrics.summarize_events(log.events)
  second = next(r for r in metrics.summarize_events(log.events)[0][0].requests
                if r.request_id == "r1")
  assert second.ttft_s > starts["r1"]["queue_wait_s"]  # the report's TTFT includes the wait
  assert summary.requests.n_requests == 2
