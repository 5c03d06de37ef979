"""The speculative first round (the reference's): the edge drafts on prompt[:-1] rooted at the
last prompt token and the verifier prefills and verifies that tree inside OpenSession.

Against the fake engines (known outputs): exact, streamed without loss or repetition, one verify
per round with none for a bare prefill, a retried open replays its first round, a verifier
restart resumes exactly, and bad first trees are refused without holding a slot. The real
engines' greedy equivalence is in test_serving_engines.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.proto import specedge_pb2 as pb
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.testing.fakes import (FakeDraftEngine, FakeTargetEngine, expected_output,
                                        successor)
from specedge_jax.testing.servers import running_verifier

VOCAB = 50
MAX_NEW = 20


def run(coro, timeout=60):
  return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


def requests(n: int) -> list[EdgeRequest]:
  return [EdgeRequest(request_id=f"r{i}", prompt_ids=(2, 5 * i + 3)) for i in range(n)]


def test_first_round_is_verified_in_the_open_and_every_output_is_exact():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)
  streamed: dict[str, list[int]] = {}

  async def scenario():
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic")) as (_, ch, _):
      drafter = Drafter(
          FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2), ch,
          DrafterConfig(max_concurrent_requests=2, max_new_tokens=MAX_NEW,
                        speculative_first_round=True),
          on_tokens=lambda rid, tokens, _: streamed.setdefault(rid, []).extend(tokens))
      return await drafter.run(requests(4))

  outputs = run(scenario())
  for i, output in enumerate(outputs):
    assert output.error == ""
    assert output.tokens == expected_output((2, 5 * i + 3), MAX_NEW, VOCAB)
    assert streamed[output.request_id] == output.tokens
    # The first round already accepted the draft's correct depth: 2 accepted + the bonus.
    assert output.accepted_depths[0] == 2
  # No round is a bare prefill: every server forward that emitted tokens was a verify.
  rounds = sum(o.steps for o in outputs)
  assert sum(target.verify_batch_sizes) == rounds
  assert len(target._free) == 4  # every slot came back


def open_request(**fields) -> pb.OpenSessionRequest:
  base = dict(prompt_token_ids=[2, 7], max_new_tokens=MAX_NEW, client_id="edge0",
              first_tree=pb.FirstTree(tokens=[successor(7, VOCAB)], parents=[0]))
  base.update(fields)
  return pb.OpenSessionRequest(**base)


def test_a_retried_speculative_open_replays_its_first_round():
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=2, max_batch_size=2)

  async def scenario():
    async with running_verifier(target) as (server, _, stub):
      first = await stub.OpenSession(open_request(request_id="same"))
      again = await stub.OpenSession(open_request(request_id="same"))
      return first, again, len(server.servicer.sessions), list(target.verify_batch_sizes)

  first, again, sessions, batches = run(scenario())
  assert first.session_id == again.session_id and sessions == 1
  assert list(first.first_round.accepted_tokens) == [successor(7, VOCAB)]
  assert list(first.first_round.emitted_tokens) == expected_output((7,), 2, VOCAB)
  assert again.first_round == first.first_round
  assert first.first_token == 7  # the root, not an emitted token
  assert batches == [1]  # the retry verified nothing again


@pytest.mark.parametrize("fields,message", [
    (dict(prompt_token_ids=[], prompt_text="hello"), "first_tree needs prompt_token_ids"),
    (dict(prompt_token_ids=[7]), "at least 2 tokens"),
    (dict(first_tree=pb.FirstTree(tokens=[3, 4], parents=[0, 2])), "parents[1] = 2"),
    (dict(first_tree=pb.FirstTree(tokens=[3], parents=[])), "differ in length"),
    (dict(first_tree=pb.FirstTree(tokens=[VOCAB + 1], parents=[0])), "outside the vocabulary"),
    (dict(resume_tokens=[9], resume_rounds=0), "no resume_tokens"),
])
def test_bad_first_trees_are_refused_without_holding_a_slot(fields, message):
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=1, max_batch_size=1)

  async def scenario():
    async with running_verifier(target) as (server, _, stub):
      with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.OpenSession(open_request(**fields))
      good = await stub.OpenSession(open_request(request_id="good"))  # the one slot is free
      return refused.value, good, len(server.servicer.sessions)

  error, good, sessions = run(scenario())
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert message in error.details()
  assert good.session_id and sessions == 1


def test_requests_resume_exactly_after_a_verifier_restart_with_a_speculative_first_round():
  max_new = 40
  streamed: dict[str, list[int]] = {}
  first = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4, forward_delay_s=0.01)
  second = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)

  async def scenario():
    from specedge_jax.serving.verifier import VerifierServer  # pylint: disable=g-import-not-at-top

    server = VerifierServer(first, batching=BatchingConfig(mode="dynamic"))
    port = await server.start("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address, options=[
        ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)])
    drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB, num_slots=2, correct_depth=2), channel,
                      DrafterConfig(max_concurrent_requests=2, max_new_tokens=max_new,
                                    speculative_first_round=True, rpc_timeout_s=5.0,
                                    open_retry_max_s=0.1, reconnect_give_up_s=20.0),
                      on_tokens=lambda rid, t, _: streamed.setdefault(rid, []).extend(t))
    running = asyncio.ensure_future(drafter.run(requests(3)))
    while len(first.verify_batch_sizes) < 4:
      await asyncio.sleep(0.005)
    await server.stop(grace=None)
    restarted = VerifierServer(second, batching=BatchingConfig(mode="dynamic"))
    await restarted.start(address)
    try:
      return await running
    finally:
      await channel.close()
      await restarted.stop(grace=None)

  outputs = run(scenario())
  for i, output in enumerate(outputs):
    assert output.error == ""
    assert output.tokens == expected_output((2, 5 * i + 3), max_new, VOCAB)
    assert streamed[output.request_id] == output.tokens, "a token was lost or repeated"
  assert second.opened_prompts, "nothing was resumed on the restarted verifier"
