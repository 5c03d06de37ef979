"""SLO-aware verification scheduling (serving/slo_scheduler.py) and the verify-time estimator
(serving/verify_time.py): decisions on hand-made queues with an estimator whose outputs are
known, no starvation under an adversarial stream, the estimator's fit and its file, and the
'slo' batching mode end to end over gRPC (fakes, then the real engines on a tiny pair), where
cut trees must still give exactly the target's greedy tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os

import numpy as np
import pytest

from specedge_jax.measure.events import EventLog
from specedge_jax.serving import slo_scheduler as S
from specedge_jax.serving.drafter import Drafter, DrafterConfig, EdgeRequest
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verify_time import BatchShape, VerifyTimeEstimator
from specedge_jax.testing.fakes import FakeDraftEngine, FakeTargetEngine, expected_output
from specedge_jax.testing.servers import running_verifier

MS = 1e-3


class LinearCost:
  """A stub estimator with known outputs: intercept + per lane + per tree token, in ms."""

  def __init__(self, per_token_ms: float = 1.0, per_lane_ms: float = 0.0,
               intercept_ms: float = 0.0):
    self.coefficients = (intercept_ms, per_lane_ms, per_token_ms)

  def predict_s(self, shape: BatchShape) -> float:
    intercept, lane, token = self.coefficients
    return (intercept + lane * shape.batch_size + token * shape.tree_tokens) * MS


class FixedCost(VerifyTimeEstimator):
  """The real estimator pinned to its seed: what the worker uses, with outputs known."""

  def observe(self, shape, forward_time_s):
    pass


def candidate(key, values, *, deadline_ms, arrival_ms=0.0, context=0):
  return S.Candidate(key=key, arrival_s=arrival_ms * MS, deadline_s=deadline_ms * MS,
                     node_values=(0.0, *values), context_len=context)


def cuts(plan):
  return [(s.key, s.keep_nodes) for s in plan.selections]


# ------------------------------------------------------------------------------------------------
# plan_batch on hand-made queues


def test_edf_admission_under_a_count_cap_keeps_whole_trees_when_time_allows():
  # A forward with a fixed cost (2 ms, the weights' read) and cheap tree tokens (0.1 ms): every
  # node here brings more tokens per second than the batch's rate, so trees stay whole.
  queue = [candidate("late_deadline", [0.9], deadline_ms=90),
           candidate("first", [0.5, 0.4], deadline_ms=30),
           candidate("second", [0.3], deadline_ms=40)]
  cost = LinearCost(per_token_ms=0.1, intercept_ms=2.0)
  plan = S.plan_batch(0.0, queue, cost, max_batch_size=2, max_queue_s=1.0)
  assert cuts(plan) == [("first", 3), ("second", 2)]  # by deadline, not by value or order
  assert plan.truncated_nodes == 0
  assert plan.estimated_s == pytest.approx(2.5 * MS)
  assert plan.budget_s == pytest.approx(30 * MS)


def test_with_a_backlog_a_node_must_bring_the_batch_rate_for_the_time_it_adds():
  # Someone waits for the next batch (max_batch_size 2 of 3), so the server is the bottleneck.
  # Roots: 2 tokens in 2.2 ms. A's .9 (9 tokens/ms for its 0.1 ms) and B's .5 and .4 pass; the
  # rate is then 3.8 tokens / 2.5 ms = 1.52 per ms, and A's .1 (1 per ms) does not.
  cost = LinearCost(per_token_ms=0.1, intercept_ms=2.0)
  queue = [candidate("A", [0.9, 0.1], deadline_ms=500),
           candidate("B", [0.5, 0.4], deadline_ms=600),
           candidate("waits", [0.5], deadline_ms=700)]
  plan = S.plan_batch(0.0, queue, cost, max_batch_size=2, max_queue_s=1.0)
  assert cuts(plan) == [("A", 2), ("B", 3)]
  assert plan.estimated_s == pytest.approx(2.5 * MS)
  assert [s.cut_for_worth for s in plan.selections] == [True, False]  # B went whole
  # Without the backlog and with no binding deadline the same trees go whole.
  plan = S.plan_batch(0.0, queue, cost, max_batch_size=3, max_queue_s=1.0)
  assert plan.truncated_nodes == 0
  # A forward that is all per-token cost (compute-bound, no fixed part): a root alone is a
  # token per node and no draft node is worth more, so under a backlog trees go to their roots,
  # as autoregressive decoding would.
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=2, max_queue_s=1.0)
  assert cuts(plan) == [("A", 1), ("B", 1)]
  # A deadline still bounds the time on top: A's 2.35 ms leaves room for one node, its .9.
  queue[0] = candidate("A", [0.9, 0.1], deadline_ms=2.35)
  plan = S.plan_batch(0.0, queue, cost, max_batch_size=2, max_queue_s=1.0)
  assert cuts(plan) == [("A", 2), ("B", 1)] and plan.budget_s == pytest.approx(2.35 * MS)
  assert not any(s.cut_for_worth for s in plan.selections)  # the deadline cut them


def test_the_earliest_deadline_sets_the_budget_and_nodes_go_by_value():
  # 1 ms per tree token; A's deadline leaves 6 ms: 6 tokens, 2 of them the roots. The four
  # best nodes over both trees: A1 .9, B1 .8, B2 .6, A2 .5.
  queue = [candidate("A", [0.9, 0.5, 0.2, 0.1], deadline_ms=6),
           candidate("B", [0.8, 0.6, 0.05], deadline_ms=10)]
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=4, max_queue_s=1.0)
  assert cuts(plan) == [("A", 3), ("B", 3)]
  assert plan.truncated_nodes == 3
  assert [s.expected_accepted for s in plan.selections] == pytest.approx([1.4, 1.4])
  assert plan.estimated_s == pytest.approx(6 * MS)
  # A margin is time taken off the budget: one node fewer (B2 .6 goes before A2 .5).
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=4, max_queue_s=1.0,
                      margin_s=1 * MS)
  assert cuts(plan) == [("A", 2), ("B", 3)]


def test_a_cheap_node_that_opens_a_valuable_one_is_taken_with_it():
  # A's first node is worth little but its child much: the pair (.5 per node) beats B's node.
  queue = [candidate("A", [0.1, 0.9], deadline_ms=4),
           candidate("B", [0.4], deadline_ms=5)]
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=4, max_queue_s=1.0)
  assert cuts(plan) == [("A", 3), ("B", 1)]
  assert [s.expected_accepted for s in plan.selections] == pytest.approx([1.0, 0.0])


def test_a_request_that_would_break_an_admitted_deadline_waits_for_the_next_batch():
  # Roots alone: 1 ms each. A's 3 ms deadline holds three roots; D would be the fourth.
  queue = [candidate(k, [0.5], deadline_ms=d)
           for k, d in (("D", 50), ("A", 3), ("C", 20), ("B", 10))]
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=8, max_queue_s=1.0)
  assert cuts(plan) == [("A", 1), ("B", 1), ("C", 1)]
  assert plan.truncated_nodes == 3 and plan.estimated_s == pytest.approx(3 * MS)


def test_a_request_past_its_deadline_goes_last_and_does_not_bind_the_budget():
  queue = [candidate("late", [0.3, 0.2], deadline_ms=-1),
           candidate("ok", [0.9, 0.8, 0.7, 0.6, 0.5], deadline_ms=5)]
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=4, max_queue_s=1.0)
  assert cuts(plan) == [("ok", 4), ("late", 1)]  # 5 ms: two roots and ok's three best nodes
  assert plan.budget_s == pytest.approx(5 * MS)
  # When nobody can make it any more, nothing binds: trees stay whole (bounded by count).
  queue = [candidate("late", [0.3, 0.2], deadline_ms=-1),
           candidate("later", [0.1], deadline_ms=0.5)]
  plan = S.plan_batch(0.0, queue, LinearCost(), max_batch_size=4, max_queue_s=1.0)
  assert cuts(plan) == [("later", 2), ("late", 3)] and math.isinf(plan.budget_s)


def test_an_overdue_request_is_admitted_first_whatever_its_deadline_and_value():
  queue = [candidate("valuable", [0.99, 0.98], deadline_ms=1002, arrival_ms=1000),
           candidate("waited", [0.01], deadline_ms=5000, arrival_ms=0)]
  plan = S.plan_batch(1.0, queue, LinearCost(), max_batch_size=1, max_queue_s=0.5)
  assert [(s.key, s.overdue) for s in plan.selections] == [("waited", True)]
  plan = S.plan_batch(1.0, queue, LinearCost(), max_batch_size=1, max_queue_s=2.0)
  assert [(s.key, s.overdue) for s in plan.selections] == [("valuable", False)]


def test_the_estimator_sees_lanes_and_context_too():
  # 2 ms per lane and 1 ms per 100 context rows: the long-context request costs its lane more.
  class WithContext(LinearCost):
    def predict_s(self, shape):
      return (2 * shape.batch_size + shape.tree_tokens + shape.context_tokens / 100) * MS

  queue = [candidate("short", [0.9, 0.8], deadline_ms=10, context=0),
           candidate("long", [0.7], deadline_ms=11, context=500)]
  # short alone at its root: 3 ms; with long's root: 3 + 3 + 5 = 11 ms > 10 -> long waits.
  plan = S.plan_batch(0.0, queue, WithContext(), max_batch_size=4, max_queue_s=1.0)
  assert cuts(plan) == [("short", 3)]


# ------------------------------------------------------------------------------------------------
# start_time


def test_start_time_waits_only_for_sessions_that_can_join_in_time():
  pending = [candidate("A", [0.5] * 8, deadline_ms=30, arrival_ms=0)]  # 9 ms whole
  kwargs = dict(max_batch_size=4, max_queue_s=1.0, margin_s=1 * MS)
  est = LinearCost()
  assert S.start_time(0.0, [], est, **kwargs) == math.inf
  assert S.start_time(0.0, pending, est, **kwargs) == 0.0  # nobody to wait for
  # Latest start: min(30 - 1 - 9 (whole by the deadline), 0 + 9 (one forward from now)) = 9 ms.
  # A joiner due at 5 ms is waited for (+ margin).
  assert S.start_time(0.0, pending, est, expected_arrivals=[5 * MS], **kwargs) == (
      pytest.approx(6 * MS))
  # One due after a forward would find the server free if the batch ran now: not waited for,
  # though the deadline would allow it (session 20); neither is anyone when the batch is full.
  assert S.start_time(0.0, pending, est, expected_arrivals=[10 * MS], **kwargs) == 0.0
  assert S.start_time(0.0, pending, est, expected_arrivals=[5 * MS],
                      **dict(kwargs, max_batch_size=1)) == 0.0
  # A tight deadline moves the latest start before the forward's: 15 - 1 - 9 = 5 ms.
  tight = [candidate("A", [0.5] * 8, deadline_ms=15, arrival_ms=0)]
  assert S.start_time(0.0, tight, est, expected_arrivals=[4.5 * MS, 7 * MS], **kwargs) == (
      pytest.approx(5 * MS))
  # The starvation bound caps the wait: the oldest arrived at 0 and may wait 5 ms.
  assert S.start_time(0.0, pending, est, expected_arrivals=[4.5 * MS, 8 * MS],
                      **dict(kwargs, max_queue_s=5 * MS)) == pytest.approx(5 * MS)
  # Re-asked once the joiner is due and has not come: at once.
  assert S.start_time(6 * MS, pending, est, expected_arrivals=[5 * MS], **kwargs) == 6 * MS


# ------------------------------------------------------------------------------------------------
# No starvation


def _adversarial_run(max_queue_s: float, horizon_s: float) -> float | None:
  """One verifier, batches of one, 2 ms per batch; two valuable urgent requests arrive per batch
  (the queue only grows) beside one low-value request with a loose deadline. Returns when the
  low-value request was served (None: not within the horizon)."""
  estimator = LinearCost(per_token_ms=1.0)
  queue = [candidate("low", [0.01], deadline_ms=1000, arrival_ms=0)]
  now, serial = 0.0, 0
  while now < horizon_s:
    for _ in range(2):
      queue.append(candidate(f"hot{serial}", [0.99], deadline_ms=now / MS + 2,
                             arrival_ms=now / MS))
      serial += 1
    plan = S.plan_batch(now, queue, estimator, max_batch_size=1, max_queue_s=max_queue_s)
    chosen = {s.key for s in plan.selections}
    if "low" in chosen:
      return now
    queue = [c for c in queue if c.key not in chosen]
    now += plan.estimated_s
  return None


def test_no_starvation_under_a_long_adversarial_stream():
  served = _adversarial_run(max_queue_s=0.05, horizon_s=0.5)
  assert served is not None and served <= 0.05 + 2 * MS
  # The counter-test: without the bound, EDF alone keeps it waiting for its whole loose
  # deadline (past this horizon), so the bound is what served it.
  assert _adversarial_run(max_queue_s=1e9, horizon_s=0.5) is None


# ------------------------------------------------------------------------------------------------
# Acceptance statistics


def test_depths_ranks_and_prior_node_values():
  depth, rank = S.depths_and_ranks([-1, 0, 0, 1, 1, 2])
  assert depth.tolist() == [0, 1, 1, 2, 2, 2] and rank.tolist() == [0, 0, 1, 0, 1, 2]
  stats = S.AcceptanceStats()  # prior: hazard 0.6 per depth, rank shares 1/2, 1/4, ...
  assert stats.node_values([-1, 0, 0, 1]).tolist() == pytest.approx([0, 0.3, 0.15, 0.18])
  assert stats.by_depth(3).tolist() == pytest.approx([0.6, 0.36, 0.216])


def test_measured_acceptance_moves_the_node_values():
  tokens, parents = np.array([5, 7, 8, 9]), np.array([-1, 0, 0, 1])
  stats = S.AcceptanceStats()
  for _ in range(200):  # node 1 always accepted, its child 3 never: the path stops at depth 1
    stats.observe(tokens, parents, kept=4, accepted=[7], bonus=11)
  values = stats.node_values(parents)
  assert values[1] > 0.95 and values[2] < 0.02 and values[3] < 0.02
  assert stats.rounds == 200


def test_a_cut_round_still_counts_the_dropped_child_the_full_tree_would_have_accepted():
  tokens, parents = np.array([5, 7, 8, 9]), np.array([-1, 0, 0, 1])
  stats = S.AcceptanceStats(prior_rounds=1.0)
  before = (stats.at_risk.copy(), stats.reached.copy())
  # Cut to 2 nodes: node 1 accepted; the bonus 9 is node 3's token, a dropped child of node 1.
  stats.observe(tokens, parents, kept=2, accepted=[7], bonus=9)
  assert (stats.at_risk - before[0])[1:4].tolist() == [1, 1, 0]  # depth 3: censored
  assert (stats.reached - before[1])[1:4].tolist() == [1, 1, 0]
  # The bonus matches no dropped child: the full path ended at node 1 too.
  stats.observe(tokens, parents, kept=2, accepted=[7], bonus=10)
  assert (stats.at_risk - before[0])[1:4].tolist() == [2, 2, 0]
  assert (stats.reached - before[1])[1:4].tolist() == [2, 1, 0]


def test_a_round_the_edge_already_lost_goes_behind_one_that_can_still_make_it():
  max_queue_s = 0.1
  lost = S.Candidate(key="lost", arrival_s=0.0, node_values=(0.0, 0.5), context_len=0,
                     deadline_s=S.round_deadline(0.0, itl_slo_s=10 * MS, expected_emitted=2.0,
                                                 edge_time_s=25 * MS, max_queue_s=max_queue_s))
  savable = S.Candidate(key="savable", arrival_s=5 * MS, node_values=(0.0, 0.5), context_len=0,
                        deadline_s=S.round_deadline(5 * MS, itl_slo_s=10 * MS,
                                                    expected_emitted=2.0, edge_time_s=5 * MS,
                                                    max_queue_s=max_queue_s))
  assert lost.lost and not savable.lost
  queue = [lost, savable]
  # One lane: the round that can still meet its deadline (20 ms) runs; the lost one, which
  # arrived first, waits, and runs first once it reaches the starvation bound. (A fixed 2 ms
  # per forward makes the .5 node worth its 1 ms under the backlog.)
  cost = LinearCost(intercept_ms=2.0)
  plan = S.plan_batch(6 * MS, queue, cost, max_batch_size=1, max_queue_s=max_queue_s)
  assert cuts(plan) == [("savable", 2)]
  overdue = S.plan_batch(max_queue_s, queue, cost, max_batch_size=1, max_queue_s=max_queue_s)
  assert cuts(overdue) == [("lost", 2)] and overdue.selections[0].overdue
  # A lost round waits for no one: with it pending the batch starts at once.
  assert S.start_time(6 * MS, [lost], LinearCost(), max_batch_size=4, max_queue_s=max_queue_s,
                      expected_arrivals=[8 * MS]) <= 6 * MS


def test_round_deadline():
  assert S.round_deadline(1.0, itl_slo_s=0.01, expected_emitted=3.0, edge_time_s=0.005,
                          max_queue_s=0.1) == pytest.approx(1.025)
  assert S.round_deadline(1.0, itl_slo_s=0.01, expected_emitted=1.0, edge_time_s=0.5,
                          max_queue_s=0.1) == 1.0  # the edge alone spent it: lost
  assert S.round_deadline(1.0, itl_slo_s=0.0, expected_emitted=3.0, edge_time_s=0.0,
                          max_queue_s=0.1) == pytest.approx(1.1)  # no SLO: the bound


# ------------------------------------------------------------------------------------------------
# The verify-time estimator


TRUE_MS = np.array([1.5, 0.4, 0.2, 0.002])


def _shapes(count: int, seed: int = 0) -> list[BatchShape]:
  rng = np.random.default_rng(seed)
  shapes = []
  for _ in range(count):
    batch = int(rng.integers(1, 9))
    shapes.append(BatchShape(batch, int(batch * rng.integers(1, 34)),
                             int(batch * rng.integers(10, 900))))
  return shapes


def _true_s(shape: BatchShape) -> float:
  return float(TRUE_MS @ shape.features()) / 1000


def test_the_estimator_fits_a_known_linear_cost():
  estimator = VerifyTimeEstimator(prior_weight=1e-3)
  for shape in _shapes(200):
    estimator.observe(shape, _true_s(shape))
  assert np.asarray(estimator.coefficients_ms) == pytest.approx(TRUE_MS, rel=1e-3)
  for shape in _shapes(20, seed=1):
    assert estimator.predict_s(shape) == pytest.approx(_true_s(shape), rel=1e-3)


def test_the_fit_stays_non_negative_and_one_outlier_cannot_wreck_it():
  # The JAX engine's case: trees are padded, so tree tokens cost nothing measurable.
  estimator = VerifyTimeEstimator()
  flat = np.array([3.0, 1.0, 0.0, 0.0])
  for shape in _shapes(100):
    estimator.observe(shape, float(flat @ shape.features()) / 1000)
  assert min(estimator.coefficients_ms) >= 0
  assert estimator.coefficients_ms[2] < 0.01
  probe = BatchShape(4, 64, 1000)
  before = estimator.predict_s(probe)
  estimator.observe(probe, 30.0)  # a compile: seconds
  assert estimator.predict_s(probe) < 1.2 * before


def test_the_estimator_is_seeded_from_a_bench_core_verify_curve(tmp_path):
  # A curve in the format `launch.bench_core --out_json` writes (T per lane, root included).
  points = [{"batch_size": b, "tree_tokens": t,
             "median_ms": float(TRUE_MS[0] + TRUE_MS[1] * b + TRUE_MS[2] * b * t
                                + TRUE_MS[3] * b * 128), "ratio_to_t1": 1.0}
            for b in (1, 4, 8) for t in (1, 8, 16, 32, 64)]
  path = tmp_path / "bench_core.json"
  path.write_text(json.dumps({"verify_curve": points, "generation": []}))
  estimator = VerifyTimeEstimator.from_curve_file(str(path))
  for point in points:
    shape = BatchShape(point["batch_size"], point["batch_size"] * point["tree_tokens"],
                       point["batch_size"] * 128)
    assert estimator.predict_s(shape) == pytest.approx(point["median_ms"] / 1000, rel=0.02)
  bad = tmp_path / "not_a_curve.json"
  bad.write_text(json.dumps({"verify_curve": [{"batch_size": 1}]}))
  with pytest.raises(ValueError, match="not_a_curve.json.*tree_tokens"):
    VerifyTimeEstimator.from_curve_file(str(bad))


def test_the_estimator_persists_across_restarts_and_sets_a_bad_file_aside(tmp_path, caplog):
  path = str(tmp_path / "state" / "verify_time.json")
  estimator = VerifyTimeEstimator.load(path, prior_weight=1e-3)  # missing: from the seed
  assert estimator.num_samples == 0
  for shape in _shapes(50):
    estimator.observe(shape, _true_s(shape))
  estimator.save()
  assert os.listdir(os.path.dirname(path)) == ["verify_time.json"]  # no temporary left behind
  reloaded = VerifyTimeEstimator.load(path, prior_weight=1e-3)
  assert reloaded.num_samples == 50
  assert reloaded.coefficients_ms == pytest.approx(estimator.coefficients_ms)
  # A torn or foreign file: a warning, the file moved aside, the seed; the next save is clean.
  for content in ("{not json", json.dumps({"format": "specedge-verify-time", "version": 99})):
    with open(path, "w") as f:
      f.write(content)
    with caplog.at_level(logging.WARNING, logger="specedge_jax.serving.verify_time"):
      fresh = VerifyTimeEstimator.load(path)
    assert "unusable" in caplog.text and os.path.exists(path + ".bad")
    assert fresh.num_samples == 0 and fresh.coefficients_ms == pytest.approx(fresh.prior_ms)
    assert not os.path.exists(path)
    caplog.clear()
  fresh.save()
  assert VerifyTimeEstimator.load(path).num_samples == 0


# ------------------------------------------------------------------------------------------------
# The 'slo' batching mode over gRPC

VOCAB = 50


def _requests(client: int, n: int) -> list[EdgeRequest]:
  return [EdgeRequest(request_id=f"c{client}r{i}", prompt_ids=(client + 1, 7 * i + 3 + client))
          for i in range(n)]


def _truncated(events) -> int:
  return sum(e["truncated_nodes"] for e in events
             if e["kind"] == "server_batch" and e["op"] == "verify")


@pytest.mark.parametrize("itl_slo_ms,expect_cuts", [(30, True), (0, False)])
def test_slo_mode_with_fakes_cuts_trees_and_stays_exact(itl_slo_ms, expect_cuts):
  """Two edges x K=2 on the fakes, proactive on. The estimate (10 ms a tree token) is far above
  the real forward: a 30 ms ITL SLO then fits a few tokens per batch, so trees are cut; without
  an SLO (edge 0, server default 0) a round is due after max_queue_ms and trees stay whole."""
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)
  log = EventLog(None, "specedge")
  batching = BatchingConfig(mode="slo", max_queue_ms=500.0, slo_margin_ms=0.0)

  async def main():
    async with running_verifier(target, batching=batching, event_log=log,
                                verify_time=FixedCost((0.0, 0.0, 10.0, 0.0))) as (server, channel,
                                                                                _):
      drafters = [Drafter(FakeDraftEngine(vocab_size=VOCAB, correct_depth=3, proactive=True),
                          channel, DrafterConfig(client_id=f"edge{c}", max_concurrent_requests=2,
                                                 proactive=True, max_new_tokens=12,
                                                 itl_slo_ms=itl_slo_ms))
                  for c in range(2)]
      outputs = await asyncio.gather(*(d.run(_requests(c, 3)) for c, d in enumerate(drafters)))
      return outputs, server.worker.truncated_nodes

  outputs, truncated = asyncio.run(asyncio.wait_for(main(), timeout=60))
  for c, per_edge in enumerate(outputs):
    for request, output in zip(_requests(c, 3), per_edge):
      assert output.error == ""
      assert output.tokens == expected_output(request.prompt_ids, 12, VOCAB)
  assert truncated == _truncated(log.events)
  assert (truncated > 0) == expect_cuts


def test_the_controller_follows_the_verifiers_cuts_for_worth_not_its_deadline_cuts():
  """Over gRPC with fakes, one lane per batch and a compute-bound estimate (10 ms a tree token,
  nothing fixed). B and C send 9-node chains while A's forward (0.3 s) runs, so B's batch has C
  waiting behind it: B's chain is cut to its root for worth (no node brings the batch's token
  a 10 ms), and its advice asks for no more than that. C then runs with nobody waiting and no
  binding deadline: whole, and its advice keeps the full budget. A session whose chain a tight
  SLO cuts (a deadline's cut, about that one batch) keeps its budget too."""
  from specedge_jax import api  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving.proto import specedge_pb2 as pb  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving.speculation_controller import (  # pylint: disable=g-import-not-at-top
      SpeculationController)

  caps = api.TreeParams(max_n_beams=4, max_beam_len=4, max_branch_width=4, max_budget=12)
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=1,
                            forward_delay_s=0.3)
  batching = BatchingConfig(mode="slo", max_queue_ms=5000.0, slo_margin_ms=0.0)

  def chain(opened):
    root = opened.first_token
    return pb.VerifyRequest(session_id=opened.session_id, root_token=root,
                            tokens=[(root + 1 + i) % VOCAB for i in range(9)],
                            parents=list(range(9)), edge_rtt_s=0.001, edge_draft_s=0.001)

  async def scenario():
    async with running_verifier(target, batching=batching,
                                controller=SpeculationController(caps),
                                verify_time=FixedCost((0.0, 0.0, 10.0, 0.0))) as (server, _,
                                                                                stub):
      a, b, c = [await stub.OpenSession(pb.OpenSessionRequest(
          prompt_token_ids=[1, 2 + i], max_new_tokens=20)) for i in range(3)]
      first = asyncio.ensure_future(stub.Verify(pb.VerifyRequest(
          session_id=a.session_id, root_token=a.first_token)))
      await asyncio.sleep(0.1)  # A's forward is running
      second = asyncio.ensure_future(stub.Verify(chain(b)))
      await asyncio.sleep(0.02)  # B is the earlier arrival (EDF ties go to it)
      third = asyncio.ensure_future(stub.Verify(chain(c)))
      await first
      answer_b, answer_c = await second, await third
      cut_before = server.worker.truncated_nodes
      # Opened just now: its edge has spent nothing of the round's budget yet.
      tight = await stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1, 9],
                                                           max_new_tokens=20, itl_slo_ms=30))
      answer_tight = await stub.Verify(chain(tight))
      return answer_b, answer_c, answer_tight, cut_before, server.worker.truncated_nodes

  answer_b, answer_c, answer_tight, cut_bc, cut_all = asyncio.run(
      asyncio.wait_for(scenario(), timeout=30))
  assert cut_bc == 9  # all nine of B's nodes below the root; C whole
  assert len(answer_b.emitted_tokens) >= 1
  assert answer_b.next_tree.budget == 1 and answer_b.next_tree.depth == 1
  assert answer_c.next_tree.budget == caps.max_budget
  # 30 ms x ~2 expected tokens leaves time for a few of the tight session's nine nodes.
  assert 0 < cut_all - cut_bc < 9
  assert answer_tight.next_tree.budget == caps.max_budget


@pytest.mark.slow  # 20-37 s on the 2-core box, most of it compiling the tiny pair's programs
def test_slo_mode_truncated_trees_stay_greedy_equivalent_with_the_real_engines():
  """The real verifier and drafters on a tiny pair, proactive drafting on, 'slo' batching with an
  estimate that makes every whole tree too slow for the SLO: trees are cut, and every output is
  still exactly the target's greedy decoding."""
  from specedge_jax import engine as E  # pylint: disable=g-import-not-at-top (JAX: this test)
  from specedge_jax.testing import tiny_models  # pylint: disable=g-import-not-at-top

  vocab, max_new, max_len = 64, 16, 96
  tree = E.TreeParams(max_n_beams=4, max_beam_len=3, max_branch_width=4, max_budget=12)
  target, draft = tiny_models.make_pair(vocab, noise=0.005)
  prompts = tiny_models.prompts(4, vocab, seed=3)
  make_target = lambda: E.TargetEngine(target, num_slots=4, max_len=max_len,
                                       max_tree_nodes=tree.max_budget + 1, max_batch_size=4)
  reference = E.generate(make_target(), prompts, max_new_tokens=max_new).tokens
  proactive = E.ProactiveParams(mode="excluded", max_n_beams=4, max_beam_len=2,
                                max_branch_width=4, max_budget=6)
  log = EventLog(None, "specedge")
  # 20 ms a tree token against a 100 ms ITL SLO: about a dozen tokens per batch, less than one
  # whole 13-node tree per lane, whatever the real edge time on a loaded box.
  batching = BatchingConfig(mode="slo", max_queue_ms=2000.0, slo_margin_ms=0.0)

  async def main():
    async with running_verifier(make_target(), batching=batching, event_log=log,
                                verify_time=FixedCost((0.0, 0.0, 20.0, 0.0))) as (server, channel,
                                                                                _):
      drafters = [Drafter(E.DraftEngine(draft, num_slots=2, max_len=max_len, tree=tree,
                                        proactive=proactive), channel,
                          DrafterConfig(client_id=f"edge{e}", max_concurrent_requests=2,
                                        proactive=True, max_new_tokens=max_new,
                                        itl_slo_ms=100))
                  for e in range(2)]
      requests = [[EdgeRequest(request_id=f"e{e}r{i}", prompt_ids=tuple(prompts[2 * e + i]))
                   for i in range(2)] for e in range(2)]
      per_edge = await asyncio.gather(*(d.run(r) for d, r in zip(drafters, requests)))
      return [o for outputs in per_edge for o in outputs], server.worker.truncated_nodes

  outputs, truncated = asyncio.run(asyncio.wait_for(main(), timeout=300))
  assert [o.error for o in outputs] == [""] * len(outputs)
  assert [o.tokens for o in outputs] == reference
  assert truncated > 0 and truncated == _truncated(log.events)
  # The cut trees still accepted draft tokens, deep paths included.
  assert max(d for o in outputs for d in o.accepted_depths) >= 2
  verifies = [e for e in log.events if e["kind"] == "server_batch" and e["op"] == "verify"]
  assert all(e["estimated_time_s"] == pytest.approx(0.02 * e["tokens"]) for e in verifies)


def test_every_mode_feeds_the_estimator_from_its_batches_and_saves_it(tmp_path):
  path = str(tmp_path / "verify_time.json")
  target = FakeTargetEngine(vocab_size=VOCAB, num_slots=4, max_batch_size=4)
  log = EventLog(None, "specedge")

  async def main():
    # No outlier clipping: the file must hold exactly the measured times.
    estimator = VerifyTimeEstimator.load(path, outlier_factor=1e9)
    async with running_verifier(target, batching=BatchingConfig(mode="dynamic"), event_log=log,
                                verify_time=estimator) as (server, channel, stub):
      await expect_invalid(stub)
      drafter = Drafter(FakeDraftEngine(vocab_size=VOCAB), channel,
                        DrafterConfig(max_concurrent_requests=2, max_new_tokens=8))
      await drafter.run(_requests(0, 2))
      return server

  server = asyncio.run(asyncio.wait_for(main(), timeout=60))
  with open(path) as f:  # written at the stop
    samples = json.load(f)["samples"]
  verifies = [e for e in log.events if e["kind"] == "server_batch" and e["op"] == "verify"]
  assert len(samples) == len(verifies) == server.worker.batches_run > 0
  assert [row[:2] for row in samples] == [[e["batch_size"], e["tokens"]] for e in verifies]
  assert [row[3] for row in samples] == pytest.approx(
      [1000 * e["forward_time_s"] for e in verifies])
  assert VerifyTimeEstimator.load(path).num_samples == len(samples)


async def expect_invalid(stub):
  """A negative ITL SLO is refused by name."""
  import grpc  # pylint: disable=g-import-not-at-top

  from specedge_jax.serving.proto import specedge_pb2 as pb  # pylint: disable=g-import-not-at-top

  with pytest.raises(grpc.aio.AioRpcError) as info:
    await stub.OpenSession(pb.OpenSessionRequest(prompt_token_ids=[1, 2], max_new_tokens=4,
                                                 itl_slo_ms=-5))
  assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert "itl_slo_ms" in info.value.details()
