"""Run metrics computed from the JSONL event logs of `specedge_jax.measure.events`.

This module owns the definitions of every reported figure and their computation. It reads events
(as dicts) and returns frozen dataclasses; it never reads files itself (`events.read_events`
does), never draws (`plots.py`) and never prints (`launch/report.py`).

Runs. Events are grouped into runs by their optional `run_id` field, or by `system` when it is
absent. All events of a run share one clock (`time.time()`).

Definitions (all times in seconds):

  wall time       from the earliest to the latest timestamp of the run (`t`, `t_start`, `t_end`
                  of any event). The serving layer logs no warm-up, so this is the serving span.
  generated       the sum of `n_tokens` over `request_step` events (bonus tokens included).
  throughput      generated / server compute time, where server compute time is the sum of
                  `forward_time_s` over `server_batch` events; and generated / wall time.
  TTFT            per request: `t` of its first `request_step` with n_tokens > 0 minus `t` of its
                  `request_start`.
  ITL             inter-token latency, token-weighted. For each `request_step` of a request after
                  its first token-bearing step, let gap = its `t` minus the `t` of the request's
                  previous token-bearing step, and n = its `n_tokens`. The step contributes n
                  samples of value gap / n (each of its tokens waited gap / n on average). Steps
                  with n = 0 contribute nothing and do not reset the clock. The mean is therefore
                  sum(gap) / sum(n); p50 and p99 are percentiles of the token-weighted samples
                  (numpy's default linear interpolation over the samples repeated n times). The
                  first step is excluded: its wait is the TTFT.
  request mean ITL  the same mean over one request's samples: (t of last step - t of first step)
                  / tokens after the first step. Undefined (None) for a single-step request.
  acceptance      over `request_step` events whose `accepted_depth` is not null (verifications):
                  mean accepted_depth (tree nodes accepted, bonus excluded), mean n_tokens per
                  step, the histogram of accepted_depth, and the acceptance rate at depth d >= 1:
                  #(accepted_depth >= d) / #(accepted_depth >= d - 1), the chance that a
                  verification which reached depth d - 1 also accepts a node at depth d.
  proactive hit rate  #(proactive_hit true) / #(proactive_hit not null).
  server utilization  length of the union of `server_batch` [t_start, t_end] intervals / wall.
  edge busy / idle    per edge (`client_id` of `edge_busy` events): busy is the union of its
                  intervals, idle is wall - busy; reported as the mean over edges.
  cost            server: wall time x the server GPU's hourly price (the server is rented for the
                  whole run); edge: the sum over edges of busy time x the edge GPU's price (a
                  shared consumer GPU is paid for while it drafts). tokens per dollar = generated
                  / total cost; dollars per 1M tokens = total cost / generated x 1e6.
  goodput         with an ITL SLO: the requests whose request mean ITL <= SLO (a single-step
                  request never waited between tokens and meets it), their generated tokens /
                  wall time; and the fraction of requests that meet it.
  wasted drafting tree tokens sent for verification and not accepted: sum over verify steps of
                  (tree_size - accepted_depth), also as a fraction of the tree tokens sent; and
                  draft time while the server was idle: per edge, the part of its drafting
                  intervals outside the union of `server_batch` intervals (mean over edges).
                  The first is server work spent on nothing; the second, edge work the server
                  waited for.

Request-level figures (TTFT, ITL, acceptance, hit rate, goodput) are also split by the
`category` field of `request_start` (Spec-Bench categories) when requests carry one.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Hourly on-demand prices, as in the reference's metric script (dollars per GPU-hour).
DEFAULT_GPU_PRICES: Mapping[str, float] = {
    "A100-40GB": 4.05,
    "A100-80GB": 5.05,
    "RTX 4090": 0.35,
}


# --------------------------------------------------------------------------------------------
# Parsed runs.


@dataclasses.dataclass(frozen=True)
class Step:
  t: float
  n_tokens: int
  accepted_depth: int | None
  proactive_hit: bool | None
  tree_size: int | None = None  # draft tokens sent below the root (verify steps)


@dataclasses.dataclass(frozen=True)
class RequestTrace:
  """One user request: its start and its steps in time order."""

  request_id: str
  client_id: str
  t_start: float | None
  category: str | None
  steps: tuple[Step, ...]

  @property
  def token_steps(self) -> list[Step]:
    return [s for s in self.steps if s.n_tokens > 0]

  @property
  def generated(self) -> int:
    return sum(s.n_tokens for s in self.steps)

  @property
  def ttft_s(self) -> float | None:
    token_steps = self.token_steps
    if self.t_start is None or not token_steps:
      return None
    return token_steps[0].t - self.t_start

  def itl_samples(self) -> tuple[np.ndarray, np.ndarray]:
    """(per-token latency of each step after the first, n_tokens of that step)."""
    token_steps = self.token_steps
    values, weights = [], []
    for previous, step in zip(token_steps, token_steps[1:]):
      values.append((step.t - previous.t) / step.n_tokens)
      weights.append(step.n_tokens)
    return np.asarray(values, np.float64), np.asarray(weights, np.int64)

  @property
  def mean_itl_s(self) -> float | None:
    token_steps = self.token_steps
    if len(token_steps) < 2:
      return None
    later_tokens = sum(s.n_tokens for s in token_steps[1:])
    return (token_steps[-1].t - token_steps[0].t) / later_tokens


@dataclasses.dataclass(frozen=True)
class ServerBatch:
  t_start: float
  t_end: float
  op: str
  batch_size: int
  tokens: int
  forward_time_s: float


@dataclasses.dataclass(frozen=True)
class Run:
  """The parsed events of one run."""

  name: str
  system: str
  t_first: float
  t_last: float
  requests: tuple[RequestTrace, ...]
  batches: tuple[ServerBatch, ...]
  edge_busy: Mapping[str, tuple[tuple[float, float], ...]]  # client_id -> intervals

  @property
  def wall_time_s(self) -> float:
    return self.t_last - self.t_first

  def itl_samples(self, category: str | None = None) -> np.ndarray:
    """The token-weighted ITL samples (each step's value repeated n_tokens times)."""
    return _weighted_samples(self._requests_of(category))

  def _requests_of(self, category: str | None) -> list[RequestTrace]:
    if category is None:
      return list(self.requests)
    return [r for r in self.requests if r.category == category]


def _weighted_samples(requests: Iterable[RequestTrace]) -> np.ndarray:
  chunks = [np.repeat(*r.itl_samples()) for r in requests]
  return np.concatenate(chunks) if chunks else np.zeros(0)


def _event_times(event: Mapping[str, Any]) -> list[float]:
  return [float(event[k]) for k in ("t", "t_start", "t_end") if event.get(k) is not None]


def group_runs(events: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  """Groups events by `run_id`, or by `system` for events without one (insertion order)."""
  runs: dict[str, list[Mapping[str, Any]]] = {}
  for event in events:
    name = event.get("run_id") or event.get("system") or "unnamed"
    runs.setdefault(str(name), []).append(event)
  return runs


def parse_run(name: str, events: Sequence[Mapping[str, Any]]) -> Run:
  """Builds a `Run` from the events of one run (any order)."""
  if not events:
    raise ValueError(f"run {name!r} has no events")
  starts: dict[str, Mapping[str, Any]] = {}
  steps: dict[str, list[Step]] = collections.defaultdict(list)
  clients: dict[str, str] = {}
  batches, edge = [], collections.defaultdict(list)
  times = []
  for event in events:
    times.extend(_event_times(event))
    kind = event["kind"]
    if kind == "request_start":
      request_id = str(event["request_id"])
      starts[request_id] = event
      clients[request_id] = str(event["client_id"])
    elif kind == "request_step":
      request_id = str(event["request_id"])
      clients.setdefault(request_id, str(event["client_id"]))
      depth = event.get("accepted_depth")
      steps[request_id].append(Step(
          t=float(event["t"]), n_tokens=int(event["n_tokens"]),
          accepted_depth=None if depth is None else int(depth),
          proactive_hit=event.get("proactive_hit"),
          tree_size=None if event.get("tree_size") is None else int(event["tree_size"])))
    elif kind == "server_batch":
      batches.append(ServerBatch(
          t_start=float(event["t_start"]), t_end=float(event["t_end"]), op=str(event["op"]),
          batch_size=int(event["batch_size"]), tokens=int(event["tokens"]),
          forward_time_s=float(event["forward_time_s"])))
    elif kind == "edge_busy":
      edge[str(event["client_id"])].append((float(event["t_start"]), float(event["t_end"])))
  request_ids = list(dict.fromkeys([*starts, *steps]))
  requests = tuple(
      RequestTrace(
          request_id=request_id, client_id=clients[request_id],
          t_start=float(starts[request_id]["t"]) if request_id in starts else None,
          category=starts.get(request_id, {}).get("category"),
          steps=tuple(sorted(steps.get(request_id, []), key=lambda s: s.t)))
      for request_id in request_ids)
  systems = sorted({str(e.get("system")) for e in events if e.get("system")})
  return Run(name=name, system="+".join(systems) or name, t_first=min(times), t_last=max(times),
             requests=requests, batches=tuple(sorted(batches, key=lambda b: b.t_start)),
             edge_busy={c: tuple(sorted(iv)) for c, iv in edge.items()})


def interval_union_length(intervals: Iterable[tuple[float, float]],
                          window: tuple[float, float] | None = None) -> float:
  """Total length covered by the intervals (overlaps counted once), clipped to `window`."""
  total, current_start, current_end = 0.0, None, None
  for start, end in sorted(intervals):
    if window is not None:
      start, end = max(start, window[0]), min(end, window[1])
    if end <= start:
      continue
    if current_end is None or start > current_end:
      if current_end is not None:
        total += current_end - current_start
      current_start, current_end = start, end
    else:
      current_end = max(current_end, end)
  if current_end is not None:
    total += current_end - current_start
  return total


# --------------------------------------------------------------------------------------------
# Summaries.


@dataclasses.dataclass(frozen=True)
class LatencyStats:
  count: int  # samples (tokens for ITL, requests for TTFT)
  mean_s: float | None
  p50_s: float | None
  p99_s: float | None

  @classmethod
  def of(cls, samples: Sequence[float] | np.ndarray) -> "LatencyStats":
    samples = np.asarray(samples, np.float64)
    if samples.size == 0:
      return cls(0, None, None, None)
    return cls(int(samples.size), float(samples.mean()), float(np.percentile(samples, 50)),
               float(np.percentile(samples, 99)))


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
  """Request-level figures of a run or of one category of it."""

  n_requests: int
  generated_tokens: int
  ttft: LatencyStats
  itl: LatencyStats
  n_verifications: int
  mean_accepted_depth: float | None
  mean_tokens_per_step: float | None
  accepted_depth_histogram: dict[int, int]
  acceptance_by_depth: dict[int, float]
  proactive_hit_rate: float | None
  slo_met_requests: int | None
  slo_attainment: float | None
  goodput_tokens_per_s: float | None
  tree_tokens_sent: int = 0
  wasted_tree_tokens: int = 0
  wasted_tree_token_fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class CostConfig:
  """Which GPUs a run is billed for, and their hourly prices."""

  server_gpu: str = "A100-80GB"
  edge_gpu: str = "RTX 4090"
  gpu_prices_per_hour: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_GPU_PRICES))

  def __post_init__(self):
    for gpu in (self.server_gpu, self.edge_gpu):
      if gpu not in self.gpu_prices_per_hour:
        raise ValueError(f"no price for GPU {gpu!r}; known: {sorted(self.gpu_prices_per_hour)}")


@dataclasses.dataclass(frozen=True)
class CostMetrics:
  server_gpu: str
  edge_gpu: str
  server_usd: float
  edge_usd: float
  total_usd: float
  tokens_per_usd: float | None
  usd_per_million_tokens: float | None


@dataclasses.dataclass(frozen=True)
class RunSummary:
  run: str
  system: str
  n_clients: int  # distinct client_id of the run's requests (one per edge device)
  n_edges: int  # edges that logged drafting intervals
  wall_time_s: float
  generated_tokens: int
  server_compute_s: float
  throughput_per_compute_s: float | None
  throughput_per_wall_s: float | None
  server_busy_s: float
  server_utilization: float | None
  mean_edge_busy_s: float | None
  mean_edge_idle_s: float | None
  mean_edge_idle_fraction: float | None
  itl_slo_s: float | None
  mean_edge_draft_while_server_idle_s: float | None
  cost: CostMetrics
  requests: RequestMetrics
  categories: dict[str, RequestMetrics]

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (histogram keys become strings in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def _ratio(numerator: float, denominator: float) -> float | None:
  return numerator / denominator if denominator > 0 else None


def request_metrics(requests: Sequence[RequestTrace], wall_time_s: float,
                    itl_slo_s: float | None) -> RequestMetrics:
  """The request-level figures of a set of requests (see the module docstring)."""
  steps = [s for r in requests for s in r.steps]
  verifications = [s for s in steps if s.accepted_depth is not None]
  depths = np.asarray([s.accepted_depth for s in verifications], np.int64)
  histogram: dict[int, int] = {}
  acceptance: dict[int, float] = {}
  if depths.size:
    histogram = {int(d): int(c) for d, c in zip(*np.unique(depths, return_counts=True))}
    for depth in range(1, int(depths.max()) + 1):
      acceptance[depth] = float((depths >= depth).sum() / (depths >= depth - 1).sum())
  hits = [s.proactive_hit for s in steps if s.proactive_hit is not None]
  ttfts = [r.ttft_s for r in requests if r.ttft_s is not None]
  slo_met = slo_attainment = goodput = None
  if itl_slo_s is not None:
    meeting = [r for r in requests if r.mean_itl_s is None or r.mean_itl_s <= itl_slo_s]
    slo_met = len(meeting)
    slo_attainment = _ratio(slo_met, len(requests))
    goodput = _ratio(sum(r.generated for r in meeting), wall_time_s)
  sized = [s for s in verifications if s.tree_size is not None]
  sent = sum(s.tree_size for s in sized)
  wasted = sum(max(s.tree_size - s.accepted_depth, 0) for s in sized)
  return RequestMetrics(
      tree_tokens_sent=sent,
      wasted_tree_tokens=wasted,
      wasted_tree_token_fraction=_ratio(wasted, sent),
      n_requests=len(requests),
      generated_tokens=sum(r.generated for r in requests),
      ttft=LatencyStats.of(ttfts),
      itl=LatencyStats.of(_weighted_samples(requests)),
      n_verifications=len(verifications),
      mean_accepted_depth=float(depths.mean()) if depths.size else None,
      mean_tokens_per_step=(float(np.mean([s.n_tokens for s in verifications]))
                            if verifications else None),
      accepted_depth_histogram=histogram,
      acceptance_by_depth=acceptance,
      proactive_hit_rate=_ratio(sum(bool(h) for h in hits), len(hits)),
      slo_met_requests=slo_met,
      slo_attainment=slo_attainment,
      goodput_tokens_per_s=goodput,
  )


def summarize(run: Run, cost_config: CostConfig = CostConfig(),
              itl_slo_s: float | None = None) -> RunSummary:
  """All figures of one run (definitions in the module docstring)."""
  wall = run.wall_time_s
  window = (run.t_first, run.t_last)
  generated = sum(r.generated for r in run.requests)
  server_compute = sum(b.forward_time_s for b in run.batches)
  server_busy = interval_union_length(((b.t_start, b.t_end) for b in run.batches), window)
  edge_busy = {c: interval_union_length(iv, window) for c, iv in run.edge_busy.items()}
  server_intervals = [(b.t_start, b.t_end) for b in run.batches]
  # |edge \ server| = |edge u server| - |server|, each a union of intervals.
  draft_while_idle = [interval_union_length([*iv, *server_intervals], window) - server_busy
                      for iv in run.edge_busy.values()]
  total_edge_busy = sum(edge_busy.values())
  n_edges = len(edge_busy)

  prices = cost_config.gpu_prices_per_hour
  server_usd = wall / 3600.0 * prices[cost_config.server_gpu]
  edge_usd = total_edge_busy / 3600.0 * prices[cost_config.edge_gpu]
  total_usd = server_usd + edge_usd
  cost = CostMetrics(
      server_gpu=cost_config.server_gpu, edge_gpu=cost_config.edge_gpu,
      server_usd=server_usd, edge_usd=edge_usd, total_usd=total_usd,
      tokens_per_usd=_ratio(generated, total_usd),
      usd_per_million_tokens=(total_usd / generated * 1e6) if generated else None)

  categories = sorted({r.category for r in run.requests if r.category is not None})
  return RunSummary(
      run=run.name,
      system=run.system,
      n_clients=len({r.client_id for r in run.requests}),
      n_edges=n_edges,
      wall_time_s=wall,
      generated_tokens=generated,
      server_compute_s=server_compute,
      throughput_per_compute_s=_ratio(generated, server_compute),
      throughput_per_wall_s=_ratio(generated, wall),
      server_busy_s=server_busy,
      server_utilization=_ratio(server_busy, wall),
      mean_edge_busy_s=total_edge_busy / n_edges if n_edges else None,
      mean_edge_idle_s=(wall - total_edge_busy / n_edges) if n_edges else None,
      mean_edge_idle_fraction=(_ratio(wall - total_edge_busy / n_edges, wall)
                               if n_edges else None),
      itl_slo_s=itl_slo_s,
      mean_edge_draft_while_server_idle_s=(float(np.mean(draft_while_idle))
                                           if draft_while_idle else None),
      cost=cost,
      requests=request_metrics(run.requests, wall, itl_slo_s),
      categories={c: request_metrics([r for r in run.requests if r.category == c], wall,
                                     itl_slo_s) for c in categories},
  )


def summarize_events(events: Iterable[Mapping[str, Any]], cost_config: CostConfig = CostConfig(),
                     itl_slo_s: float | None = None) -> tuple[list[Run], list[RunSummary]]:
  """Groups events into runs and summarizes each."""
  runs = [parse_run(name, evs) for name, evs in group_runs(events).items()]
  return runs, [summarize(run, cost_config, itl_slo_s) for run in runs]


def parse_gpu_prices(entries: Iterable[str]) -> dict[str, float]:
  """Parses 'NAME=DOLLARS_PER_HOUR' entries over the defaults, e.g. 'H100=2.99'."""
  prices = dict(DEFAULT_GPU_PRICES)
  for entry in entries:
    name, sep, value = entry.rpartition("=")
    try:
      price = float(value)
    except ValueError:
      price = math.nan
    if not sep or not name.strip() or not math.isfinite(price) or price < 0:
      raise ValueError(f"GPU price {entry!r} is not of the form NAME=DOLLARS_PER_HOUR")
    prices[name.strip()] = price
  return prices
