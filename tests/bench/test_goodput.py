"""The goodput benchmark (`launch/bench_goodput.py`): its pure parts without any model (capacity
from attainment per client count, the bound and efficiency arithmetic, the verify curve's
interpolation, the ITL breakdown from hand-made events, the run plan's configs, overrides and
command lines), and, slow, one tiny grid end to end on a tiny pair."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from specedge_jax.bench import goodput
from specedge_jax.measure import metrics
from specedge_jax.serving.serving_config import ServingConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def embedded_config() -> ServingConfig:
  spec = importlib.util.spec_from_file_location(
      "embedded_config", os.path.join(REPO_ROOT, "configs", "embedded.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return ServingConfig.from_mapping(module.get_config())


# -- capacity, SLO, bound ------------------------------------------------------------------------


def test_capacity_is_the_largest_count_below_which_every_count_meets_the_target():
  assert goodput.capacity({2: 1.0, 4: 0.95, 6: 0.85, 8: 0.95}) == 4  # 8 passes above a failure
  assert goodput.capacity({2: 1.0, 4: 0.9, 6: 0.9}) == 6  # the target itself meets it
  assert goodput.capacity({2: 0.5, 4: 1.0}) is None  # not even the lowest
  assert goodput.capacity({4: 1.0, 2: 1.0}) == 4  # order of the mapping does not matter
  assert goodput.capacity({2: 1.0, 4: None, 6: 1.0}) == 2  # no figure counts as a miss
  assert goodput.capacity({2: 0.8, 4: 0.75}, target=0.75) == 4


def test_slo_from_the_pilot_rounds_up_to_whole_milliseconds():
  assert goodput.slo_from_pilot(0.0167, 1.5) == 26  # 25.05 ms
  assert goodput.slo_from_pilot(0.020, 1.5) == 30  # exactly 30 stays 30
  with pytest.raises(ValueError):
    goodput.slo_from_pilot(0.0, 1.5)


def test_bound_and_efficiency_arithmetic():
  # 3 tokens per step, 4 lanes, 8 ms per verify: 12 tokens per 8 ms.
  assert goodput.bound_tokens_per_s(3.0, 4.0, 0.008) == pytest.approx(1500.0)
  assert goodput.efficiency(1350.0, 1500.0) == pytest.approx(0.9)
  assert goodput.efficiency(None, 1500.0) is None and goodput.efficiency(10.0, None) is None
  with pytest.raises(ValueError):
    goodput.bound_tokens_per_s(3.0, 4.0, 0.0)
  assert goodput.goodput_ratio(3.0, 2.0) == pytest.approx(1.5)
  assert goodput.goodput_ratio(1.0, 0.0) == math.inf
  assert goodput.goodput_ratio(0.0, 0.0) is None and goodput.goodput_ratio(None, 1.0) is None


def _linear_curve():
  # ms = 1 + B + 0.5 T on the grid: bilinear interpolation is exact for it.
  return goodput.VerifyCurve.from_json({"prefix_len": 502, "verify_curve": [
      {"batch_size": b, "tree_tokens": t, "median_ms": 1.0 + b + 0.5 * t}
      for b in (1, 2, 4) for t in (2, 5, 9)]})


def test_verify_curve_interpolates_bilinearly_and_flags_clamping():
  curve = _linear_curve()
  assert curve.prefix_len == 502
  ms, clamped = curve.ms(3.0, 4.0)
  assert ms == pytest.approx(1.0 + 3.0 + 2.0) and not clamped
  ms, clamped = curve.ms(4.0, 9.0)  # a grid corner
  assert ms == pytest.approx(9.5) and not clamped
  ms, clamped = curve.ms(6.0, 1.0)  # outside both ways: the nearest edge's value
  assert ms == pytest.approx(1.0 + 4.0 + 1.0) and clamped
  with pytest.raises(ValueError):
    goodput.VerifyCurve.from_json({"verify_curve": []})


def _specedge_events():
  """Two requests on two clients; request a's two rounds and b's one, in two verify forwards
  (a alone, then a and b together), of known shape and time."""
  events = []

  def step(request, t, n, *, phase="verify", draft=0.0, wait=0.0, queue=0.0, forward=0.0,
           depth=1, tree=8, limits=None):
    event = {"kind": "request_step", "system": "specedge", "t": t,
             "client_id": f"edge-{request}", "request_id": request, "n_tokens": n,
             "phase": phase, "tree_size": tree, "accepted_depth": depth, "draft_time_s": draft,
             "wait_time_s": wait}
    if phase == "verify":
      event.update(server_queue_time_s=queue, server_forward_time_s=forward,
                   tree_limits=limits)
    else:
      event.update(accepted_depth=None, tree_size=0)
    events.append(event)

  for request, start in (("a", 0.0), ("b", 0.5)):
    events.append({"kind": "request_start", "system": "specedge", "t": start,
                   "client_id": f"edge-{request}", "request_id": request})
  step("a", 0.1, 1, phase="prefill")
  step("a", 0.2, 3, draft=0.010, wait=0.060, queue=0.010, forward=0.020, depth=2,
       limits=[6, 3])
  step("b", 0.6, 1, phase="prefill")
  step("a", 0.8, 1, draft=0.010, wait=0.060, queue=0.010, forward=0.040, depth=0, limits=[4, 2])
  step("b", 0.8, 4, draft=0.020, wait=0.100, queue=0.030, forward=0.040, depth=3)
  for t_start, batch, tokens, forward in ((0.15, 1, 9, 0.020), (0.75, 2, 14, 0.040)):
    events.append({"kind": "server_batch", "system": "specedge", "t_start": t_start,
                   "t_end": t_start + forward, "op": "verify", "batch_size": batch,
                   "tokens": tokens, "forward_time_s": forward, "truncated_nodes": 1})
  events.append({"kind": "server_batch", "system": "specedge", "t_start": 0.05, "t_end": 0.09,
                 "op": "prefill", "batch_size": 1, "tokens": 20, "forward_time_s": 0.04})
  return events


def test_itl_breakdown_adds_up_to_the_mean_itl():
  events = _specedge_events()
  breakdown = goodput.itl_breakdown(events)
  tokens = 3 + 1 + 4
  assert breakdown.rounds == 3 and breakdown.tokens_per_round == pytest.approx(tokens / 3)
  assert breakdown.draft_ms == pytest.approx(1000 * 0.040 / tokens)
  assert breakdown.server_queue_ms == pytest.approx(1000 * 0.050 / tokens)
  assert breakdown.server_forward_ms == pytest.approx(1000 * 0.100 / tokens)
  assert breakdown.network_ms == pytest.approx(1000 * (0.220 - 0.050 - 0.100) / tokens)
  gaps = (0.2 - 0.1) + (0.8 - 0.2) + (0.8 - 0.6)
  assert breakdown.itl_ms == pytest.approx(1000 * gaps / tokens)
  assert breakdown.edge_other_ms == pytest.approx(1000 * (gaps - 0.040 - 0.220) / tokens)
  terms = sum(getattr(breakdown, term) for term in goodput.ItlBreakdown.TERMS)
  assert terms == pytest.approx(breakdown.itl_ms)
  # The metrics module's token-weighted mean ITL is the same quantity.
  run = metrics.parse_run("r", events)
  assert 1000 * metrics.summarize(run).requests.itl.mean_s == pytest.approx(breakdown.itl_ms)
  assert breakdown.largest == "edge_other"


def test_server_efficiency_against_the_curve():
  events = _specedge_events()
  run = metrics.parse_run("r", events)
  summary = metrics.summarize(run, itl_slo_s=0.05)
  curve = _linear_curve()
  figures = goodput.server_efficiency(run, summary, curve)
  assert figures.mean_batch == pytest.approx(3 / 2)  # lanes over forwards
  assert figures.mean_tree_tokens == pytest.approx(23 / 3)  # tree tokens over lanes
  assert figures.tokens_per_step == pytest.approx((3 + 1 + 4) / 3)
  curve_ms, clamped = curve.ms(1.5, 23 / 3)
  assert figures.curve_ms == pytest.approx(curve_ms) and not clamped
  bound = (8 / 3) * 1.5 / (curve_ms / 1000)
  assert figures.bound_tokens_per_s == pytest.approx(bound)
  compute_s = 0.020 + 0.040 + 0.040  # the two verifies and the prefill
  assert figures.measured_tokens_per_s == pytest.approx(10 / compute_s)
  assert figures.efficiency == pytest.approx(10 / compute_s / bound)
  # Verify-only: the tokens of verify steps over verify forwards, i.e. curve / measured forward.
  assert figures.verify_tokens_per_s == pytest.approx(8 / 0.060)
  assert figures.mean_forward_ms == pytest.approx(30.0)
  assert figures.verify_efficiency == pytest.approx(curve_ms / 30.0)
  assert figures.prefill_share == pytest.approx(0.040 / compute_s)
  assert goodput.server_efficiency(run, summary, None).bound_tokens_per_s is None


def test_start_spread_open_requests_and_controller_figures():
  events = _specedge_events()
  assert goodput.start_spread_s(events) == pytest.approx(0.5)
  run = metrics.parse_run("r", events)
  assert run.wall_time_s == pytest.approx(0.8)
  assert goodput.mean_open_requests(run) == pytest.approx((0.8 + 0.3) / 0.8)
  figures = goodput.controller_figures(events)
  assert figures == {"mean_tree_sent": pytest.approx(8.0), "mean_advised_budget": 5.0,
                     "mean_advised_depth": 2.5}


# -- the plan ------------------------------------------------------------------------------------


def test_plan_orders_the_systems_per_client_count_and_sets_only_what_differs(tmp_path):
  base = embedded_config()
  options = goodput.GoodputOptions(out_dir=str(tmp_path), clients=(4, 2))
  runs = goodput.plan_runs(base, options, itl_slo_ms=30, use_netns=True)
  assert [r.name for r in runs] == [
      "specedge_static/c2", "specedge_slo/c2", "server_only_ar/c2",
      "specedge_static/c4", "specedge_slo/c4", "server_only_ar/c4"]
  by_name = {r.name: r for r in runs}
  for run in runs:
    # The overrides are the whole difference: applied to the base they give the run's config.
    assert goodput.apply_overrides(base, run.overrides) == run.config
  static, slo = by_name["specedge_static/c4"], by_name["specedge_slo/c4"]
  assert static.config.edge.num_drafters == 4 and static.config.edge.requests_per_drafter == 2
  assert static.config.workload.num_requests == 16 and static.config.workload.source == "c4"
  assert static.config.server.num_slots == max(base.server.num_slots, 8)
  assert static.config.models.drafts == options.drafts
  assert static.config.server.batching.mode == base.server.batching.mode == "static"
  assert static.drafter_rtts_ms == (5.0, 14.0, 40.0, 5.0)
  # The slo system differs from static by exactly the scheduler, the SLO, the controller, the
  # tree buckets and SLO-aware admission.
  extra = {k: v for k, v in slo.overrides.items() if static.overrides.get(k) != v}
  assert extra == {"server.batching.mode": "slo", "server.speculation_control": True,
                   "server.tree_buckets": (3, 5, 7), "edge.itl_slo_ms": 30,
                   "server.slo_admission": True}
  ar = by_name["server_only_ar/c4"].config
  assert ar.server.max_batch_size == min(base.server.max_batch_size, 8)
  assert ar.server.num_slots == ar.server.max_batch_size
  assert ar.workload == static.config.workload  # the same requests
  assert by_name["server_only_ar/c4"].drafter_rtts_ms == ()
  # Without an SLO yet (the pilot decides it) no slo run is planned.
  assert all(r.system != goodput.SPECEDGE_SLO
             for r in goodput.plan_runs(base, options, None, use_netns=True))


def test_the_ablations_take_the_slo_system_apart(tmp_path):
  base = embedded_config()
  options = goodput.GoodputOptions(out_dir=str(tmp_path), clients=(2,),
                                   systems=goodput.ALL_SYSTEMS)
  runs = {r.system: r for r in goodput.plan_runs(base, options, itl_slo_ms=30, use_netns=True)}
  assert list(runs) == list(goodput.ALL_SYSTEMS)
  static = runs[goodput.SPECEDGE_STATIC].overrides

  def extra(system):
    return {k: v for k, v in runs[system].overrides.items() if static.get(k) != v}

  assert extra(goodput.SPECEDGE_SLO_BATCHING) == {"server.batching.mode": "slo",
                                                  "edge.itl_slo_ms": 30}
  assert extra(goodput.SPECEDGE_CONTROLLER) == {"server.speculation_control": True,
                                                "server.tree_buckets": (3, 5, 7),
                                                "edge.itl_slo_ms": 30}
  only_ar = goodput.GoodputOptions(out_dir=str(tmp_path), clients=(2,),
                                   systems=(goodput.SERVER_ONLY_AR,))
  assert [r.name for r in goodput.plan_runs(base, only_ar, None, True)] == ["server_only_ar/c2"]
  with pytest.raises(ValueError):
    goodput.GoodputOptions(out_dir=str(tmp_path), systems=("specedge_fast",))


def test_command_lines_reproduce_the_configs(tmp_path):
  base = embedded_config()
  options = goodput.GoodputOptions(out_dir=str(tmp_path), clients=(4,))
  static, slo, ar = goodput.plan_runs(base, options, itl_slo_ms=30, use_netns=True)
  argv = goodput.command_line(slo, options, "/out/slo")
  assert argv[:4] == ["python", "-m", "launch.local", "--out_dir=/out/slo"]
  assert "--netns" in argv and "--netns_rtts=5,14,40,5" in argv
  assert "--verifier_cpus=0" in argv and "--drafter_cpus=1" in argv
  # The verifier's network threads stay beside its compute unless asked (serving/io_threads.py).
  assert not any(a.startswith("--verifier_io_cpus") for a in argv)
  moved = goodput.command_line(slo, dataclasses.replace(options, verifier_io_cpus=(1,)), "/o")
  assert "--verifier_io_cpus=1" in moved
  flags = dict(goodput.parse_config_flag(a) for a in argv if a.startswith("--config."))
  assert flags == {k: (tuple(v) if isinstance(v, tuple) else v)
                   for k, v in slo.overrides.items()}
  assert goodput.apply_overrides(base, flags) == slo.config
  assert "--config.server.batching.mode=slo" in argv
  assert "--config.server.tree_buckets=(3, 5, 7)" in argv
  assert "--config.server.speculation_control=True" in argv
  ar_argv = goodput.command_line(ar, options, "/out/ar")
  assert ar_argv[:4] == ["python", "-m", "launch.server_only", "--baseline=autoregressive"]
  assert "--cpus=0" in ar_argv and "--netns" not in ar_argv
  assert "--config.server.num_slots=4" in ar_argv
  # Where namespaces are impossible every drafter simulates the mean RTT.
  simulated, *_ = goodput.plan_runs(base, options, itl_slo_ms=30, use_netns=False)
  assert simulated.drafter_rtts_ms == ()
  assert simulated.config.edge.simulated_rtt_ms == pytest.approx((5 + 14 + 40) / 3)
  assert "--netns" not in goodput.command_line(simulated, options, "/out/s")
  pilot = goodput.pilot_run(base, options, use_netns=True)
  assert pilot.name == "pilot/c4" and pilot.config == static.config


def test_curve_command_measures_what_the_bound_needs(tmp_path):
  base = embedded_config()
  options = goodput.GoodputOptions(out_dir=str(tmp_path), verifier_cpus=())
  argv = goodput.curve_command(base, options, "/out")
  assert argv[1:3] == ["-m", "launch.bench_core"]
  assert "--gen_batch_sizes=" in argv and "--layerwise" in argv
  assert "--batch_sizes=1,2,3,4" in argv  # up to server.max_batch_size
  assert "--tree_sizes=2,3,5,7,9" in argv  # up to the largest tree (budget 8 + root)
  # A cache of server.max_len rows, as many as the verifier attends (attention_min_rows 512).
  assert f"--prefix_len={base.server.max_len - 9 - 1}" in argv
  assert "--out_json=/out/verify_curve.json" in argv


def test_options_are_checked(tmp_path):
  with pytest.raises(ValueError):
    goodput.GoodputOptions(out_dir=str(tmp_path), clients=(2, 2))
  with pytest.raises(ValueError):
    goodput.GoodputOptions(out_dir=str(tmp_path), itl_slo_ms=0)
  with pytest.raises(ValueError):
    goodput.GoodputOptions(out_dir=str(tmp_path), rtts_ms=())
  assert goodput.GoodputOptions(out_dir="x").rtts_for(4) == (5.0, 14.0, 40.0, 5.0)


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.heavy  # ~60 s: the benchmark end to end on a tiny grid
def test_tiny_grid_end_to_end(served_pair_dirs, compilation_cache, tmp_path):
  """One client count, two requests of four tokens, the SLO and curve given (no pilot, no curve
  run), simulated RTT: every system runs, the start gate holds, the report and plots are written
  and read back."""
  curve = tmp_path / "curve.json"
  curve.write_text(json.dumps({"verify_curve": [
      {"batch_size": b, "tree_tokens": t, "median_ms": 1.0 + b + 0.1 * t}
      for b in (1, 2) for t in (2, 7)]}))
  out_dir = tmp_path / "goodput"
  done = subprocess.run(
      [sys.executable, "-m", "launch.bench_goodput",
       f"--config.models.target={served_pair_dirs['target']}",
       f"--config.models.draft={served_pair_dirs['draft']}",
       "--config.tree.max_n_beams=2", "--config.tree.max_beam_len=3",
       "--config.tree.max_branch_width=2", "--config.tree.max_budget=6",
       "--config.server.max_batch_size=2", f"--drafts={served_pair_dirs['draft']}",
       "--clients=1", "--requests_per_client=2", "--max_new_tokens=4", "--source=embedded",
       "--nonetns", "--itl_slo_ms=1000", "--tree_buckets=3", f"--verify_curve={curve}",
       f"--out_dir={out_dir}", f"--compilation_cache_dir={compilation_cache}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "COLUMNS": "250"})
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "Goodput under an ITL SLO of 1000 ms" in done.stdout, done.stdout
  report = json.loads((out_dir / "goodput.json").read_text())
  assert report["itl_slo_ms"] == 1000 and report["environment"]["links"] == "simulated"
  rows = {(r["system"], r["clients"]): r for r in report["rows"]}
  assert set(rows) == {(s, 1) for s in goodput.SYSTEMS}
  for row in rows.values():
    assert row["requests"] == 2 and row["summary"]["generated_tokens"] == 8
    assert row["slo_attainment"] == 1.0  # a 1 s SLO is met by all
    assert row["same_tokens_as_ar"] in (None, True)  # greedy: the target's own tokens
  for system in (goodput.SPECEDGE_STATIC, goodput.SPECEDGE_SLO):
    assert rows[(system, 1)]["efficiency"]["bound_tokens_per_s"] > 0
  gates = {r["name"]: r["start_gate"] for r in report["runs"]}
  assert gates["specedge_static/c1"]["held"] and gates["specedge_static/c1"][
      "all_drafters_ready"]
  assert report["capacity"] == {s: 1 for s in goodput.SYSTEMS}
  for name in ("goodput_vs_clients.png", "attainment_vs_clients.png", "efficiency_vs_bound.png",
               "itl_breakdown.png"):
    assert (out_dir / name).stat().st_size > 0
  # The folder summarizes again from its logs alone.
  again = goodput.resummarize(str(out_dir))
  assert [r.run for r in again.rows] == [r["run"] for r in report["rows"]]


# -- repeats and intervals -----------------------------------------------------------------------


def test_repeats_plan_whole_passes_in_order(tmp_path):
  base = embedded_config()
  options = goodput.GoodputOptions(out_dir=str(tmp_path), clients=(2, 4), repeats=2,
                                   systems=(goodput.SPECEDGE_STATIC, goodput.SPECEDGE_SLO))
  runs = goodput.plan_runs(base, options, itl_slo_ms=30, use_netns=True)
  # Pass after pass, so that drift over the benchmark reaches every system alike.
  assert [r.name for r in runs] == [
      "specedge_static/c2/r0", "specedge_slo/c2/r0", "specedge_static/c4/r0",
      "specedge_slo/c4/r0", "specedge_static/c2/r1", "specedge_slo/c2/r1",
      "specedge_static/c4/r1", "specedge_slo/c4/r1"]
  assert [r.repeat for r in runs] == [0] * 4 + [1] * 4
  assert len({r.folder for r in runs}) == len(runs)
  # The same config in every pass.
  assert runs[0].config == runs[4].config and runs[0].overrides == runs[4].overrides
  with pytest.raises(ValueError, match="repeats"):
    goodput.GoodputOptions(out_dir=str(tmp_path), repeats=0)


def test_paired_ratio_is_the_geometric_mean_with_a_t_interval_on_logs():
  # Per pass: 2.0 / 1.0 = 2, 3.0 / 1.0 = 3, 2.0 / 0.5 = 4.
  estimate = goodput.paired_ratio([2.0, 3.0, 2.0], [1.0, 1.0, 0.5])
  assert estimate.per_run == (2.0, 3.0, 4.0)
  assert estimate.value == pytest.approx(24.0 ** (1 / 3))
  logs = np.log([2.0, 3.0, 4.0])
  half = 4.302652729911275 * logs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 dof)
  assert estimate.interval == pytest.approx((np.exp(logs.mean() - half),
                                             np.exp(logs.mean() + half)))
  assert estimate.interval[0] < estimate.value < estimate.interval[1]
  # One pass: its ratio, no interval.
  assert goodput.paired_ratio([3.0], [2.0]) == goodput.RatioEstimate(1.5, None, (1.5,))
  # A pass with nothing met leaves the logs undefined: the pooled ratio, no interval.
  pooled = goodput.paired_ratio([0.0, 3.0], [1.0, 1.0])
  assert pooled.value == pytest.approx(1.5) and pooled.interval is None
  assert pooled.per_run == (0.0, 3.0)
  # Identical passes: a zero-width interval at the value.
  same = goodput.paired_ratio([2.0, 2.0], [1.0, 1.0])
  assert same.value == pytest.approx(2.0) and same.interval == pytest.approx((2.0, 2.0))


def test_a_point_pools_its_passes():
  point = goodput.PointGoodput(system="specedge_slo", clients=8, requests=64, met=24,
                               wall_time_s=12.0, per_run=(1.5, 2.5),
                               attainment_per_run=(0.3, 0.45))
  assert point.goodput == pytest.approx(2.0)  # 24 met over 12 s, not the mean of the passes
  assert point.attainment == pytest.approx(24 / 64)
  low, high = point.interval()
  half = 12.706204736174698 * np.std([1.5, 2.5], ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
  assert (low, high) == pytest.approx((2.0 - half, 2.0 + half))
  assert dataclasses.replace(point, per_run=(2.0,)).interval() is None
