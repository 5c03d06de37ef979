"""The capacity simulator (issue 15): determinism, a case worked out by hand, the real batching
rules (pinned to `EngineWorker` on the same hand-made cases), the real speculation controller and
SLO scheduler, the acceptance model's fit, and the roofline's numbers for a known shape."""

import asyncio
import math

import numpy as np
import pytest

from specedge_jax.api import DraftTree, TreeParams, VerifyResult
from specedge_jax.serving import engine_worker, slo_admission, slo_scheduler, speculation_controller
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verify_time import BatchShape
from specedge_jax.sim import acceptance, batching, costs, simulator

EMBEDDED_TREE = TreeParams(max_n_beams=4, max_beam_len=4, max_branch_width=2, max_budget=8)
# The sweep's acceptance by depth (results/sweep/report.json, every SpecEdge run).
SWEEP_HAZARDS = (0.8453, 0.8303, 0.4875, 0.1616)


def constant_costs(*, verify_ms=10.0, prefill_ms=20.0, draft_ms=5.0, commit_ms=1.0,
                   open_ms=2.0, overhead_ms=0.0, rpc_cpu_ms=0.0):
  table = costs.TableCost(((1, 1, verify_ms),), source="constant")
  return costs.CostModel(
      verify=table, decode=table, prefill=costs.LinearCost(prefill_ms / 1000.0, 0.0),
      edge=costs.EdgeCosts(draft_fixed_s=draft_ms / 1000.0, draft_per_step_s=0.0,
                           commit_s=commit_ms / 1000.0, open_fixed_s=open_ms / 1000.0,
                           rpc_cpu_s=rpc_cpu_ms / 1000.0),
      round_overhead_s=overhead_ms / 1000.0)


def sweep_path_model(tree=EMBEDDED_TREE):
  return acceptance.PathModel(acceptance.TreeFamily(tree), SWEEP_HAZARDS)


def spec(**fields):
  defaults = dict(num_edges=2, requests_per_edge=2, tree=EMBEDDED_TREE,
                  batching=BatchingConfig(mode="dynamic"), max_batch_size=4,
                  rtt=simulator.RttSpec(rtt_s=0.014))
  return simulator.SpecEdgeSpec(**{**defaults, **fields})


def requests(n, output_tokens=24, prompt_tokens=50):
  return [simulator.RequestSpec(f"r{i}", prompt_tokens, output_tokens) for i in range(n)]


def batch_sizes(run):
  return [e["batch_size"] for e in run.events if e["kind"] == "server_batch" and
          e["op"] == "verify"]


def test_runs_are_deterministic_given_the_seed():
  jittery = spec(rtt=simulator.RttSpec(kind="lognormal", rtt_s=0.014, sigma=0.5))
  runs = [simulator.run_specedge(jittery, constant_costs(), requests(12), sweep_path_model(),
                                 seed=seed) for seed in (3, 3, 4)]
  assert runs[0].events == runs[1].events
  assert runs[0].events != runs[2].events


def test_one_edge_worked_out_by_hand():
  """One edge, one request at a time, a chain tree the target always accepts to depth 2, RTT 14
  ms, every cost constant: each round is draft 5 + RTT/2 7 + verify 10 + RTT/2 7 + commit 1 = 30
  ms for 3 tokens; a request of 31 tokens is its first token (TTFT = 7 + 20 + 7 = 34 ms), the
  draft prefill (2 ms) and 10 rounds; then its close takes one RTT (14 ms)."""
  chain = TreeParams(max_n_beams=1, max_beam_len=3, max_branch_width=1, max_budget=3)
  path_model = acceptance.PathModel(acceptance.TreeFamily(chain), [1.0, 1.0, 0.0])
  one = spec(num_edges=1, requests_per_edge=1, tree=chain)
  run = simulator.run_specedge(one, constant_costs(), requests(3, output_tokens=31), path_model)
  summary = simulator.summarize(run, simulator.SloSpec(itl_s=0.0105, ttft_s=0.05))
  per_request = 0.034 + 0.002 + 10 * 0.030 + 0.014
  assert summary["wall_time_s"] == pytest.approx(3 * per_request)
  assert summary["generated_tokens"] == 93
  assert summary["throughput_per_wall_s"] == pytest.approx(93 / (3 * per_request))
  assert summary["throughput_per_compute_s"] == pytest.approx(93 / (3 * (0.020 + 10 * 0.010)))
  itl = summary["requests"]["itl"]
  assert itl["mean_s"] == pytest.approx((0.002 + 10 * 0.030) / 30)  # gaps over later tokens
  assert summary["requests"]["ttft"]["mean_s"] == pytest.approx(0.034)
  assert summary["requests"]["mean_tokens_per_step"] == pytest.approx(3.0)
  assert summary["sim"]["slo_attainment"] == 1.0  # 10.07 ms <= 10.5 ms, 34 ms <= 50 ms
  # The server's wall-billed GPU-hours, and the edge's busy time: 3 x (2 + 10 x (5 + 1)) ms.
  assert summary["sim"]["server_gpu_hours_wall"] == pytest.approx(3 * per_request / 3600)
  assert summary["sim"]["edge_gpu_busy_hours"] == pytest.approx(3 * 0.062 / 3600)


def test_static_waits_for_every_due_session_and_dynamic_does_not():
  """Two edges, one request each; the second edge's link is 40 ms slower, so its trees arrive
  later. Static batching (EngineWorker's rule) waits for it: every batch holds both sessions.
  Dynamic batching takes what is queued: single trees."""
  slow_link = simulator.RttSpec(kind="per_edge", per_edge_s=(0.010, 0.050))
  runs = {mode: simulator.run_specedge(
      spec(num_edges=2, requests_per_edge=1, rtt=slow_link,
           batching=BatchingConfig(mode=mode, static_timeout_s=5.0)),
      constant_costs(), requests(2, output_tokens=40), sweep_path_model())
      for mode in ("static", "dynamic")}
  static, dynamic = batch_sizes(runs["static"]), batch_sizes(runs["dynamic"])
  # Static: pairs until the first request ends, then the survivor alone (nobody else is due).
  assert static[0] == 2 and set(static) <= {1, 2}
  first_single = static.index(1)
  assert all(b == 2 for b in static[:first_single]) and all(b == 1 for b in static[first_single:])
  assert set(dynamic) == {1}


def _worker(mode: str, max_batch_size: int) -> engine_worker.EngineWorker:
  class Engine:  # answers any batch; the worker never gets further than `verify`
    def verify(self, requests):
      return [VerifyResult(accepted=[], bonus=0, emitted=[0], finished=False) for _ in requests]

  loop = asyncio.new_event_loop()
  worker = engine_worker.EngineWorker(
      Engine(), loop=loop, batching=BatchingConfig(mode=mode, max_wait_ms=3.0,
                                                   static_timeout_s=0.5),
      max_batch_size=max_batch_size)
  worker._deliver = lambda *args, **kwargs: None  # pylint: disable=protected-access
  loop.close()
  return worker


CASES = [  # (pending slots, their arrival offsets, active, late, now offset,
           #  ready when static (0.5 s timeout), ready when dynamic (3 ms))
    ([0], [0.0], {0, 1}, set(), 0.001, False, False),  # waiting for slot 1
    ([0], [0.0], {0, 1}, set(), 0.6, True, True),  # past both deadlines
    ([0], [0.0], {0, 1}, {1}, 0.001, True, True),  # slot 1 is late: nobody to wait for
    ([0, 1], [0.0, 0.001], {0, 1, 2}, set(), 0.002, False, False),  # still one due
    ([0, 1, 2, 3], [0.0] * 4, {0, 1, 2, 3, 4, 5}, set(), 0.0, True, True),  # a full batch
    ([0, 1], [0.0, 0.0], {0, 1}, set(), 0.0, True, True),  # every due session joined
    ([2], [0.0], {1, 2, 3}, {1}, 0.004, False, True),  # past the dynamic deadline only
]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("case", CASES)
def test_the_worker_and_the_simulator_decide_by_the_shared_rule(monkeypatch, mode, case):
  """The engine worker feeds `batching_rules` its own fields and clock, the simulator its own:
  both give the decision these cases were worked out to have, and the same late set after."""
  slots, offsets, active, late, now, ready_static, ready_dynamic = case
  worker = _worker(mode, max_batch_size=4)
  t0 = 1000.0
  tree = DraftTree(tokens=np.array([1, 2]), parents=np.array([-1, 0]))
  # pylint: disable=protected-access
  worker._pending.extend(engine_worker._VerifyJob(future=None, request_id=f"r{s}", slot=s,
                                                  tree=tree, enqueued_at=t0 + dt)
                         for s, dt in zip(slots, offsets))
  worker._active_slots |= active
  worker._late_slots |= late
  monkeypatch.setattr(engine_worker.time, "time", lambda: t0 + now)
  expected = ready_static if mode == "static" else ready_dynamic
  assert worker._batch_ready() == expected
  assert batching.batch_ready(worker._batching, now=t0 + now, pending_slots=slots,
                              oldest_enqueued_s=t0 + offsets[0], active_slots=set(active),
                              late_slots=set(late), max_batch_size=4) == expected
  # And the late set after the batch runs: a static batch with room left stops waiting for the
  # due sessions that did not join; dynamic never marks anyone late.
  if expected:
    batch_slots = slots[:4]
    want = batching.late_after_batch(worker._batching, batch_slots=batch_slots,
                                     still_pending_slots=slots[4:], active_slots=set(active),
                                     late_slots=set(late), max_batch_size=4)
    if mode == "static" and len(batch_slots) < 4:
      assert want == set(late) | (set(active) - set(slots))
    else:
      assert want == set(late)
    worker._run_batch()
    assert worker._late_slots == want


def test_the_controller_is_the_real_one_and_shrinks_trees_of_a_poor_draft():
  assert simulator.SpeculationController is speculation_controller.SpeculationController
  poor = acceptance.PathModel(acceptance.TreeFamily(EMBEDDED_TREE), [0.3, 0.2, 0.1, 0.05])
  common = dict(num_edges=2, requests_per_edge=2)
  plain = simulator.run_specedge(spec(**common), constant_costs(), requests(8), poor)
  advised = simulator.run_specedge(
      spec(**common, controller=speculation_controller.ControllerConfig()), constant_costs(),
      requests(8), poor)

  def sizes(run):
    return [e["tree_size"] for e in run.events if e["kind"] == "request_step" and
            e["phase"] == "verify"]

  assert set(sizes(plain)) == {EMBEDDED_TREE.max_budget}
  assert np.mean(sizes(advised)) < EMBEDDED_TREE.max_budget
  assert max(sizes(advised)) <= EMBEDDED_TREE.max_budget


def test_slo_mode_plans_with_the_real_scheduler_and_cuts_trees_to_fit(monkeypatch):
  calls = []
  real_plan = slo_scheduler.plan_batch

  def counting(*args, **kwargs):
    calls.append(1)
    return real_plan(*args, **kwargs)

  monkeypatch.setattr(slo_scheduler, "plan_batch", counting)
  # Verify cost grows with tree tokens (no padding), and the SLO is tight: cuts pay.
  growing = costs.TableCost(((1, 1, 2.0), (1, 9, 20.0), (4, 1, 4.0), (4, 9, 60.0)),
                            source="synthetic")
  model = constant_costs()
  model = costs.CostModel(verify=growing, decode=growing, prefill=model.prefill, edge=model.edge)
  slo = BatchingConfig(mode="slo", default_itl_slo_ms=12.0, max_queue_ms=100.0,
                       slo_margin_ms=0.5)
  run = simulator.run_specedge(spec(num_edges=2, requests_per_edge=2, batching=slo,
                                    itl_slo_ms=12.0), model, requests(8), sweep_path_model())
  assert calls  # every slo batch went through slo_scheduler.plan_batch
  assert run.truncated_nodes > 0
  summary = simulator.summarize(run, simulator.SloSpec(itl_s=0.05))
  assert summary["generated_tokens"] == 8 * 24  # truncation never loses a request's tokens


def test_the_path_model_reproduces_the_measured_acceptance_on_the_reference_tree():
  family = acceptance.TreeFamily(EMBEDDED_TREE)
  model = acceptance.PathModel(family, SWEEP_HAZARDS)
  assert model.expected_accepted(family.tree()) == pytest.approx(np.cumprod(SWEEP_HAZARDS).sum())
  rng = np.random.default_rng(0)
  depths = np.array([len(model.sample(rng, family.tree())) for _ in range(20000)])
  for d, h in enumerate(SWEEP_HAZARDS, start=1):
    assert (depths >= d).sum() / (depths >= d - 1).sum() == pytest.approx(h, abs=0.02)
  # Smaller trees are prefixes of the full one and accept less.
  full = family.tree()
  small = family.tree(budget=4, depth=3)
  assert small.keys == tuple(k for k in full.keys if len(k) <= 3)[:5]
  assert model.expected_accepted(small) < model.expected_accepted(full)
  # A forced depth (a replayed round) is honoured, capped by the tree.
  assert len(model.sample(rng, full, depth=3)) == 3
  assert len(model.sample(rng, family.tree(depth=2), depth=4)) == 2


def test_roofline_numbers_for_qwen3_14b_on_an_a100():
  model = costs.model_shape("Qwen3-14B")
  assert model.parameters == 14_768_307_200  # = transformers' count (tests/models/test_configs)
  assert costs.model_shape("Qwen3-1.7B").parameters == 1_720_574_976
  untied_embedding = 151_936 * 5_120
  assert model.weight_bytes_read() == 2 * (14_768_307_200 - untied_embedding)
  assert model.kv_row_bytes() == 2 * 40 * 8 * 128 * 2  # K and V, 40 layers, 8 kv heads, bf16
  roofline = costs.RooflineCost(costs.GPUS["A100-80GB"], model, overhead_s=0.001)
  # A decode step at B = 1 with no context is memory-bound: the weights once over 2.039 TB/s.
  decode = roofline.seconds(BatchShape(1, 1, 0))
  assert decode == pytest.approx((2 * (14_768_307_200 - untied_embedding) + model.kv_row_bytes())
                                 / 2.039e12 + 0.001)
  # 1024 tree tokens are compute-bound: 2 x matmul parameters x tokens (+ attention) / 312 TF/s.
  wide = BatchShape(1, 1024, 0)
  flops = 2 * (14_768_307_200 - untied_embedding) * 1024 + 4 * 40 * 40 * 128 * 1024 * 1024
  assert roofline.flops(wide) == pytest.approx(flops)
  assert roofline.seconds(wide) == pytest.approx(flops / 312e12 + 0.001)
  assert costs.kv_slots(costs.GPUS["A100-80GB"], model, max_len=512) == int(
      (80e9 * 0.9 - 2 * 14_768_307_200) // (512 * model.kv_row_bytes()))


def test_server_only_decodes_one_token_per_step_for_the_whole_batch():
  table = costs.TableCost(((1, 1, 10.0), (2, 1, 12.0)), source="decode")
  model = costs.CostModel(verify=table, decode=table, prefill=costs.LinearCost(0.02, 0.0),
                          edge=constant_costs().edge)
  run = simulator.run_server_only(simulator.ServerOnlySpec(num_users=2, max_batch_size=2,
                                                           closed_loop=False),
                                  model, requests(2, output_tokens=11))
  summary = simulator.summarize(run, simulator.SloSpec(itl_s=math.inf))
  # Two prefills (20 ms each, in turn), then 10 steps of B = 2 at 12 ms. The first request's
  # first gap also holds the second's prefill: (20 + 12 + 9 x 12 + 10 x 12) ms / 20 tokens.
  assert summary["wall_time_s"] == pytest.approx(0.040 + 10 * 0.012)
  assert summary["requests"]["itl"]["mean_s"] == pytest.approx(0.260 / 20)
  assert summary["generated_tokens"] == 22


def test_shared_edge_cores_share_by_processor_sharing():
  """Two edges on one core draft at half speed while both draft."""
  one = spec(num_edges=2, requests_per_edge=1, shared_edge_cores=1,
             batching=BatchingConfig(mode="dynamic"))
  run = simulator.run_specedge(one, constant_costs(prefill_ms=0.0),
                               requests(2, output_tokens=4), sweep_path_model())
  busy = [e for e in run.events if e["kind"] == "edge_busy"]
  # Both opens answer at once (no prefill cost); the two draft prefills (2 ms alone) and then
  # the two first drafts (5 ms alone) run side by side on the one core, at half speed.
  prefills = [e for e in busy if e["op"] == "prefill"]
  drafts = [e for e in busy if e["op"] == "draft"][:2]
  assert [e["t_end"] - e["t_start"] for e in prefills] == pytest.approx([0.004, 0.004])
  assert [e["t_end"] - e["t_start"] for e in drafts] == pytest.approx([0.010, 0.010])


def test_a_bench_gpu_file_is_a_verify_and_decode_table(tmp_path):
  """The format `bench/gpu.py` writes (its verify grid; T = 1 is the decode step)."""
  import json  # pylint: disable=g-import-not-at-top

  points = [{"batch_size": b, "tree_tokens": t, "prefix_len": 512, "median_ms": ms}
            for b, t, ms in ((1, 1, 7.0), (1, 16, 7.5), (8, 1, 7.4), (8, 16, 12.0))]
  points.append({"batch_size": 8, "tree_tokens": 32, "prefix_len": 512, "median_ms": None,
                 "error": "out of memory: ..."})
  path = tmp_path / "bench_gpu.json"
  path.write_text(json.dumps({"device": {"device_kind": "NVIDIA H200"},
                              "verify_grid": {"points": points}}))
  tables = costs.tables_from_bench_gpu(str(path))
  assert tables["verify"].ms(8, 16) == pytest.approx(12.0)
  assert tables["verify"].ms(4, 16) == pytest.approx(7.5 + (12.0 - 7.5) * 3 / 7)
  assert tables["decode"].seconds(BatchShape(8, 8, 0)) == pytest.approx(0.0074)
  assert len(tables["verify"].points) == 4  # the failed point is left out


def test_slo_admission_is_the_real_policy_and_holds_fewer_sessions_under_overload():
  """Eight edges of two requests against a verifier of 4-lane batches whose forward grows with
  the batch, under an SLO that half the load can meet: the real `SloAdmission` cuts the sessions
  held (never below one batch), opens past its cap wait (TTFT), and the sessions it holds meet
  the SLO more often than when all are held."""
  assert simulator.slo_admission_lib is slo_admission  # the real policy, not a copy
  # 3 ms per lane: a full batch of 4 lanes takes 12 ms, so 16 sessions queue for 4 batches.
  per_lane = costs.TableCost(((1, 1, 3.0), (4, 1, 12.0)), source="synthetic")
  base = constant_costs(draft_ms=2.0, commit_ms=0.5)
  model = costs.CostModel(verify=per_lane, decode=per_lane, prefill=base.prefill, edge=base.edge)
  common = dict(num_edges=8, requests_per_edge=2, max_batch_size=4, itl_slo_ms=20.0,
                rtt=simulator.RttSpec(rtt_s=0.002))
  work = requests(64, output_tokens=32)
  slo = simulator.SloSpec(itl_s=0.020)
  held_all = simulator.run_specedge(spec(**common), model, work, sweep_path_model())
  admitted = simulator.run_specedge(spec(**common, slo_admission=True), model, work,
                                    sweep_path_model())
  capacities = [c for _, c in admitted.admission_capacity]
  assert capacities and min(capacities) < 16  # it cut below the 16 slots
  assert min(capacities) >= 4  # never below one full batch
  assert held_all.admission_capacity == ()
  before, after = (simulator.summarize(r, slo) for r in (held_all, admitted))
  assert after["generated_tokens"] == before["generated_tokens"] == 64 * 32  # nothing lost
  assert after["sim"]["slo_attainment"] > before["sim"]["slo_attainment"]
  assert after["requests"]["ttft"]["mean_s"] > before["requests"]["ttft"]["mean_s"]
  with pytest.raises(ValueError, match="itl_slo_ms"):
    spec(slo_admission=True)
