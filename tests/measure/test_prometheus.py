"""Prometheus metrics fed through EventLog listeners with hand-made events of known answers.

Times are binary-exact (multiples of 1/8) so the expected sums are exact. The edge run:

  r1: start 100; prefill 100.5 n1 | verify 101.0 n2 d1 tree 8 hit | verify 101.5 n0 d0 tree 4
      (no tokens: skipped, does not reset the ITL clock) | verify 102.0 n4 d3 tree 8 miss; eos
      TTFT 0.5; ITL 0.5/2 = 0.25 x2, (102 - 101)/4 = 0.25 x4
  r2: start 100; prefill 101.0 n1 | verify 101.125 n1 d0 tree 4 hit | resumed (UNAVAILABLE) |
      verify 103.0 n2 d1 tree 4; length
      TTFT 1.0; ITL 0.125 x1, (103 - 101.125)/2 = 0.9375 x2
  r3: start 100; ends 'error' with no step (the drafter's failure path)

  verifications 5; tree tokens 8+4+8+4+4 = 28; accepted 1+0+3+0+1 = 5; per position over depths
  [1, 0, 3, 0, 1]: pos 0 -> 3, pos 1 -> 1, pos 2 -> 1; emitted 7 + 4 = 11; proactive 2 hits,
  1 miss; TTFT count 2 sum 1.5; ITL count 9 sum 0.5 + 1.0 + 0.125 + 1.875 = 3.5.
"""

import logging
import math
import re
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specedge_jax.measure import metrics
from specedge_jax.measure import prometheus as prom
from specedge_jax.measure.events import EventLog

NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _samples(registry) -> dict[tuple[str, frozenset], float]:
  body, content_type = prom.exposition(registry)
  assert content_type.startswith("text/plain")
  out = {}
  for family in text_string_to_metric_families(body.decode()):
    for s in family.samples:
      out[(s.name, frozenset(s.labels.items()))] = s.value
  return out


def _v(samples, name, **labels) -> float:
  return samples[(name, frozenset((k, str(v)) for k, v in labels.items()))]


def _verify(log, request_id, t, n, depth, tree, hit, wait=0.25):
  log.emit("request_step", t=t, request_id=request_id, client_id="c0", n_tokens=n,
           draft_time_s=0.125, wait_time_s=wait, tree_size=tree, accepted_depth=depth,
           proactive_hit=hit, phase="verify", server_queue_time_s=0.0625,
           server_forward_time_s=0.125, server_batch_size=2)


def _prefill(log, request_id, t):
  log.emit("request_step", t=t, request_id=request_id, client_id="c0", n_tokens=1,
           draft_time_s=0.0, wait_time_s=t - 100.0, tree_size=0, accepted_depth=None,
           proactive_hit=None, phase="prefill")


def _edge_run(log, edge=None):
  for rid in ("r1", "r2", "r3"):
    log.emit("request_start", t=100.0, request_id=rid, client_id="c0", prompt_tokens=5)
  _prefill(log, "r1", 100.5)
  _prefill(log, "r2", 101.0)
  _verify(log, "r1", 101.0, 2, 1, 8, True)
  _verify(log, "r2", 101.125, 1, 0, 4, True)
  _verify(log, "r1", 101.5, 0, 0, 4, None)
  log.emit("request_resumed", t=101.5, request_id="r2", client_id="c0", n_generated=2,
           reason="UNAVAILABLE")
  _verify(log, "r1", 102.0, 4, 3, 8, False)
  if edge is not None:
    assert edge.tracked_requests() == 3
  log.emit("request_end", t=102.0, request_id="r1", client_id="c0", n_generated=7,
           finished_reason="eos", output_tokens=[], error=None)
  log.emit("request_end", t=102.5, request_id="r3", client_id="c0", n_generated=0,
           finished_reason="error", output_tokens=[], error="boom")
  _verify(log, "r2", 103.0, 2, 1, 4, None)
  log.emit("request_end", t=103.0, request_id="r2", client_id="c0", n_generated=4,
           finished_reason="length", output_tokens=[], error=None)
  log.emit("edge_busy", client_id="c0", t_start=101.0, t_end=101.25, op="draft")


@pytest.fixture
def edge_run():
  log = EventLog(None, "specedge")
  edge = prom.EdgeMetrics()
  edge.attach(log)
  _edge_run(log, edge)
  return log, edge


def test_edge_counters(edge_run):
  _, edge = edge_run
  s = _samples(edge.registry)
  assert _v(s, "specedge_edge_requests_started_total") == 3
  assert _v(s, "specedge_edge_requests_finished_total", reason="eos") == 1
  assert _v(s, "specedge_edge_requests_finished_total", reason="length") == 1
  assert _v(s, "specedge_edge_requests_finished_total", reason="error") == 1
  assert _v(s, "specedge_edge_requests_resumed_total", reason="UNAVAILABLE") == 1
  assert _v(s, "specedge_edge_verifications_total") == 5
  assert _v(s, "specedge_edge_draft_tokens_total") == 28
  assert _v(s, "specedge_edge_accepted_tokens_total") == 5
  per_pos = {dict(k[1])["position"]: v for k, v in s.items()
             if k[0] == "specedge_edge_accepted_tokens_per_position_total"}
  assert per_pos == {"0": 3, "1": 1, "2": 1}
  assert _v(s, "specedge_edge_emitted_tokens_total") == 11
  assert _v(s, "specedge_edge_proactive_total", outcome="hit") == 2
  assert _v(s, "specedge_edge_proactive_total", outcome="miss") == 1
  assert _v(s, "specedge_edge_busy_seconds_total", op="draft") == 0.25


def test_edge_histograms(edge_run):
  _, edge = edge_run
  s = _samples(edge.registry)
  assert _v(s, "specedge_edge_ttft_seconds_count") == 2
  assert _v(s, "specedge_edge_ttft_seconds_sum") == 1.5
  assert _v(s, "specedge_edge_ttft_seconds_bucket", le="0.5") == 1
  assert _v(s, "specedge_edge_ttft_seconds_bucket", le="1.0") == 2
  assert _v(s, "specedge_edge_itl_seconds_count") == 9
  assert _v(s, "specedge_edge_itl_seconds_sum") == 3.5
  assert _v(s, "specedge_edge_itl_seconds_bucket", le="0.1") == 0
  assert _v(s, "specedge_edge_itl_seconds_bucket", le="0.2") == 1  # 0.125
  assert _v(s, "specedge_edge_itl_seconds_bucket", le="0.5") == 7  # + six 0.25
  assert _v(s, "specedge_edge_itl_seconds_bucket", le="1.0") == 9  # + two 0.9375
  # Per verify step (5), never the prefill steps.
  for name, total in (("round_trip", 5 * 0.25), ("draft", 5 * 0.125),
                      ("server_queue", 5 * 0.0625), ("server_forward", 5 * 0.125),
                      ("server_batch_size", 5 * 2)):
    suffix = "" if name == "server_batch_size" else "_seconds"
    assert _v(s, f"specedge_edge_{name}{suffix}_count") == 5, name
    assert _v(s, f"specedge_edge_{name}{suffix}_sum") == total, name


def test_edge_agrees_with_the_report(edge_run):
  # /metrics and the report read the same events: TTFT and ITL means and counts must agree.
  log, edge = edge_run
  _, (summary,) = metrics.summarize_events(log.events)
  s = _samples(edge.registry)
  req = summary.requests
  assert req.itl.count == _v(s, "specedge_edge_itl_seconds_count")
  assert req.itl.mean_s == pytest.approx(_v(s, "specedge_edge_itl_seconds_sum") / req.itl.count)
  assert req.ttft.count == _v(s, "specedge_edge_ttft_seconds_count")
  assert req.ttft.mean_s == pytest.approx(_v(s, "specedge_edge_ttft_seconds_sum") / 2)
  assert req.n_verifications == _v(s, "specedge_edge_verifications_total")
  assert summary.generated_tokens == _v(s, "specedge_edge_emitted_tokens_total")


def test_per_request_state_is_dropped(edge_run):
  log, edge = edge_run
  assert edge.tracked_requests() == 0
  log.emit("request_start", t=200.0, request_id="r9", client_id="c0", prompt_tokens=1)
  _prefill(log, "r9", 200.5)
  assert edge.tracked_requests() == 1
  log.emit("request_end", t=201.0, request_id="r9", client_id="c0", n_generated=1,
           finished_reason="eos", output_tokens=[], error=None)
  assert edge.tracked_requests() == 0
  # An end for a request never seen is counted and leaves no state.
  log.emit("request_end", t=202.0, request_id="ghost", client_id="c0", n_generated=0,
           finished_reason="error", output_tokens=[], error="x")
  assert edge.tracked_requests() == 0


def test_tracked_requests_are_bounded(monkeypatch):
  monkeypatch.setattr(prom, "MAX_TRACKED_REQUESTS", 4)
  edge = prom.EdgeMetrics()
  for i in range(10):
    edge.observe(dict(kind="request_start", t=1.0, request_id=f"r{i}", client_id="c"))
  assert edge.tracked_requests() == 4


def test_concurrent_emitters():
  # Eight threads, 50 requests each of prefill + two verify steps: nothing lost, no state left.
  log = EventLog(None, "specedge")
  edge = prom.EdgeMetrics()
  edge.attach(log)

  def client(c):
    for i in range(50):
      rid = f"{c}-{i}"
      log.emit("request_start", t=100.0, request_id=rid, client_id="c0", prompt_tokens=1)
      _prefill(log, rid, 100.5)
      _verify(log, rid, 101.0, 2, 1, 4, True)
      _verify(log, rid, 101.5, 3, 2, 4, False)
      log.emit("request_end", t=101.5, request_id=rid, client_id="c0", n_generated=6,
               finished_reason="eos", output_tokens=[], error=None)

  threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  s = _samples(edge.registry)
  assert _v(s, "specedge_edge_verifications_total") == 800
  assert _v(s, "specedge_edge_itl_seconds_count") == 400 * 5
  assert _v(s, "specedge_edge_itl_seconds_sum") == pytest.approx(400 * 1.0)
  assert _v(s, "specedge_edge_ttft_seconds_count") == 400
  assert _v(s, "specedge_edge_accepted_tokens_per_position_total", position=1) == 400
  assert edge.tracked_requests() == 0


def test_verifier_metrics():
  log = EventLog(None, "specedge")
  verifier = prom.VerifierMetrics()
  verifier.attach(log)
  log.emit("server_batch", t_start=1.0, t_end=1.125, op="prefill", batch_size=1, tokens=10,
           forward_time_s=0.125, queue_time_s=0.0625, request_ids=["a"], prefill_cache_hit=False)
  log.emit("server_batch", t_start=2.0, t_end=2.0, op="prefill", batch_size=1, tokens=0,
           forward_time_s=0.0, queue_time_s=0.0, request_ids=["b"], prefill_cache_hit=True)
  log.emit("server_batch", t_start=3.0, t_end=3.25, op="verify", batch_size=2, tokens=16,
           forward_time_s=0.25, queue_time_s=0.125, request_ids=["a", "b"])
  log.emit("server_batch", t_start=4.0, t_end=4.5, op="verify", batch_size=3, tokens=27,
           forward_time_s=0.5, queue_time_s=0.25, request_ids=["a", "b", "c"])
  # Edge events on the same log are ignored by the verifier's metrics.
  _prefill(log, "a", 100.5)
  for depth in (2, 0, 3):
    verifier.observe_accepted(depth)
  with pytest.raises(ValueError):
    verifier.observe_accepted(-1)
  s = _samples(verifier.registry)
  assert _v(s, "specedge_verifier_verify_batches_total") == 2
  assert _v(s, "specedge_verifier_verified_requests_total") == 5
  assert _v(s, "specedge_verifier_tree_tokens_total") == 43
  assert _v(s, "specedge_verifier_prefills_total") == 2
  assert _v(s, "specedge_verifier_prefill_cache_hits_total") == 1
  assert _v(s, "specedge_verifier_prefill_tokens_total") == 10
  assert _v(s, "specedge_verifier_verify_batch_size_count") == 2
  assert _v(s, "specedge_verifier_verify_batch_size_sum") == 5
  assert _v(s, "specedge_verifier_verify_batch_size_bucket", le="2.0") == 1
  assert _v(s, "specedge_verifier_forward_seconds_count", op="verify") == 2
  assert _v(s, "specedge_verifier_forward_seconds_sum", op="verify") == 0.75
  assert _v(s, "specedge_verifier_forward_seconds_count", op="prefill") == 2
  assert _v(s, "specedge_verifier_forward_seconds_sum", op="prefill") == 0.125
  assert _v(s, "specedge_verifier_queue_seconds_sum", op="verify") == 0.375
  assert _v(s, "specedge_verifier_accepted_tokens_total") == 5
  per_pos = {dict(k[1])["position"]: v for k, v in s.items()
             if k[0] == "specedge_verifier_accepted_tokens_per_position_total"}
  assert per_pos == {"0": 2, "1": 2, "2": 1}


def test_gauges_read_their_sources_at_scrape_time(caplog):
  edge, verifier = prom.EdgeMetrics(), prom.VerifierMetrics()
  assert math.isnan(_v(_samples(edge.registry), "specedge_edge_free_draft_slots"))
  state = {"free": 3}
  edge.set_gauge_sources(free_slots=lambda: state["free"], running=lambda: 2, queued=lambda: 0)
  verifier.set_gauge_sources(free_slots=lambda: 7, sessions=lambda: 1,
                             admission_queue=lambda: 1 / 0)
  s = _samples(edge.registry)
  assert (_v(s, "specedge_edge_free_draft_slots"), _v(s, "specedge_edge_requests_running"),
          _v(s, "specedge_edge_requests_queued")) == (3, 2, 0)
  state["free"] = 1
  assert _v(_samples(edge.registry), "specedge_edge_free_draft_slots") == 1
  with caplog.at_level(logging.ERROR):
    s = _samples(verifier.registry)  # a raising source must not fail the scrape
  assert (_v(s, "specedge_verifier_free_slots"), _v(s, "specedge_verifier_sessions")) == (7, 1)
  assert math.isnan(_v(s, "specedge_verifier_admission_queue_length"))
  assert any("admission_queue" in r.getMessage() for r in caplog.records)


def test_names_follow_prometheus_rules(edge_run):
  log, edge = edge_run
  verifier = prom.VerifierMetrics()
  verifier.attach(log)
  verifier.observe_accepted(1)
  log.emit("server_batch", t_start=1.0, t_end=1.5, op="verify", batch_size=1, tokens=4,
           forward_time_s=0.5, queue_time_s=0.0, request_ids=["a"])
  for registry in (edge.registry, verifier.registry):
    body, _ = prom.exposition(registry)
    families = list(text_string_to_metric_families(body.decode()))
    assert len(families) >= 10
    for family in families:
      assert family.name.startswith("specedge_"), family.name
      for sample in family.samples:
        assert NAME_RE.fullmatch(sample.name), sample.name
        assert sample.name.startswith(family.name)
      if family.type == "counter":
        assert any(s.name == family.name + "_total" for s in family.samples), family.name
      if family.type == "histogram" and not family.name.endswith("_batch_size"):
        assert family.name.endswith("_seconds"), family.name


def test_a_raising_listener_does_not_break_emit(caplog):
  log = EventLog(None, "specedge")
  edge = prom.EdgeMetrics()

  def broken(event):
    raise RuntimeError("listener bug")

  log.add_listener(broken)
  edge.attach(log)
  seen = []
  log.add_listener(seen.append)
  with caplog.at_level(logging.ERROR):
    event = log.emit("request_start", t=1.0, request_id="r", client_id="c", prompt_tokens=1)
    log.emit("request_start", t=2.0, request_id="s", client_id="c", prompt_tokens=1)
  assert log.events == [event, seen[1]] and seen[0] is event
  assert _v(_samples(edge.registry), "specedge_edge_requests_started_total") == 2
  assert [r for r in caplog.records if "listener" in r.getMessage()]
  log.remove_listener(broken)
  log.remove_listener(seen.append)  # a new bound method, equal to the one added
  log.remove_listener(edge.observe)
  caplog.clear()
  with caplog.at_level(logging.ERROR):
    log.emit("request_start", t=3.0, request_id="t", client_id="c", prompt_tokens=1)
  assert not caplog.records and len(seen) == 2 and len(log.events) == 3
  assert _v(_samples(edge.registry), "specedge_edge_requests_started_total") == 2


def test_listener_sees_the_written_event(tmp_path):
  path = tmp_path / "events.jsonl"
  seen = []
  with EventLog(path, "specedge") as log:
    log.add_listener(lambda e: seen.append(path.read_text().count("\n")))
    log.emit("request_start", t=1.0, request_id="r", client_id="c", prompt_tokens=1)
  assert seen == [1]  # the line was in the file when the listener ran


def test_serve_http(edge_run):
  _, edge = edge_run
  port = prom.serve_http(edge.registry, 0, addr="127.0.0.1")
  assert port > 0
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
    text = reply.read().decode()
    assert reply.headers["Content-Type"].startswith("text/plain")
  families = {f.name: f for f in text_string_to_metric_families(text)}
  (sample,) = [s for s in families["specedge_edge_verifications"].samples
               if s.name.endswith("_total")]
  assert sample.value == 5


def test_verifier_counts_the_accepted_depths_of_its_verify_events():
  verifier = prom.VerifierMetrics()
  log = EventLog(None, "specedge")
  log.add_listener(verifier.observe)
  log.emit("server_batch", t_start=0.0, t_end=0.1, op="verify", batch_size=3, tokens=27,
           forward_time_s=0.1, queue_time_s=0.01, request_ids=["a", "b", "c"],
           accepted_depths=[3, 0, 1])
  text = prom.exposition(verifier.registry)[0].decode()
  values = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
  assert values[("specedge_verifier_accepted_tokens_total", ())] == 4
  per_position = {dict(labels)["position"]: v for (name, labels), v in values.items()
                  if name == "specedge_verifier_accepted_tokens_per_position_total"}
  assert per_position == {"0": 2, "1": 1, "2": 1}
