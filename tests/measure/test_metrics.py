"""Run metrics on hand-made event logs whose answers are worked out by hand (in the comments).

Times are binary-exact (multiples of 1/8) so the expected values are exact.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, report

# Run "spec" (system specedge), wall [100, 103] = 3 s.
# r1 (edge c0, qa):  start 100; steps 100.5 n3 d2 | 101.0 n2 d1 hit | 102.0 n4 d3 miss
#   TTFT 0.5; ITL samples 0.5/2 = 0.25 x2, 1.0/4 = 0.25 x4; mean ITL (102-100.5)/6 = 0.25.
# r2 (edge c1, rag): start 100; steps 101.0 n1 d0 | 101.125 n1 d0 hit | 102.0 n0 (no tokens:
#   ignored, does not reset the clock) | 103.0 n2 d1 hit
#   TTFT 1.0; ITL samples 0.125 x1, (103-101.125)/2 = 0.9375 x2; mean ITL 2/3.
SPEC_STEPS = [
    ("r1", "c0", 100.5, 3, 2, None), ("r1", "c0", 101.0, 2, 1, True),
    ("r1", "c0", 102.0, 4, 3, False),
    ("r2", "c1", 101.0, 1, 0, None), ("r2", "c1", 101.125, 1, 0, True),
    ("r2", "c1", 102.0, 0, None, None), ("r2", "c1", 103.0, 2, 1, True),
]
# (op, t_start, t_end, forward_time_s). Busy union: [100, 100.5] + [100.875, 101] +
# [101.5, 102.25] = 1.375 s (the last two verify batches overlap). Compute sum 1.325 s.
SPEC_BATCHES = [("prefill", 100.0, 100.25, 0.25), ("verify", 100.25, 100.5, 0.2),
                ("verify", 100.875, 101.0, 0.125), ("verify", 101.5, 102.0, 0.5),
                ("verify", 101.75, 102.25, 0.25)]
# Edge c0 busy: union([100, 100.5], [100.25, 100.75]) + [101, 101.5] = 1.25 s; c1: 1.0 s.
SPEC_EDGE = [("c0", 100.0, 100.5), ("c0", 100.25, 100.75), ("c0", 101.0, 101.5),
             ("c1", 100.0, 101.0)]


def write_spec_log(path):
  with events_lib.EventLog(path, system="specedge") as log:
    for request_id, client, category in (("r1", "c0", "qa"), ("r2", "c1", "rag")):
      log.emit("request_start", t=100.0, request_id=request_id, client_id=client,
               prompt_tokens=7, dataset="specbench", category=category)
    for request_id, client, t, n, depth, hit in SPEC_STEPS:
      log.emit("request_step", t=t, request_id=request_id, client_id=client, n_tokens=n,
               draft_time_s=0.01, wait_time_s=0.02, tree_size=8, accepted_depth=depth,
               proactive_hit=hit)
    log.emit("request_end", t=102.0, request_id="r1", client_id="c0", n_generated=9,
             finished_reason="length")
    log.emit("request_end", t=103.0, request_id="r2", client_id="c1", n_generated=4,
             finished_reason="eos")
    for op, t_start, t_end, forward in SPEC_BATCHES:
      log.emit("server_batch", t=t_end, t_start=t_start, t_end=t_end, op=op, batch_size=2,
               tokens=16, forward_time_s=forward, queue_time_s=0.0, request_ids=["r1", "r2"])
    for client, t_start, t_end in SPEC_EDGE:
      log.emit("edge_busy", t=t_end, client_id=client, t_start=t_start, t_end=t_end)


def write_baseline_log(path):
  """Server-only autoregressive baseline, run_id 'ar-c1': one request, wall [0, 4].

  start 0; steps 1, 2, 4 (one token each): TTFT 1; ITL samples 1, 2.
  """
  with events_lib.EventLog(path, system="server_only_ar") as log:
    log.emit("request_start", t=0.0, run_id="ar-c1", request_id="a", client_id="u0",
             prompt_tokens=3, dataset="c4", category=None)
    for t in (1.0, 2.0, 4.0):
      log.emit("request_step", t=t, run_id="ar-c1", request_id="a", client_id="u0",
               n_tokens=1, accepted_depth=None, proactive_hit=None)
      log.emit("server_batch", t=t, run_id="ar-c1", t_start=t - 0.5, t_end=t, op="decode",
               batch_size=1, tokens=1, forward_time_s=0.5)


@pytest.fixture
def logs(tmp_path):
  write_spec_log(tmp_path / "spec" / "server.jsonl")
  write_baseline_log(tmp_path / "ar" / "server.jsonl")
  return tmp_path


def summaries_of(paths, **kwargs):
  _, summaries = metrics.summarize_events(events_lib.read_events(paths), **kwargs)
  return {s.run: s for s in summaries}


def test_runs_group_by_run_id_else_system(logs):
  runs = summaries_of([logs / "spec" / "server.jsonl", logs / "ar" / "server.jsonl"])
  assert set(runs) == {"specedge", "ar-c1"}
  assert runs["ar-c1"].system == "server_only_ar"


def test_throughput_and_server_time(logs):
  s = summaries_of([logs / "spec" / "server.jsonl"])["specedge"]
  assert s.wall_time_s == 3.0
  assert s.generated_tokens == 13
  assert s.server_compute_s == pytest.approx(1.325)
  assert s.throughput_per_compute_s == pytest.approx(13 / 1.325)
  assert s.throughput_per_wall_s == pytest.approx(13 / 3)
  assert s.server_busy_s == pytest.approx(1.375)
  assert s.server_utilization == pytest.approx(1.375 / 3)
  assert (s.n_clients, s.n_edges) == (2, 2)
  assert s.mean_edge_busy_s == pytest.approx(1.125)
  assert s.mean_edge_idle_s == pytest.approx(1.875)
  assert s.mean_edge_idle_fraction == pytest.approx(0.625)


def test_ttft_and_token_weighted_itl(logs):
  s = summaries_of([logs / "spec" / "server.jsonl"])["specedge"].requests
  assert (s.ttft.count, s.ttft.mean_s, s.ttft.p50_s) == (2, 0.75, 0.75)
  assert s.ttft.p99_s == pytest.approx(0.5 + 0.99 * 0.5)
  # Sorted samples: 0.125, 0.25 x6, 0.9375 x2. An unweighted mean of the four steps would be
  # 0.390625; resetting the clock at the empty step would make the last gap 0.5.
  assert s.itl.count == 9
  assert s.itl.mean_s == pytest.approx(3.5 / 9)
  assert s.itl.p50_s == 0.25
  assert s.itl.p99_s == 0.9375


def test_itl_percentiles_interpolate_over_tokens():
  run = metrics.parse_run("x", [
      {"kind": "request_start", "t": 0.0, "request_id": "q", "client_id": "c",
       "prompt_tokens": 1},
      *[{"kind": "request_step", "t": t, "request_id": "q", "client_id": "c", "n_tokens": n}
        for t, n in ((1.0, 1), (2.0, 4), (5.0, 1))]])
  # Samples: 0.25 x4 (1 s over 4 tokens), 3.0 x1. p50 = 0.25; p99 at rank 0.99*4 = 3.96:
  # 0.25 + 0.96 * (3 - 0.25).
  itl = metrics.summarize(run).requests.itl
  assert itl.p50_s == 0.25 and itl.mean_s == pytest.approx(4.0 / 5)
  assert itl.p99_s == pytest.approx(0.25 + 0.96 * 2.75)
  np.testing.assert_allclose(np.sort(run.itl_samples()), [0.25] * 4 + [3.0])


def test_acceptance_and_proactive_hit_rate(logs):
  s = summaries_of([logs / "spec" / "server.jsonl"])["specedge"].requests
  # Verification depths 2, 1, 3, 0, 0, 1 (the empty step has none); tokens 3, 2, 4, 1, 1, 2.
  assert s.n_verifications == 6
  assert s.mean_accepted_depth == pytest.approx(7 / 6)
  assert s.mean_tokens_per_step == pytest.approx(13 / 6)
  assert s.accepted_depth_histogram == {0: 2, 1: 2, 2: 1, 3: 1}
  assert s.acceptance_by_depth == pytest.approx({1: 4 / 6, 2: 2 / 4, 3: 1 / 2})
  assert s.proactive_hit_rate == pytest.approx(3 / 4)


def test_cost_from_price_table(logs):
  s = summaries_of([logs / "spec" / "server.jsonl"])["specedge"]
  server = 3.0 / 3600 * 5.05  # A100-80GB for the whole wall time
  edge = (1.25 + 1.0) / 3600 * 0.35  # RTX 4090 for each edge's busy time
  assert s.cost.server_usd == pytest.approx(server)
  assert s.cost.edge_usd == pytest.approx(edge)
  assert s.cost.tokens_per_usd == pytest.approx(13 / (server + edge))
  assert s.cost.usd_per_million_tokens == pytest.approx((server + edge) / 13 * 1e6)
  cheap = metrics.CostConfig(server_gpu="H100", edge_gpu="RTX 4090",
                             gpu_prices_per_hour=metrics.parse_gpu_prices(["H100=2.0"]))
  s = summaries_of([logs / "spec" / "server.jsonl"], cost_config=cheap)["specedge"]
  assert s.cost.server_usd == pytest.approx(3.0 / 3600 * 2.0)


def test_server_only_run_has_no_edge_cost_or_acceptance(logs):
  s = summaries_of([logs / "ar" / "server.jsonl"])["ar-c1"]
  assert s.wall_time_s == 4.0 and s.generated_tokens == 3
  assert s.cost.edge_usd == 0.0 and s.mean_edge_idle_s is None
  assert s.requests.mean_accepted_depth is None and s.requests.accepted_depth_histogram == {}
  assert s.requests.proactive_hit_rate is None
  assert s.requests.itl.mean_s == 1.5 and s.requests.ttft.mean_s == 1.0
  assert s.server_compute_s == 1.5 and s.server_utilization == pytest.approx(1.5 / 4)
  assert s.categories == {}


def test_goodput_under_itl_slo_and_categories(logs):
  s = summaries_of([logs / "spec" / "server.jsonl"], itl_slo_s=0.3)["specedge"]
  # r1 (mean ITL 0.25) meets 0.3 s, r2 (2/3 s) does not.
  assert s.requests.slo_met_requests == 1 and s.requests.slo_attainment == 0.5
  assert s.requests.goodput_tokens_per_s == pytest.approx(9 / 3)
  assert set(s.categories) == {"qa", "rag"}
  qa, rag = s.categories["qa"], s.categories["rag"]
  assert (qa.n_requests, qa.generated_tokens, qa.itl.mean_s) == (1, 9, 0.25)
  assert qa.goodput_tokens_per_s == pytest.approx(3.0) and qa.slo_attainment == 1.0
  assert rag.itl.mean_s == pytest.approx(2 / 3) and rag.goodput_tokens_per_s == 0.0
  assert rag.mean_accepted_depth == pytest.approx(1 / 3)
  assert rag.proactive_hit_rate == 1.0 and qa.proactive_hit_rate == 0.5
  loose = summaries_of([logs / "spec" / "server.jsonl"], itl_slo_s=1.0)["specedge"]
  assert loose.requests.goodput_tokens_per_s == pytest.approx(13 / 3)
  unset = summaries_of([logs / "spec" / "server.jsonl"])["specedge"]
  assert unset.requests.goodput_tokens_per_s is None


def test_single_step_request_meets_any_slo():
  run = metrics.parse_run("x", [
      {"kind": "request_start", "t": 0.0, "request_id": "q", "client_id": "c",
       "prompt_tokens": 1},
      {"kind": "request_step", "t": 2.0, "request_id": "q", "client_id": "c", "n_tokens": 5}])
  s = metrics.summarize(run, itl_slo_s=1e-6)
  assert s.requests.itl.count == 0 and s.requests.itl.mean_s is None
  assert s.requests.slo_attainment == 1.0 and s.requests.goodput_tokens_per_s == 2.5


def test_interval_union():
  assert metrics.interval_union_length([(0, 1), (0.5, 2), (3, 4), (3.5, 3.75)]) == 3.0
  assert metrics.interval_union_length([(0, 1), (2, 5)], window=(0.5, 3)) == 1.5
  assert metrics.interval_union_length([]) == 0.0


@pytest.mark.parametrize("entry", ["H100", "H100=", "=3", "H100=abc", "H100=-1", "H100=nan"])
def test_bad_gpu_price_is_rejected(entry):
  with pytest.raises(ValueError, match="NAME=DOLLARS_PER_HOUR"):
    metrics.parse_gpu_prices([entry])


def test_unknown_gpu_is_rejected():
  with pytest.raises(ValueError, match="no price for GPU 'TPU'"):
    metrics.CostConfig(server_gpu="TPU")


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_writes_json_and_pngs(logs, tmp_path):
  out_dir = tmp_path / "out"
  paths = report.expand_globs([str(logs / "*" / "server.jsonl")])
  summaries, tables, written = report.build_report(paths, str(out_dir), itl_slo_s=0.3)
  assert len(tables) == 2  # the summary, and the category split of the specedge run
  names = {p.rsplit("/", 1)[-1] for p in written}
  assert names == {"report.json", "throughput_vs_clients.png", "itl_vs_clients.png",
                   "itl_cdf.png", "accepted_length_hist.png", "server_timeline_specedge.png",
                   "server_timeline_ar-c1.png"}
  for path in written:
    if path.endswith(".png"):
      assert _is_png(path) and (out_dir / path.rsplit("/", 1)[-1]).stat().st_size > 1000
  saved = json.loads((out_dir / "report.json").read_text())
  spec = saved["runs"]["specedge"]
  assert spec["generated_tokens"] == 13
  assert spec["requests"]["accepted_depth_histogram"] == {"0": 2, "1": 2, "2": 1, "3": 1}
  assert math.isclose(spec["requests"]["goodput_tokens_per_s"], 3.0)
  assert saved["runs"]["ar-c1"]["requests"]["mean_accepted_depth"] is None


def test_report_launcher(logs, tmp_path):
  # Run the launcher as a user does, in its own process: launchers define absl flags at import,
  # and several define the same names (--out_dir), so two launchers cannot share one process.
  out_dir = tmp_path / "launcher_out"
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "launch.report", f"--events={logs / 'spec' / '*.jsonl'}",
       f"--out_dir={out_dir}", "--itl_slo_ms=300", "--gpu_price=A100-80GB=10"],
      cwd=repo, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Run summary" in result.stdout
  spec = json.loads((out_dir / "report.json").read_text())["runs"]["specedge"]
  assert spec["cost"]["server_usd"] == pytest.approx(3.0 / 3600 * 10)


def test_report_rejects_an_empty_glob(tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no file"):
    report.expand_globs([str(tmp_path / "none*.jsonl")])


def test_wasted_drafting(logs):
  (spec,) = summaries_of([logs / "spec" / "server.jsonl"]).values()
  # Six verify steps of 8 tree tokens each; accepted depths 2, 1, 3 and 0, 0, 1.
  assert spec.requests.tree_tokens_sent == 48
  assert spec.requests.wasted_tree_tokens == (6 + 7 + 5) + (8 + 8 + 7)
  assert spec.requests.wasted_tree_token_fraction == pytest.approx(41 / 48)
  # c0 drafts [100, 100.75] + [101, 101.5]: 0.25 + 0.5 s outside the server's busy union;
  # c1 drafts [100, 101]: 0.375 s outside it. Mean over edges.
  assert spec.mean_edge_draft_while_server_idle_s == pytest.approx((0.75 + 0.375) / 2)
