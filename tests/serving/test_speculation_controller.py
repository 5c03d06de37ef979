"""The speculation controller's advice moves the right way on synthetic traces, stays within the
edge's caps, and the draft engine follows it (issue 15)."""

import numpy as np
import pytest

from specedge_jax import api
from specedge_jax import engine as E
from specedge_jax.serving.speculation_controller import (ControllerConfig, RoundObservation,
                                                         SpeculationController)
from specedge_jax.testing import tiny_models

CAPS = api.TreeParams(max_n_beams=8, max_beam_len=6, max_branch_width=4, max_budget=32)


def trained(accepted_per_round, rounds=40, caps=CAPS, config=ControllerConfig(), **timing):
  controller = SpeculationController(caps, config)
  for i in range(rounds):
    accepted = accepted_per_round[i % len(accepted_per_round)]
    controller.observe("s", RoundObservation(tree_depth=caps.max_beam_len, accepted=accepted,
                                             **timing))
  return controller


def test_depth_follows_acceptance():
  good = trained([6, 5, 6, 4])  # the draft agrees deep into the tree
  poor = trained([0, 1, 0, 0])  # the first or second token is usually wrong
  assert good.advise("s").depth == CAPS.max_beam_len
  assert poor.advise("s").depth == 1
  middling = trained([2, 3, 0, 2])
  assert 1 < middling.advise("s").depth < CAPS.max_beam_len
  # Conditional acceptance: depth 1 survives in 3 rounds of 4 in `middling`.
  assert middling.reach("s")[0] == pytest.approx(0.75, abs=0.1)


def test_a_long_rtt_asks_for_deeper_trees():
  trace = [1, 2, 0, 3, 1, 2]
  near = trained(trace, rtt_s=0.002, server_s=0.02, draft_step_s=0.005)
  far = trained(trace, rtt_s=0.2, server_s=0.02, draft_step_s=0.005)
  assert far.advise("s").depth > near.advise("s").depth


def test_a_full_queue_shrinks_the_budget_but_never_below_the_depth():
  controller = trained([6, 5, 6, 4])
  idle = controller.advise("s", queue_fraction=0.0)
  busy = controller.advise("s", queue_fraction=1.0)
  assert idle.budget == CAPS.max_budget
  assert busy.depth <= busy.budget < idle.budget
  assert controller.advise("s", queue_fraction=5.0) == busy  # clipped at a full batch


def test_a_tight_slo_with_slow_drafting_trades_depth_for_latency():
  trace = [2, 3, 1, 2, 4]
  loose = trained(trace, config=ControllerConfig(itl_slo_s=1.0), rtt_s=0.01, server_s=0.02,
                  draft_step_s=0.05)
  tight = trained(trace, config=ControllerConfig(itl_slo_s=0.045), rtt_s=0.01, server_s=0.02,
                  draft_step_s=0.05)
  assert tight.advise("s").depth < loose.advise("s").depth


def test_under_a_full_queue_only_sessions_with_slo_slack_give_nodes_back():
  trace = [3, 2, 4, 3]
  config = ControllerConfig(itl_slo_s=0.030)
  relaxed = trained(trace, config=config, rtt_s=0.005, server_s=0.005, draft_step_s=0.001)
  pressed = trained(trace, config=config, rtt_s=0.120, server_s=0.010, draft_step_s=0.001)
  assert relaxed.estimated_itl_s("s", relaxed.advise("s").depth) < 0.5 * 0.030
  assert pressed.estimated_itl_s("s", pressed.advise("s").depth) > 0.030
  relaxed_busy = relaxed.advise("s", queue_fraction=1.0)
  assert relaxed_busy.budget < CAPS.max_budget  # slack: it shrinks as without an SLO
  assert relaxed_busy == trained(trace, rtt_s=0.005, server_s=0.005,
                                 draft_step_s=0.001).advise("s", queue_fraction=1.0)
  # Over its SLO, a session keeps its whole budget: each round already pays 120 ms of RTT.
  assert pressed.advise("s", queue_fraction=1.0).budget == CAPS.max_budget
  with pytest.raises(ValueError, match="slack_for_full_shrink"):
    ControllerConfig(slack_for_full_shrink=0.0)


def test_the_budget_follows_what_the_verifier_keeps_and_lifts_when_cuts_stop():
  # The session of the test above that keeps its whole budget over its SLO, but now its verifier
  # cuts every tree to 5 of the 32 nodes sent (a compute-bound verify): drafting more is waste.
  trace = [3, 2, 4, 3]
  config = ControllerConfig(itl_slo_s=0.030)
  controller = trained(trace, config=config, rtt_s=0.120, server_s=0.010, draft_step_s=0.001)
  assert controller.advise("s", queue_fraction=1.0).budget == CAPS.max_budget
  never_cut = trained(trace, config=config, rtt_s=0.120, server_s=0.010, draft_step_s=0.001,
                      sent_nodes=32, kept_nodes=32)
  assert never_cut.advise("s", queue_fraction=1.0).budget == CAPS.max_budget  # no cap at all
  for _ in range(30):
    controller.observe("s", RoundObservation(tree_depth=4, accepted=2, rtt_s=0.120,
                                             server_s=0.010, draft_step_s=0.001,
                                             sent_nodes=32, kept_nodes=5))
  capped = controller.advise("s", queue_fraction=1.0)
  assert capped.budget == 5 and capped.depth <= 5
  assert controller.advise("s", queue_fraction=0.0).budget == 5  # a cap, whatever the queue
  # The cuts stop: each whole tree probes upwards (about 10 % a round), and the cap is gone
  # within two dozen rounds (5 -> 32 nodes).
  budgets = []
  for _ in range(24):
    sent = controller.advise("s").budget
    controller.observe("s", RoundObservation(tree_depth=4, accepted=2, rtt_s=0.120,
                                             server_s=0.010, draft_step_s=0.001,
                                             sent_nodes=sent, kept_nodes=sent))
    budgets.append(controller.advise("s").budget)
  assert budgets == sorted(budgets) and budgets[0] >= 5
  assert budgets[-1] == CAPS.max_budget
  assert controller.advise("s", queue_fraction=1.0).budget == CAPS.max_budget  # no cap left


def test_an_slo_no_depth_meets_gets_the_depth_with_the_least_time_per_token():
  # A 100 ms round trip dominates: no tree meets 10 ms per token, and depth 1 (one round trip
  # per ~1.7 tokens) would be the worst choice; the deepest tree amortizes the round trip best.
  trace = [6, 5, 6, 4]
  controller = trained(trace, config=ControllerConfig(itl_slo_s=0.010), rtt_s=0.1,
                       server_s=0.01, draft_step_s=0.001)
  limits = controller.advise("s")
  per_token = lambda d: (0.1 + 0.01 + 0.001 * d) / controller.expected_tokens("s", d)
  best = min(range(1, CAPS.max_beam_len + 1), key=per_token)
  assert per_token(1) > per_token(best) > 0.010  # the SLO is out of reach at every depth
  assert limits.depth == best > 1


def test_advice_stays_within_the_caps_and_sessions_are_separate():
  small = api.TreeParams(max_n_beams=2, max_beam_len=2, max_branch_width=2, max_budget=3)
  controller = trained([6, 6], caps=small)
  limits = controller.advise("s")
  assert limits.depth <= 2 and limits.budget <= 3
  assert controller.advise("other") == controller.advise("fresh")  # priors only
  controller.forget("s")
  assert controller.advise("s") == controller.advise("fresh")
  with pytest.raises(ValueError, match="reach_threshold"):
    ControllerConfig(reach_threshold=1.5)
  with pytest.raises(ValueError, match=">= 1"):
    api.TreeLimits(budget=0, depth=1)


@pytest.mark.slow  # compiles the draft engine (~12 s)
def test_the_draft_engine_follows_limits_without_recompiling():
  target, draft = tiny_models.make_pair(64)
  tree = E.TreeParams(max_n_beams=4, max_beam_len=4, max_branch_width=2, max_budget=12)
  drafter = E.DraftEngine(draft, num_slots=1, max_len=64, tree=tree)
  slot = drafter.open([3, 4, 5, 6], first_token=7)
  full = drafter.draft(slot)
  drafter.abandon_round(slot)
  from specedge_jax.spec import draft as draft_lib

  compiled = draft_lib.grow._cache_size()
  limited = drafter.draft(slot, api.TreeLimits(budget=3, depth=2))
  assert draft_lib.grow._cache_size() == compiled
  assert len(full.tokens) == 13 and len(limited.tokens) <= 4
  depth = np.zeros(len(limited.tokens), int)
  for i, parent in enumerate(limited.parents[1:], start=1):
    depth[i] = depth[parent] + 1
  assert depth.max() <= 2
  # A prefix of the full tree's score order: the limited tree is the same draft, cut.
  assert list(limited.tokens[:2]) == list(full.tokens[:2])


def test_the_verifier_advises_and_the_drafter_follows_over_grpc():
  """Fake engines over real gRPC: every answer carries advice, the drafter drafts the next tree
  with it, and outputs stay the target's own."""
  import asyncio

  from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
  from specedge_jax.serving.proto import specedge_pb2 as pb
  from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output
  from specedge_jax.testing.servers import running_verifier

  vocab, caps = 50, api.TreeParams(max_n_beams=4, max_beam_len=4, max_branch_width=2,
                                   max_budget=8)
  target = FakeTargetEngine(vocab_size=vocab, num_slots=2, max_batch_size=2)
  controller = SpeculationController(caps)
  drafts = FakeDraftEngine(vocab_size=vocab, num_slots=2, correct_depth=2)
  requests = [EdgeRequest(request_id=f"r{i}", prompt_ids=(3 + i, 4), max_new_tokens=9)
              for i in range(2)]

  async def scenario():
    async with running_verifier(target, controller=controller) as (_, channel, stub):
      opened = await stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1, 2],
                                                            max_new_tokens=5))
      answer = await stub.Verify(pb.VerifyRequest(
          session_id=opened.session_id, root_token=opened.first_token,
          tokens=[(opened.first_token + 1) % vocab], parents=[0], edge_rtt_s=0.02,
          edge_draft_s=0.01))
      await stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id))
      drafter = Drafter(drafts, channel, DrafterConfig(client_id="edge0",
                                                       max_concurrent_requests=2,
                                                       max_new_tokens=9))
      return answer, await drafter.run(requests)

  answer, outputs = asyncio.run(scenario())
  assert answer.next_tree.budget >= answer.next_tree.depth >= 1
  assert drafts.last_limits is not None and drafts.last_limits.depth >= 1
  for request, output in zip(requests, outputs):
    assert output.tokens == expected_output(request.prompt_ids, 9, vocab)


@pytest.mark.slow  # compiles the tiny pair's programs (~25 s)
def test_controlled_trees_stay_greedy_equivalent_with_the_real_engines():
  """The real verifier and drafters, proactive drafting on, the controller advising every round
  (a high reach threshold, so advice cuts depth and budget): every output is still exactly the
  target's greedy decoding, and the drafters drafted under advice below their caps."""
  import asyncio

  from specedge_jax.measure.events import EventLog
  from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
  from specedge_jax.testing.servers import running_verifier

  vocab, max_new, max_len = 64, 16, 96
  tree = E.TreeParams(max_n_beams=4, max_beam_len=3, max_branch_width=4, max_budget=12)
  target, draft = tiny_models.make_pair(vocab, noise=0.02)
  prompts = tiny_models.prompts(4, vocab, seed=5)
  make_target = lambda: E.TargetEngine(target, num_slots=4, max_len=max_len,
                                       max_tree_nodes=tree.max_budget + 1, max_batch_size=4,
                                       tree_buckets=(4, 8))
  reference = E.generate(make_target(), prompts, max_new_tokens=max_new).tokens
  proactive = E.ProactiveParams(mode="excluded", max_n_beams=4, max_beam_len=2,
                                max_branch_width=4, max_budget=6)
  controller = SpeculationController(tree, ControllerConfig(reach_threshold=0.6))
  log = EventLog(None, "specedge")

  async def main():
    async with running_verifier(make_target(), controller=controller) as (_, channel, _):
      drafters = [Drafter(E.DraftEngine(draft, num_slots=2, max_len=max_len, tree=tree,
                                        proactive=proactive), channel,
                          DrafterConfig(client_id=f"edge{e}", max_concurrent_requests=2,
                                        proactive=True, max_new_tokens=max_new),
                          event_log=log)
                  for e in range(2)]
      requests = [[EdgeRequest(request_id=f"e{e}r{i}", prompt_ids=tuple(prompts[2 * e + i]))
                   for i in range(2)] for e in range(2)]
      per_edge = await asyncio.gather(*(d.run(r) for d, r in zip(drafters, requests)))
      return [o for outputs in per_edge for o in outputs]

  outputs = asyncio.run(asyncio.wait_for(main(), timeout=300))
  assert [o.error for o in outputs] == [""] * len(outputs)
  assert [o.tokens for o in outputs] == reference
  limits = [tuple(e["tree_limits"]) for e in log.events
            if e["kind"] == "request_step" and e.get("tree_limits")]
  assert limits, "no round was drafted under advice"
  assert any(b < tree.max_budget or d < tree.max_beam_len for b, d in limits), limits
