"""The reference's metric definitions (`reference_metrics.py`) on hand-made event logs, one per
system kind, with every answer worked out by hand in the comments; beside them our definitions
on the same logs, the report's tables and its --plain TSV, and a sweep replotted from its logs.

Times are binary-exact (multiples of 1/8) so the expected values are exact.
"""

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
from rich.console import Console

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, report
from specedge_jax.measure import reference_metrics as ref_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
A100_80 = 5.05 / 3600  # dollars per second
RTX4090 = 0.35 / 3600

# SpecEdge, run "spec". The verifier's batches (op, t_start, t_end, request_ids); forward time is
# t_end - t_start. In t_start order they form three iterations (a verify batch and the batches
# since the previous one):
#   I1 = P1 + V1: prefill of r1, time 0.375, ends 10.625
#   I2 = P2 + V2: prefill of r2, time 0.5, ends 11.5
#   I3 = V3:      no prefill, time 0.125, ends 12.125
# Server log span: first to last t_end = 12.125 - 10.25 = 1.875 s.
SPEC_BATCHES = [("prefill", 10.0, 10.25, ["r1"]), ("verify", 10.5, 10.625, ["r1"]),
                ("prefill", 10.75, 11.0, ["r2"]), ("verify", 11.25, 11.5, ["r1", "r2"]),
                ("verify", 12.0, 12.125, ["r1", "r2"])]
# (request, client, t, n_tokens, draft_time_s, wait_time_s, proactive_hit, phase)
#   r1 s0  first                                        -> prefill step
#   r1 s1  iteration I1: only r1's own prefill           -> clean; its hit makes s2 "after a hit"
#   r1 s2  I2: r2's prefill                              -> prefill step (left out of the ITL)
#   r1 s3  I3                                            -> clean
#   r2 s0  first (I2 holds its prefill)                  -> prefill step
#   r2 s1  I2: only its own prefill                      -> clean
#   r2 s2  I3, after r2 s1's hit                         -> clean, after a hit
SPEC_STEPS = [
    ("r1", "c0", 10.375, 1, 0.0, 0.375, None, "prefill"),
    ("r1", "c0", 10.75, 3, 0.125, 0.25, True, "verify"),
    ("r1", "c0", 11.625, 2, 0.25, 0.5, False, "verify"),
    ("r1", "c0", 12.25, 4, 0.125, 0.125, None, "verify"),
    ("r2", "c1", 11.125, 1, 0.0, 0.5, None, "prefill"),
    ("r2", "c1", 11.625, 2, 0.125, 0.375, True, "verify"),
    ("r2", "c1", 12.25, 3, 0.25, 0.125, None, "verify"),
]
# The draft model's prompt prefill on each edge (0.125 s each) and some drafting.
SPEC_EDGE = [("c0", "prefill", 10.375, 10.5), ("c0", "draft", 10.5, 10.625),
             ("c1", "prefill", 11.125, 11.25), ("c1", "draft", 11.25, 11.375)]


def write_specedge_log(path):
  with events_lib.EventLog(path, system="specedge") as log:
    for request_id, client in (("r1", "c0"), ("r2", "c1")):
      log.emit("request_start", t=10.0, request_id=request_id, client_id=client,
               prompt_tokens=5)
    for op, t_start, t_end, ids in SPEC_BATCHES:
      log.emit("server_batch", t=t_end, t_start=t_start, t_end=t_end, op=op,
               batch_size=len(ids), tokens=8, forward_time_s=t_end - t_start,
               queue_time_s=0.0, request_ids=ids)
    for request_id, client, t, n, draft, wait, hit, phase in SPEC_STEPS:
      log.emit("request_step", t=t, request_id=request_id, client_id=client, n_tokens=n,
               draft_time_s=draft, wait_time_s=wait, tree_size=0 if phase == "prefill" else 8,
               accepted_depth=None if phase == "prefill" else n - 1, proactive_hit=hit,
               phase=phase)
    for client, op, t_start, t_end in SPEC_EDGE:
      log.emit("edge_busy", t=t_end, client_id=client, t_start=t_start, t_end=t_end, op=op)
    for request_id, client, n in (("r1", "c0", 10), ("r2", "c1", 6)):
      log.emit("request_end", t=12.25, request_id=request_id, client_id=client, n_generated=n,
               finished_reason="length")


def _baseline_log(path, system, run_id, schedule):
  """A server-only log in the order the baseline loop writes it (serving/baselines.py):
  admissions (prefill [+ draft_prefill] + a one-token 'prefill' step), then rounds ([draft +]
  verify/decode + one step per request)."""
  speculative = system == "server_only_spec"
  with events_lib.EventLog(path, system=system) as log:
    def batch(op, t_start, t_end, ids):
      log.emit("server_batch", t=t_end, run_id=run_id, t_start=t_start, t_end=t_end, op=op,
               batch_size=len(ids), tokens=len(ids), forward_time_s=t_end - t_start,
               queue_time_s=0.0, request_ids=ids)

    for entry in schedule:
      if entry[0] == "admit":
        _, request_id, t_prefill, t_end = entry
        log.emit("request_start", t=0.0, run_id=run_id, request_id=request_id, client_id="srv",
                 prompt_tokens=5)
        batch("prefill", t_prefill[0], t_prefill[1], [request_id])
        if speculative:
          batch("draft_prefill", t_prefill[1], t_end, [request_id])
        log.emit("request_step", t=t_end, run_id=run_id, request_id=request_id,
                 client_id="srv", n_tokens=1, draft_time_s=0.0,
                 wait_time_s=t_end - t_prefill[1], tree_size=0, accepted_depth=None,
                 proactive_hit=None, phase="prefill")
      else:
        _, t_start, t_mid, t_end, tokens = entry
        ids = list(tokens)
        if speculative:
          batch("draft", t_start, t_mid, ids)
        batch("verify" if speculative else "decode", t_mid, t_end, ids)
        for request_id, n in tokens.items():
          log.emit("request_step", t=t_end, run_id=run_id, request_id=request_id,
                   client_id="srv", n_tokens=n, draft_time_s=t_mid - t_start,
                   wait_time_s=t_end - t_mid, tree_size=4 if speculative else 0,
                   accepted_depth=n - 1 if speculative else None, proactive_hit=None,
                   phase="verify" if speculative else "decode")


# Server-only SpecExec, run "spec-c2". Iterations (draft time + target time):
#   I1 admit a (prefill .25, draft prefill .125) + round 1 (draft .125, verify .25): .25 + .5
#   I2 round 2 (draft .125, verify .125): .25
#   I3 admit b (prefill .25, draft prefill .125) + round 3 (draft .125, verify .25): .25 + .5
#   I4 round 4 (draft .25, verify .25): .5
#   I5 round 5 (draft .125, verify .125): .25
# I1 and I3 ran a prefill.
SPEC_SCHEDULE = [
    ("admit", "a", (0.0, 0.25), 0.375),
    ("round", 0.375, 0.5, 0.75, {"a": 3}),
    ("round", 0.75, 0.875, 1.0, {"a": 2}),
    ("admit", "b", (1.0, 1.25), 1.375),
    ("round", 1.375, 1.5, 1.75, {"a": 4, "b": 2}),
    ("round", 1.75, 2.0, 2.25, {"a": 3, "b": 3}),
    ("round", 2.25, 2.375, 2.5, {"b": 1}),
]
# Target-only autoregressive, run "ar-c2". Iterations (all target time):
#   I1 prefill a .5 + decode .125 = .625, prefill;  I2 decode .125
#   I3 prefill b .25 + decode .25 = .5, prefill;    I4 decode .25;  I5 decode .125
AR_SCHEDULE = [
    ("admit", "a", (0.0, 0.5), 0.5),
    ("round", 0.5, 0.5, 0.625, {"a": 1}),
    ("round", 0.625, 0.625, 0.75, {"a": 1}),
    ("admit", "b", (0.75, 1.0), 1.0),
    ("round", 1.0, 1.0, 1.25, {"a": 1, "b": 1}),
    ("round", 1.25, 1.25, 1.5, {"a": 1, "b": 1}),
    ("round", 1.5, 1.5, 1.625, {"b": 1}),
]


@pytest.fixture
def logs(tmp_path):
  paths = {"spec": tmp_path / "spec" / "events.jsonl",
           "sospec": tmp_path / "sospec" / "events.jsonl",
           "ar": tmp_path / "ar" / "events.jsonl"}
  write_specedge_log(paths["spec"])
  _baseline_log(paths["sospec"], "server_only_spec", "spec-c2", SPEC_SCHEDULE)
  _baseline_log(paths["ar"], "server_only_ar", "ar-c2", AR_SCHEDULE)
  return paths


def reference_of(*paths):
  return ref_lib.summarize_events(events_lib.read_events(paths))


def ours_of(*paths):
  _, summaries = metrics.summarize_events(events_lib.read_events(paths))
  return {s.run: s for s in summaries}


def test_specedge_throughput_itl_and_tokens_per_step(logs):
  r = reference_of(logs["spec"])["specedge"]
  assert (r.kind, r.reference_script) == ("specedge", "src/metric/specedge.py")
  assert (r.n_steps, r.n_iterations, r.n_prefill_iterations) == (7, 3, 2)
  # Every token, the first included (10 + 6), over the server log span.
  assert (r.tokens_counted, r.throughput_time_s) == (16, 1.875)
  assert r.throughput_tok_s == pytest.approx(16 / 1.875)
  # ITL over the later clean steps r1 s1, r1 s3, r2 s1, r2 s2: draft + wait .375 + .25 + .5 +
  # .375 = 1.5 s over 3 + 4 + 2 + 3 = 12 tokens. r1 s2, whose iteration ran r2's prefill, is
  # left out (with it: 2.25 / 14); r2 s1, whose iteration ran only its own, is not.
  assert (r.itl_steps, r.itl_tokens, r.itl_excluded_prefill_steps) == (4, 12, 1)
  assert r.itl_s == 0.125
  # Tokens per step over all seven steps, first included: 1 3 2 4 1 2 3; mean 16/7, sample
  # variance (44 - 16^2/7) / 6 = 26/21.
  assert r.tokens_per_step.count == 7
  assert r.tokens_per_step.mean == pytest.approx(16 / 7)
  assert r.tokens_per_step.std == pytest.approx(math.sqrt(26 / 21))
  # Later steps whose previous step has a known hit flag: r1 s2 (after True), r1 s3 (after
  # False), r2 s2 (after True).
  assert r.proactive_ratio == pytest.approx(2 / 3)


def test_specedge_split_means_and_stds(logs):
  r = reference_of(logs["spec"])["specedge"]
  # Draft, split by step index: the first steps drafted nothing; the later ones .125 .25 .125
  # .125 .25; after a hit: r1 s2 and r2 s2, .25 each.
  assert (r.draft.prefill.count, r.draft.prefill.mean, r.draft.prefill.std) == (2, 0.0, 0.0)
  assert r.draft.non_prefill.mean == pytest.approx(0.875 / 5)
  assert r.draft.non_prefill.std == pytest.approx(math.sqrt(3 * 0.05**2 + 2 * 0.075**2) / 2)
  assert (r.draft.after_hit.count, r.draft.after_hit.mean, r.draft.after_hit.std) == (
      2, 0.25, 0.0)
  # Client-observed target time, split by prefill step: prefill .375 .5 .5, the rest .25 .125
  # .375 .125; after a hit and clean: r2 s2 alone (one sample: no std, as polars).
  assert r.target.prefill.mean == pytest.approx(1.375 / 3)
  # Deviations from 11/24: -1/12, 1/24, 1/24; squares 1/96 in all, over n - 1 = 2.
  assert r.target.prefill.std == pytest.approx(math.sqrt(1 / 192))
  assert r.target.non_prefill.mean == 0.21875
  assert (r.target.after_hit.count, r.target.after_hit.mean, r.target.after_hit.std) == (
      1, 0.125, None)
  # Whole step: prefill .375 .5 .75; the rest .375 .25 .5 .375; after a hit .375.
  assert r.step.prefill.mean == pytest.approx(1.625 / 3)
  assert r.step.non_prefill.mean == 0.375
  assert r.step.non_prefill.std == pytest.approx(math.sqrt(2 * 0.125**2 / 3))
  assert r.step.after_hit.mean == 0.375
  # Server per-batch (per iteration): prefill I1 .375, I2 .5; non-prefill I3 .125.
  assert r.server_batch.prefill.mean == 0.4375
  assert r.server_batch.prefill.std == pytest.approx(0.0625 * math.sqrt(2))
  assert (r.server_batch.non_prefill.count, r.server_batch.non_prefill.mean) == (1, 0.125)
  assert r.server_batch.after_hit is None
  assert (r.draft_model_prefill.count, r.draft_model_prefill.mean) == (2, 0.125)


def test_specedge_edge_cost_bills_draft_and_wait_per_step(logs):
  r = reference_of(logs["spec"])["specedge"]
  # Every step's draft + wait: r1 .375 + .375 + .75 + .25, r2 .5 + .5 + .375 = 3.125 s, plus the
  # two draft-model prefills .25 s. (Our definition bills the edges' busy time: .5 s.)
  assert r.edge_running_time_s == 3.375
  assert r.server_running_time_s == 1.875
  assert r.server_usd == pytest.approx(1.875 * A100_80)
  assert r.edge_usd == pytest.approx(3.375 * RTX4090)
  assert r.usd_per_million_tokens == pytest.approx(
      (1.875 * A100_80 + 3.375 * RTX4090) / 16 * 1e6)
  ours = ours_of(logs["spec"])["specedge"]
  assert ours.cost.edge_usd == pytest.approx(0.5 * RTX4090)
  cheap = metrics.CostConfig(server_gpu="H100", gpu_prices_per_hour=metrics.parse_gpu_prices(
      ["H100=3.6", "RTX 4090=0.36"]))
  r = ref_lib.summarize_events(events_lib.read_events([logs["spec"]]), cheap)["specedge"]
  assert (r.server_usd, r.edge_usd) == pytest.approx((1.875 / 1000, 3.375 / 10000))


def test_specedge_ours_differs_on_the_same_log(logs):
  ours = ours_of(logs["spec"])["specedge"]
  # Ours: 16 tokens over summed forward time .25 + .125 + .25 + .25 + .125 = 1 s; wall
  # [10, 12.25]; ITL gaps .375 .875 .625 | .5 .625 = 3 s over 14 tokens; tokens per verification
  # 3 2 4 2 3 (the first token left out).
  assert ours.throughput_per_compute_s == 16.0
  assert ours.throughput_per_wall_s == pytest.approx(16 / 2.25)
  assert ours.requests.itl.mean_s == pytest.approx(3 / 14)
  assert ours.requests.mean_tokens_per_step == pytest.approx(2.8)


def test_server_only_spec_counts_only_iterations_without_prefill(logs):
  r = reference_of(logs["sospec"])["spec-c2"]
  assert (r.kind, r.n_iterations, r.n_prefill_iterations) == ("server_only_spec", 5, 2)
  # Non-prefill steps: a's in I2 (2) and I4 (3), b's in I4 (3) and I5 (1) = 9 tokens, over
  # I2 + I4 + I5 = .25 + .5 + .25 = 1 s. Ours: 20 tokens / 2.5 s of forwards = 8.
  assert (r.tokens_counted, r.throughput_time_s, r.throughput_tok_s) == (9, 1.0, 9.0)
  assert ours_of(logs["sospec"])["spec-c2"].throughput_per_compute_s == 8.0
  # ITL: those steps' iteration times .25 + .5 + .5 + .25 over 9 tokens. Left out: a's rounds 1
  # and 3 and b's round 3, which share an iteration with a prefill.
  assert r.itl_s == pytest.approx(1.5 / 9)
  assert (r.itl_steps, r.itl_excluded_prefill_steps) == (4, 3)
  # Tokens per step, the one-token prefill steps included: a 1 3 2 4 3, b 1 2 3 1.
  assert r.tokens_per_step.count == 9
  assert r.tokens_per_step.mean == pytest.approx(20 / 9)
  # Every row carries its iteration's times. Draft by step index: the first steps' iterations
  # I1, I3 (.25 each); the later ones I1 I2 I3 I4 | I3 I4 I5 = .25 .125 .25 .25 .25 .25 .125.
  assert (r.draft.prefill.mean, r.draft.prefill.std) == (0.25, 0.0)
  assert r.draft.non_prefill.mean == pytest.approx(1.5 / 7)
  # Target: prefill steps all in I1 or I3 (.5); the rest I2 .125, I4 .25, I4 .25, I5 .125.
  assert (r.target.prefill.count, r.target.prefill.mean, r.target.prefill.std) == (5, 0.5, 0.0)
  assert r.target.non_prefill.mean == 0.1875
  assert r.step.non_prefill.mean == pytest.approx(1.5 / 4)
  assert r.server_batch.prefill.mean == 0.75
  assert r.server_batch.non_prefill.mean == pytest.approx(1 / 3)
  assert r.target.after_hit.count == 0 and r.proactive_ratio is None
  # Server: every iteration 2.5 s runs; the non-prefill 1 s is billed; no edge.
  assert r.server_running_time_s == 2.5
  assert r.server_usd == pytest.approx(1.0 * A100_80)
  assert r.edge_usd is None and r.edge_running_time_s is None and r.draft_model_prefill is None
  assert r.usd_per_million_tokens == pytest.approx(A100_80 / 9 * 1e6)


def test_autoregressive_tokens_over_non_prefill_step_time(logs):
  r = reference_of(logs["ar"])["ar-c2"]
  assert (r.kind, r.reference_script) == ("server_only_ar", "src/metric/auto_batch.py")
  # Non-prefill steps: a in I2 and I4, b in I4 and I5 = 4 tokens over .125 + .25 + .125 = .5 s.
  assert (r.tokens_counted, r.throughput_time_s, r.throughput_tok_s) == (4, 0.5, 8.0)
  # Ours: 9 tokens / 1.625 s of forwards (prefills included).
  assert ours_of(logs["ar"])["ar-c2"].throughput_per_compute_s == pytest.approx(9 / 1.625)
  assert r.itl_s == pytest.approx(0.75 / 4)
  assert (r.tokens_per_step.mean, r.tokens_per_step.std) == (1.0, 0.0)
  assert r.draft.non_prefill.mean == 0.0
  assert r.server_batch.prefill.mean == 0.5625
  assert r.server_batch.non_prefill.mean == pytest.approx(0.5 / 3)
  assert r.server_running_time_s == pytest.approx(1.625)
  assert r.usd_per_million_tokens == pytest.approx(0.5 * A100_80 / 4 * 1e6)


def test_runs_of_no_known_kind_get_no_reference_summary():
  events = [{"kind": "request_step", "system": "vllm", "t": 1.0, "request_id": "q",
             "client_id": "c", "n_tokens": 1}]
  assert ref_lib.summarize_events(events) == {}
  with pytest.raises(ValueError, match="vllm"):
    ref_lib.summarize_run("x", events)
  with pytest.raises(ValueError, match="unknown definition sets"):
    ref_lib.legend(["theirs"])


def test_steps_attach_by_time_when_batches_name_no_requests():
  # No request_ids: a step belongs to the latest iteration started at or before it.
  events = [
      {"kind": "server_batch", "system": "server_only_ar", "t": 1.0, "t_start": 0.0,
       "t_end": 1.0, "op": "prefill", "batch_size": 1, "tokens": 4, "forward_time_s": 1.0},
      {"kind": "server_batch", "system": "server_only_ar", "t": 1.5, "t_start": 1.0,
       "t_end": 1.5, "op": "decode", "batch_size": 1, "tokens": 1, "forward_time_s": 0.5},
      {"kind": "server_batch", "system": "server_only_ar", "t": 1.75, "t_start": 1.5,
       "t_end": 1.75, "op": "decode", "batch_size": 1, "tokens": 1, "forward_time_s": 0.25},
      *[{"kind": "request_step", "system": "server_only_ar", "t": t, "request_id": "q",
         "client_id": "c", "n_tokens": 1} for t in (1.0, 1.5, 1.75)]]
  r = ref_lib.summarize_run("x", events)
  assert (r.tokens_counted, r.throughput_time_s, r.itl_excluded_prefill_steps) == (1, 0.25, 1)


def _render(table) -> str:
  console = Console(record=True, width=250)
  console.print(table)
  return console.export_text()


def test_tables_label_each_definition_and_print_its_legend(logs, tmp_path):
  paths = [str(p) for p in logs.values()]
  ours = report.make_report(paths, str(tmp_path / "ours"))
  text = _render(ours.tables[0])
  assert "throughput (tok/s server compute) [ours]" in text and "[ref]" not in text
  assert ref_lib.LEGEND["ours"][0][:60] in text.replace("\n", " ")
  assert "reference" not in json.loads((tmp_path / "ours" / "report.json").read_text())
  both = report.make_report(paths, str(tmp_path / "both"), definitions="both")
  text = _render(both.tables[0])
  for label in ("throughput (tok/s wall) [ours]", "throughput [ref] (tok/s)",
                "ITL [ref] (ms/tok)", "server per-batch ms, prefill [ref]",
                "target (client-observed) ms, after a hit [ref]", "metric/server_only.py"):
    assert label in text, label
  assert "[ref] throughput: SpecEdge all tokens" in text
  saved = json.loads((tmp_path / "both" / "report.json").read_text())
  assert saved["definitions"] == ["ours", "reference"]
  assert saved["reference"]["spec-c2"]["throughput_tok_s"] == 9.0
  assert saved["runs"]["spec-c2"]["throughput_per_compute_s"] == 8.0
  only = report.make_report(paths, str(tmp_path / "ref"), definitions="reference")
  text = _render(only.tables[0])
  assert "[ours]" not in text.split("[ref] throughput:")[0] and "[ref]" in text
  with pytest.raises(ValueError, match="definitions"):
    report.definition_sets("theirs")


def test_plain_tsv_from_the_launcher(logs, tmp_path):
  # In a subprocess, as a user runs it (launchers define absl flags at import).
  result = subprocess.run(
      [sys.executable, "-m", "launch.report", *[f"--events={p}" for p in logs.values()],
       f"--out_dir={tmp_path / 'out'}", "--definitions=both", "--plain"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 4 and all("\t" in line for line in lines)  # a header and three runs
  rows = {row["run"]: row for row in csv.DictReader(io.StringIO(result.stdout), delimiter="\t")}
  assert set(rows) == {"specedge", "spec-c2", "ar-c2"}
  spec, sospec, ar = rows["specedge"], rows["spec-c2"], rows["ar-c2"]
  assert float(spec["ref_throughput_tok_s"]) == pytest.approx(16 / 1.875, rel=1e-5)
  assert float(spec["ours_throughput_compute_tok_s"]) == 16.0
  assert float(spec["ref_itl_ms_per_token"]) == 125.0
  assert float(spec["ref_edge_running_time_s"]) == 3.375
  assert float(spec["ref_target_after_hit_mean_ms"]) == 125.0
  assert spec["ref_target_after_hit_std_ms"] == ""  # one sample: undefined
  assert float(spec["ref_server_batch_prefill_mean_ms"]) == 437.5
  assert float(spec["ref_tokens_per_step_std"]) == pytest.approx(math.sqrt(26 / 21), rel=1e-5)
  assert (float(sospec["ref_throughput_tok_s"]), float(sospec["ours_throughput_compute_tok_s"])
          ) == (9.0, 8.0)
  assert sospec["ref_edge_usd"] == "" and sospec["ref_kind"] == "server_only_spec"
  assert float(ar["ref_throughput_tok_s"]) == 8.0 and float(ar["ref_tokens_per_step_mean"]) == 1
  assert "[ref] throughput" in result.stderr and "report.json" in result.stderr
  # Without --definitions: ours only, and the header says so.
  result = subprocess.run(
      [sys.executable, "-m", "launch.report", f"--events={logs['ar']}",
       f"--out_dir={tmp_path / 'out2'}", "--plain"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  header = result.stdout.splitlines()[0].split("\t")
  assert "ours_throughput_compute_tok_s" in header and not any(h.startswith("ref_")
                                                               for h in header)


def test_sweep_replot_reports_both_definitions(logs, tmp_path):
  # A finished sweep folder as run_sweep leaves it (report.json naming the runs and their logs),
  # replotted: its report.json and table gain the reference's definitions.
  from specedge_jax.bench import sweep  # pylint: disable=g-import-not-at-top
  from specedge_jax.serving.serving_config import ServingConfig  # pylint: disable=g-import-not-at-top

  out = tmp_path / "sweep"
  point = "c1-b4-t8-rtt14"
  config = ServingConfig.from_mapping({"name": "t", "models": {"target": "t", "draft": "d"}})
  runs = {}
  for system, key in (("specedge", "spec"), ("server_only_spec", "sospec"),
                      ("server_only_ar", "ar")):
    (out / point).mkdir(parents=True, exist_ok=True)
    target = out / point / f"{system}.jsonl"
    target.write_text(logs[key].read_text())
    runs[f"{system}/{point}"] = {"system": system, "points": [point],
                                 "event_files": [f"{point}/{system}.jsonl"],
                                 "config": config.to_dict()}
  grid = {"clients": [1], "batch_sizes": [4], "budgets": [8], "rtt_ms": [14.0],
          "proactive_modes": ["disabled"], "systems": list(sweep.SYSTEMS)}
  (out / "report.json").write_text(json.dumps({"grid": grid, "runs": runs}))
  result = sweep.replot(str(out))
  saved = json.loads((out / "report.json").read_text())
  assert saved["runs"]["server_only_spec/" + point]["reference"]["throughput_tok_s"] == 9.0
  assert saved["runs"]["server_only_spec/" + point]["summary"]["throughput_per_compute_s"] == 8.0
  assert saved["runs"]["specedge/" + point]["reference"]["kind"] == "specedge"
  assert saved["definitions"]["reference"] == list(ref_lib.LEGEND["reference"])
  by_system = {row.system: row for row in result.rows}
  assert by_system["server_only_ar"].reference.throughput_tok_s == 8.0
  text = _render(sweep.sweep_table(result.rows))
  # Headers may wrap: look for the labels, and for the legend lines under the table.
  assert "tok/s [ref]" in text and "[ours]" in text and "[ref] ITL:" in text
  assert (out / "throughput_vs_clients.png").read_bytes().startswith(b"\x89PNG")
