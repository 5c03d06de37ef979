"""SLO-aware admission (serving/slo_admission.py): the capacity falls when a session's measured
ITL misses its SLO and climbs back when every session has room, only while it binds; over gRPC,
opens past it queue for admission instead of sharing batches, and get in when it rises or a
session closes."""

from __future__ import annotations

import asyncio

import pytest

from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving import slo_admission
from specedge_jax.serving.slo_admission import AdmissionConfig, SloAdmission
from specedge_jax.testing.fakes import FakeTargetEngine, successor
from specedge_jax.testing.servers import running_verifier

SLO = 0.030
FAST = AdmissionConfig(cooldown_s=0.0, warmup_rounds=2, smoothing=1.0)


def answer_every(admission, sessions, itl_s, rounds, *, start=0.0, held=None, waiting=False,
                 queue_s=None):
  """Each session answers `rounds` times, one token each, `itl_s` apart, of which `queue_s`
  (default: all but 1 ms) in the verifier's queue; returns the end time."""
  now = start
  for _ in range(rounds):
    now += itl_s
    for name in sessions:
      admission.answered(name, emitted=1, now=now, held=len(sessions) if held is None else held,
                         waiting=waiting, queue_s=max(itl_s - 0.001, 0.0) if queue_s is None
                         else queue_s)
  return now


def test_a_violation_cuts_the_capacity_and_room_for_all_raises_it_while_it_binds():
  admission = SloAdmission(8, FAST)
  sessions = [f"s{i}" for i in range(8)]
  for name in sessions:
    admission.opened(name, itl_slo_s=SLO, now=0.0)
  answer_every(admission, sessions[:1], 0.010, 1)  # one round: still warming up
  assert admission.capacity == 8
  now = answer_every(admission, sessions, 2 * SLO, 2)  # everyone over the SLO
  assert admission.capacity < 8
  cut = admission.capacity
  assert admission.itl_s("s0") == pytest.approx(2 * SLO)
  # Back under (1 - headroom) x SLO, but nobody waits and the capacity is not full: no change.
  for name in sessions[cut:]:
    admission.forget(name)
  now = answer_every(admission, sessions[:cut], 0.5 * SLO, 2, start=now, held=cut - 1)
  assert admission.capacity == cut
  # Opens are waiting: one more at a time, up to the slots.
  answer_every(admission, sessions[:cut], 0.5 * SLO, 40, start=now, held=cut, waiting=True)
  assert admission.capacity == 8


def test_a_session_its_own_edge_makes_miss_cuts_nothing_and_blocks_no_raise():
  admission = SloAdmission(4, FAST)
  for name in ("far", "near"):
    admission.opened(name, itl_slo_s=SLO, now=0.0)
  # "far" misses with no queue at all (its RTT alone is over the SLO): no cut.
  now = answer_every(admission, ["far"], 2 * SLO, 3, queue_s=0.0)
  now = answer_every(admission, ["near"], 0.5 * SLO, 3, start=now, queue_s=0.0)
  assert admission.capacity == 4
  # "near" queues past its SLO: a cut.
  now = answer_every(admission, ["near"], 2 * SLO, 2, start=now, held=4)
  cut = admission.capacity
  assert cut < 4
  # "near" has room again while opens wait: a raise, though "far" is still over its SLO.
  now = answer_every(admission, ["near"], 0.5 * SLO, 2, start=now, queue_s=0.0, held=cut,
                     waiting=True)
  raised = admission.capacity
  assert raised > cut and admission.itl_s("far") > SLO
  # And "far" missing again, with no queue, cuts nothing.
  answer_every(admission, ["far"], 2 * SLO, 2, start=now, queue_s=0.0, held=raised)
  assert admission.capacity == raised


def test_the_floor_the_cooldown_and_sessions_without_an_slo():
  admission = SloAdmission(4, AdmissionConfig(cooldown_s=1.0, warmup_rounds=1, smoothing=1.0,
                                              min_sessions=2))
  admission.opened("no_slo", itl_slo_s=0.0, now=0.0)
  admission.opened("a", itl_slo_s=SLO, now=0.0)
  answer_every(admission, ["no_slo"], 10.0, 3)
  assert admission.capacity == 4 and admission.itl_s("no_slo") is None  # not counted
  # 100 ms per token, 90 of them queueing: over the SLO because of load.
  assert admission.answered("a", emitted=1, now=0.1, held=4, waiting=False, queue_s=0.09)
  assert admission.capacity == 3
  assert not admission.answered("a", emitted=1, now=0.2, held=3, waiting=False,
                                queue_s=0.09)  # cooling down
  admission.answered("a", emitted=1, now=1.3, held=3, waiting=False, queue_s=1.1)
  admission.answered("a", emitted=1, now=2.5, held=2, waiting=False, queue_s=1.19)
  assert admission.capacity == 2  # never below min_sessions
  # Lost to its own edge (no queue), with nobody else to judge the load by: no raise either.
  admission.answered("a", emitted=1, now=4.0, held=2, waiting=True, queue_s=0.0)
  assert admission.capacity == 2
  with pytest.raises(ValueError, match="min_sessions"):
    AdmissionConfig(min_sessions=0)
  with pytest.raises(ValueError, match="max_sessions"):
    SloAdmission(0)


def test_a_marginal_session_cuts_nothing():
  """A session whose own time (ITL less queue) leaves it under `own_margin` of its SLO for
  queueing would need a near-empty server: it triggers no cut, and does not block a raise."""
  admission = SloAdmission(8, FAST)  # own_margin 0.25
  for name in ("marginal", "roomy"):
    admission.opened(name, itl_slo_s=SLO, now=0.0)
  # 0.8 x SLO of its own, over the SLO with 0.3 x SLO of queue: no cut.
  now = answer_every(admission, ["marginal"], 1.1 * SLO, 3, held=8, queue_s=0.3 * SLO)
  assert admission.capacity == 8
  # 0.5 x SLO of its own, over the SLO with the same queue time: it can be saved, so a cut.
  now = answer_every(admission, ["roomy"], 1.1 * SLO, 2, start=now, held=8,
                     queue_s=0.6 * SLO)
  cut = admission.capacity
  assert cut < 8
  # "roomy" has room again while opens wait: a raise, "marginal" still over its SLO.
  answer_every(admission, ["roomy"], 0.5 * SLO, 2, start=now, held=cut, waiting=True,
               queue_s=0.0)
  assert admission.capacity > cut and admission.itl_s("marginal") > SLO
  with pytest.raises(ValueError, match="own_margin"):
    AdmissionConfig(own_margin=1.0)


def test_the_servers_policy_never_holds_fewer_than_one_batch():
  admission = slo_admission.for_server(16, 4, FAST)
  assert admission.max_sessions == 16 and admission.config.min_sessions == 4
  sessions = [f"s{i}" for i in range(16)]
  for name in sessions:
    admission.opened(name, itl_slo_s=SLO, now=0.0)
  answer_every(admission, sessions, 3 * SLO, 20)  # all over by load, round after round
  assert admission.capacity == 4
  assert slo_admission.for_server(2, 4).config.min_sessions == 2  # at most the slots


def test_opens_past_the_slo_capacity_queue_and_are_admitted_when_it_rises():
  vocab = 50
  target = FakeTargetEngine(vocab_size=vocab, num_slots=4, max_batch_size=4)
  admission = SloAdmission(4, AdmissionConfig(cooldown_s=0.0, warmup_rounds=1, smoothing=1.0))

  async def scenario():
    # Static batching waits up to 200 ms for every due session: "tight"'s round queues there.
    async with running_verifier(target, admission_queue=4, slo_admission=admission,
                                batching=BatchingConfig(mode="static",
                                                        static_timeout_s=0.2)) as (server, _, stub):
      async def verify(session):
        root = session.first_token if session.first_token else 0
        await stub.Verify(pb.VerifyRequest(session_id=session.session_id, root_token=root,
                                           tokens=[successor(root, vocab)], parents=[0]))

      # "tight" has a 50 ms SLO; "loose" one every round meets (10 s).
      tight, loose = [await stub.OpenSession(pb.OpenSessionRequest(
          prompt_token_ids=[i + 1], max_new_tokens=32, itl_slo_ms=slo_ms, request_id=name))
          for i, (name, slo_ms) in enumerate((("tight", 50), ("loose", 10_000)))]
      # Its round waits 200 ms for "loose", which sends nothing: over its SLO because of the
      # queue (a few ms without it), so the capacity falls below two.
      await verify(tight)
      assert admission.capacity == 1
      queued = asyncio.ensure_future(stub.OpenSession(pb.OpenSessionRequest(
          prompt_token_ids=[9], max_new_tokens=32, request_id="late")))
      await asyncio.sleep(0.3)
      assert not queued.done()  # two held, capacity one: it waits, it is not refused
      assert server.servicer.free_slots == 0 and server.servicer.admission_queue_length == 1
      await stub.CloseSession(pb.CloseSessionRequest(session_id=tight.session_id))
      await asyncio.sleep(0.1)
      assert not queued.done()  # one held is the capacity
      # The session left meets its SLO with room while an open waits: the capacity rises and
      # the queued open is let in, with no close.
      await verify(loose)
      assert admission.capacity == 2
      opened = await asyncio.wait_for(queued, 10)
      assert opened.session_id

  asyncio.run(asyncio.wait_for(scenario(), timeout=60))
