"""Prometheus metrics driven by the JSONL events of `specedge_jax.measure.events`.

This module owns the metric names, their buckets, and how events map onto them. The metrics are
fed by `EventLog` listeners (`EdgeMetrics.attach(log)`, `VerifierMetrics.attach(log)`), never by
separate instrumentation, so /metrics counts exactly what the event logs hold and the definitions
match `specedge_jax.measure.metrics` (the report).

Each exporter owns its own `CollectorRegistry` (never prometheus_client's global one), so tests and
several servers in one process do not clash. Serve one with `serve_http` or render it with
`exposition`.

Edge metrics (`EdgeMetrics`, from request_start / request_step / request_end / request_resumed /
edge_busy):

  specedge_edge_requests_started_total            request_start events
  specedge_edge_requests_finished_total{reason}   request_end by finished_reason
  specedge_edge_requests_resumed_total{reason}    request_resumed by the status that lost the
                                                  session
  specedge_edge_verifications_total               'verify' steps (vLLM's spec_decode_num_drafts)
  specedge_edge_draft_tokens_total                sum of tree_size over 'verify' steps
  specedge_edge_accepted_tokens_total             sum of accepted_depth (bonus excluded)
  specedge_edge_accepted_tokens_per_position_total{position}
                                                  a step that accepted depth d adds 1 to
                                                  positions 0..d-1 (vLLM's
                                                  spec_decode_num_accepted_tokens_per_pos), so
                                                  position k / verifications = P(depth > k)
  specedge_edge_emitted_tokens_total              sum of n_tokens over all steps (bonus included)
  specedge_edge_proactive_total{outcome}          proactive_hit true ('hit') / false ('miss')
  specedge_edge_busy_seconds_total{op}            the edge_busy intervals' lengths
  specedge_edge_ttft_seconds                      TTFT, see below
  specedge_edge_itl_seconds                       ITL, see below
  specedge_edge_round_trip_seconds                wait_time_s of 'verify' steps (send tree to
                                                  answer; the prefill step's wait is in TTFT)
  specedge_edge_draft_seconds                     draft_time_s of 'verify' steps
  specedge_edge_server_queue_seconds              server_queue_time_s of 'verify' steps
  specedge_edge_server_forward_seconds            server_forward_time_s of 'verify' steps
  specedge_edge_server_batch_size                 server_batch_size of 'verify' steps
  specedge_edge_free_draft_slots, specedge_edge_requests_running, specedge_edge_requests_queued
                                                  gauges read from callables at scrape time

  TTFT: per request, `t` of its first request_step with n_tokens > 0 (the 'prefill' step on an
  edge) minus `t` of its request_start; not observed when the start was not seen.
  ITL (token-weighted, as the report's): for each later step with n = n_tokens > 0, gap = its `t`
  minus the `t` of the request's previous token-bearing step; the histogram observes gap / n
  n times. So the histogram's _sum / _count is the report's mean ITL (sum gap / sum n), and its
  buckets are the report's token-weighted samples. Steps with n = 0 are skipped and do not reset
  the clock.

Verifier metrics (`VerifierMetrics`, from server_batch):

  specedge_verifier_verify_batches_total          server_batch events with op 'verify'
  specedge_verifier_verified_requests_total       sum of batch_size over 'verify' batches
  specedge_verifier_tree_tokens_total             sum of tokens over 'verify' batches
  specedge_verifier_prefills_total                'prefill' batches
  specedge_verifier_prefill_cache_hits_total      'prefill' batches with prefill_cache_hit
  specedge_verifier_prefill_tokens_total          sum of tokens over 'prefill' batches (0 on a hit)
  specedge_verifier_verify_batch_size             batch_size of 'verify' batches
  specedge_verifier_forward_seconds{op}           forward_time_s of every batch
  specedge_verifier_queue_seconds{op}             queue_time_s of every batch (a verify batch's is
                                                  the mean over its requests)
  specedge_verifier_accepted_tokens_total,
  specedge_verifier_accepted_tokens_per_position_total{position}
                                                  fed only by `observe_accepted(depth)`
  specedge_verifier_free_slots, specedge_verifier_sessions,
  specedge_verifier_admission_queue_length        gauges read from callables at scrape time

A gauge whose source is unset, or whose source raises, reads NaN (unknown), never a false 0.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any, Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specedge_jax.measure.events import EventLog

_log = logging.getLogger(__name__)

# Log-spaced from 0.5 ms (a GPU forward at small batch) to 30 s (a CPU prefill behind a queue), so
# both a GPU run (ms) and a CPU run (tens to hundreds of ms) fall in resolved buckets.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                     5.0, 10.0, 30.0)
# TTFT also covers admission waits (up to `admission_wait_s`, 10 s by default) and long prefills.
TTFT_BUCKETS_S = LATENCY_BUCKETS_S + (60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Per-request state (start time, last token time) of requests whose request_end never came (a
# crashed drafter's log) is evicted oldest first beyond this many, so memory stays bounded.
MAX_TRACKED_REQUESTS = 65536


def _gauge_source(name: str, fn: Callable[[], float]) -> Callable[[], float]:
  # A failing source must not fail the whole scrape (generate_latest would raise).
  def read() -> float:
    try:
      return float(fn())
    except Exception:  # pylint: disable=broad-except
      _log.exception("gauge source %r failed; the gauge reads NaN", name)
      return math.nan
  return read


def _set_sources(gauges: dict[str, Gauge], sources: dict[str, Callable[[], float] | None]) -> None:
  for key, fn in sources.items():
    if fn is not None:
      gauges[key].set_function(_gauge_source(key, fn))


def _unknown_gauge(name: str, doc: str, registry: CollectorRegistry) -> Gauge:
  gauge = Gauge(name, doc, registry=registry)
  gauge.set(math.nan)
  return gauge


class _PerPosition:
  """The accepted-tokens-per-position counter: depth d adds 1 to positions 0..d-1."""

  def __init__(self, name: str, doc: str, registry: CollectorRegistry):
    self._counter = Counter(name, doc, ["position"], registry=registry)

  def add(self, depth: int) -> None:
    for position in range(depth):
      self._counter.labels(position=str(position)).inc()


class EdgeMetrics:
  """The edge (drafter) metrics; `observe` takes one event dict. Thread-safe."""

  def __init__(self, registry: CollectorRegistry | None = None):
    self.registry = registry if registry is not None else CollectorRegistry()
    r = self.registry
    self.requests_started = Counter("specedge_edge_requests_started",
                                    "User requests started (request_start).", registry=r)
    self.requests_finished = Counter("specedge_edge_requests_finished",
                                     "User requests finished, by finished_reason.", ["reason"],
                                     registry=r)
    self.requests_resumed = Counter("specedge_edge_requests_resumed",
                                    "Requests resumed in a new server session, by the status "
                                    "that lost the old one.", ["reason"], registry=r)
    self.verifications = Counter("specedge_edge_verifications",
                                 "Verification rounds (request_step with phase 'verify').",
                                 registry=r)
    self.draft_tokens = Counter("specedge_edge_draft_tokens",
                                "Draft tree tokens sent for verification (sum of tree_size).",
                                registry=r)
    self.accepted_tokens = Counter("specedge_edge_accepted_tokens",
                                   "Draft tokens accepted (sum of accepted_depth, bonus "
                                   "excluded).", registry=r)
    self.accepted_per_position = _PerPosition(
        "specedge_edge_accepted_tokens_per_position",
        "Verifications that accepted a draft token at this depth (0-based).", r)
    self.emitted_tokens = Counter("specedge_edge_emitted_tokens",
                                  "Tokens emitted to users (sum of n_tokens, bonus included).",
                                  registry=r)
    self.proactive = Counter("specedge_edge_proactive",
                             "Proactive draft guesses, by outcome (hit / miss).", ["outcome"],
                             registry=r)
    self.busy_seconds = Counter("specedge_edge_busy_seconds",
                                "Edge accelerator busy time (edge_busy intervals), by job.",
                                ["op"], registry=r)
    self.ttft = Histogram("specedge_edge_ttft_seconds",
                          "Time to first token: first token-bearing step minus request_start.",
                          buckets=TTFT_BUCKETS_S, registry=r)
    self.itl = Histogram("specedge_edge_itl_seconds",
                         "Inter-token latency, token-weighted: a step's gap since the previous "
                         "token-bearing step / n_tokens, observed n_tokens times.",
                         buckets=LATENCY_BUCKETS_S, registry=r)
    self.round_trip = Histogram("specedge_edge_round_trip_seconds",
                                "Verify round trip seen by the edge (wait_time_s).",
                                buckets=LATENCY_BUCKETS_S, registry=r)
    self.draft_time = Histogram("specedge_edge_draft_seconds",
                                "Tree drafting time of a verify round (draft_time_s).",
                                buckets=LATENCY_BUCKETS_S, registry=r)
    self.server_queue = Histogram("specedge_edge_server_queue_seconds",
                                  "Verifier queue time of a round, as reported to the edge.",
                                  buckets=LATENCY_BUCKETS_S, registry=r)
    self.server_forward = Histogram("specedge_edge_server_forward_seconds",
                                    "Verifier forward time of a round, as reported to the edge.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
    self.server_batch_size = Histogram("specedge_edge_server_batch_size",
                                       "Verify batch size of a round, as reported to the edge.",
                                       buckets=BATCH_SIZE_BUCKETS, registry=r)
    self._gauges = {
        "free_slots": _unknown_gauge("specedge_edge_free_draft_slots",
                                     "Free draft-engine slots.", r),
        "running": _unknown_gauge("specedge_edge_requests_running",
                                  "Requests being served by this edge.", r),
        "queued": _unknown_gauge("specedge_edge_requests_queued",
                                 "Requests waiting on this edge.", r),
    }
    self._lock = threading.Lock()
    # key -> [t of request_start or None, t of the last token-bearing step or None]
    self._requests: collections.OrderedDict[tuple, list[float | None]] = \
        collections.OrderedDict()

  def set_gauge_sources(self, free_slots: Callable[[], float] | None = None,
                        running: Callable[[], float] | None = None,
                        queued: Callable[[], float] | None = None) -> None:
    """Reads the named gauges from these callables at each scrape; None leaves one as it is."""
    _set_sources(self._gauges, dict(free_slots=free_slots, running=running, queued=queued))

  def attach(self, log: EventLog) -> None:
    """Feeds every event of `log` to `observe` (an `EventLog` listener)."""
    log.add_listener(self.observe)

  def tracked_requests(self) -> int:
    """How many requests have per-request state (started or stepped, not yet ended)."""
    with self._lock:
      return len(self._requests)

  def observe(self, event: dict[str, Any]) -> None:
    kind = event.get("kind")
    if kind == "request_step":
      self._step(event)
    elif kind == "request_start":
      self.requests_started.inc()
      with self._lock:
        self._state(event)[0] = float(event["t"])
    elif kind == "request_end":
      self.requests_finished.labels(reason=str(event.get("finished_reason") or "unknown")).inc()
      with self._lock:
        self._requests.pop(self._key(event), None)
    elif kind == "request_resumed":
      self.requests_resumed.labels(reason=str(event.get("reason") or "unknown")).inc()
    elif kind == "edge_busy":
      self.busy_seconds.labels(op=str(event.get("op") or "unknown")).inc(
          max(0.0, float(event["t_end"]) - float(event["t_start"])))

  @staticmethod
  def _key(event: dict[str, Any]) -> tuple:
    # Request ids are unique within a run, not across runs sharing one process or log.
    return (event.get("system"), event.get("run_id"), event.get("request_id"))

  def _state(self, event: dict[str, Any]) -> list[float | None]:
    # Caller holds the lock.
    key = self._key(event)
    state = self._requests.get(key)
    if state is None:
      state = self._requests[key] = [None, None]
      while len(self._requests) > MAX_TRACKED_REQUESTS:
        self._requests.popitem(last=False)
    return state

  def _step(self, event: dict[str, Any]) -> None:
    n_tokens = int(event.get("n_tokens") or 0)
    t = float(event["t"])
    if n_tokens > 0:
      self.emitted_tokens.inc(n_tokens)
      with self._lock:
        state = self._state(event)
        t_start, t_previous = state
        state[1] = t
      if t_previous is None:
        if t_start is not None:
          self.ttft.observe(t - t_start)
      else:
        per_token = (t - t_previous) / n_tokens
        for _ in range(n_tokens):
          self.itl.observe(per_token)
    depth = event.get("accepted_depth")
    if depth is not None:
      self.accepted_tokens.inc(int(depth))
      self.accepted_per_position.add(int(depth))
    hit = event.get("proactive_hit")
    if hit is not None:
      self.proactive.labels(outcome="hit" if hit else "miss").inc()
    if event.get("phase") != "verify":
      return
    self.verifications.inc()
    self.draft_tokens.inc(int(event.get("tree_size") or 0))
    for histogram, field in ((self.round_trip, "wait_time_s"), (self.draft_time, "draft_time_s"),
                             (self.server_queue, "server_queue_time_s"),
                             (self.server_forward, "server_forward_time_s"),
                             (self.server_batch_size, "server_batch_size")):
      value = event.get(field)
      if value is not None:
        histogram.observe(float(value))


class VerifierMetrics:
  """The verifier (server) metrics; `observe` takes one server_batch event dict. Thread-safe."""

  def __init__(self, registry: CollectorRegistry | None = None):
    self.registry = registry if registry is not None else CollectorRegistry()
    r = self.registry
    self.verify_batches = Counter("specedge_verifier_verify_batches",
                                  "Batched tree verifications (server_batch op 'verify').",
                                  registry=r)
    self.verified_requests = Counter("specedge_verifier_verified_requests",
                                     "Trees verified (sum of batch_size over verify batches).",
                                     registry=r)
    self.tree_tokens = Counter("specedge_verifier_tree_tokens",
                               "Tree tokens in verify forwards (sum of tokens).", registry=r)
    self.prefills = Counter("specedge_verifier_prefills", "Prompt prefills (op 'prefill').",
                            registry=r)
    self.prefill_cache_hits = Counter("specedge_verifier_prefill_cache_hits",
                                      "Prefills served from the prefill snapshot cache.",
                                      registry=r)
    self.prefill_tokens = Counter("specedge_verifier_prefill_tokens",
                                  "Tokens prefilled by the target (0 for a cache hit).",
                                  registry=r)
    self.accepted_tokens = Counter("specedge_verifier_accepted_tokens",
                                   "Draft tokens accepted, as reported by observe_accepted.",
                                   registry=r)
    self.accepted_per_position = _PerPosition(
        "specedge_verifier_accepted_tokens_per_position",
        "Verified trees that accepted a draft token at this depth (0-based).", r)
    self.verify_batch_size = Histogram("specedge_verifier_verify_batch_size",
                                       "Trees per verify forward.", buckets=BATCH_SIZE_BUCKETS,
                                       registry=r)
    self.forward = Histogram("specedge_verifier_forward_seconds",
                             "Forward time of a batch, by op.", ["op"],
                             buckets=LATENCY_BUCKETS_S, registry=r)
    self.queue = Histogram("specedge_verifier_queue_seconds",
                           "Queue time before a batch's forward (mean over its requests), by op.",
                           ["op"], buckets=LATENCY_BUCKETS_S, registry=r)
    self._gauges = {
        "free_slots": _unknown_gauge("specedge_verifier_free_slots",
                                     "Free target-engine slots.", r),
        "sessions": _unknown_gauge("specedge_verifier_sessions", "Open sessions.", r),
        "admission_queue": _unknown_gauge("specedge_verifier_admission_queue_length",
                                          "Opens waiting for a slot.", r),
    }

  def set_gauge_sources(self, free_slots: Callable[[], float] | None = None,
                        sessions: Callable[[], float] | None = None,
                        admission_queue: Callable[[], float] | None = None) -> None:
    """Reads the named gauges from these callables at each scrape; None leaves one as it is."""
    _set_sources(self._gauges, dict(free_slots=free_slots, sessions=sessions,
                                    admission_queue=admission_queue))

  def attach(self, log: EventLog) -> None:
    """Feeds every event of `log` to `observe` (an `EventLog` listener)."""
    log.add_listener(self.observe)

  def observe(self, event: dict[str, Any]) -> None:
    if event.get("kind") != "server_batch":
      return
    op = str(event.get("op"))
    self.forward.labels(op=op).observe(float(event["forward_time_s"]))
    queue_time = event.get("queue_time_s")
    if queue_time is not None:
      self.queue.labels(op=op).observe(float(queue_time))
    if op == "verify":
      self.verify_batches.inc()
      self.verified_requests.inc(int(event["batch_size"]))
      self.tree_tokens.inc(int(event["tokens"]))
      self.verify_batch_size.observe(int(event["batch_size"]))
      for depth in event.get("accepted_depths") or ():  # optional: the verifier's own events
        self.observe_accepted(int(depth))
    elif op == "prefill":
      self.prefills.inc()
      self.prefill_tokens.inc(int(event["tokens"]))
      if event.get("prefill_cache_hit"):
        self.prefill_cache_hits.inc()

  def observe_accepted(self, depth: int) -> None:
    """Counts one verified tree that accepted `depth` draft tokens (bonus excluded).

    `observe` calls it for each entry of a verify event's `accepted_depths` (the verifier's
    engine worker writes them); a server without them may call it once per verified tree. The
    edge's counters hold the same figures from its request_step events.
    """
    if depth < 0:
      raise ValueError(f"accepted depth must be >= 0, got {depth}")
    self.accepted_tokens.inc(depth)
    self.accepted_per_position.add(depth)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
  """The registry in the Prometheus text format, and its Content-Type."""
  return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def serve_http(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> int:
  """Serves `registry` at http://addr:port/metrics on a daemon thread; returns the bound port.

  Port 0 picks a free one. The server lives as long as the process (prometheus_client offers no
  clean stop beyond `server.shutdown()`, which callers do not need).
  """
  server, _ = prometheus_client.start_http_server(port, addr=addr, registry=registry)
  return int(server.server_port)
