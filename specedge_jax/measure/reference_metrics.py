"""The reference's metric definitions (kaist-ina/specedge, `src/metric/*.py`) over our events.

This module owns the second set of definitions the reports print beside ours (`metrics.py`):
the figures as the reference's metric scripts define them, each system kind by its own script,
computed from this project's JSONL events (`events.py`). It reads event dicts and returns frozen
dataclasses; it never reads files, draws or prints. It also owns the one-line legend of both
definition sets (`LEGEND`) that the report, the sweep and `docs/metric_definitions.md` repeat.

Kinds and their reference scripts: 'specedge' (metric/specedge.py, a client log per edge plus the
server's log), 'server_only_spec' (metric/server_only.py), 'server_only_ar'
(metric/auto_batch.py). A run's kind is its `system`; runs of any other system get no summary.

The reference's rows, mapped onto our events:

  step row          one `request_step` event. A request's earliest step is the reference's
                    step 0 ('step_idx == 0' / 'iter_idx == 0'): our first token (phase 'prefill'),
                    or the speculative first round (`first_round`) when the edge runs one.
  server iteration  the reference's server logs one line per batch (specedge's server.jsonl),
                    per loop iteration (server_only.jsonl, auto.jsonl), and runs a batch's
                    prefills inside it. Our verifier and baselines log a prefill as a
                    `server_batch` of its own, so an iteration here is: the `server_batch`
                    events up to and including one 'verify' or 'decode' batch (in t_start order),
                    that is that batch plus the 'prefill', 'draft_prefill' and 'draft' batches run
                    since the previous one. Batches after the last one form a last iteration.
                    Its draft time is the sum of forward_time_s of its 'draft' and
                    'draft_prefill' batches, its target time that of the rest.
  step's iteration  a later step: the iteration whose verify/decode batch lists the step's
                    request in `request_ids`, the latest ending at or before the step's `t`. The
                    earliest step: the iteration holding the request's own 'prefill' batch. (For
                    logs without `request_ids`: a later step's is the latest iteration ending at
                    or before `t`, the earliest step's the latest started at or before `t`.)
  prefill step      the reference's 'target.prefill != 0' (specedge) / 'prefill != 0'
                    (server_only) / 'prefill_cnt != 0' (auto_batch): the earliest step, and
                    for SpecEdge a later step whose iteration ran another request's prefill (our
                    verifier runs a prefill between two verify batches, where the reference's
                    server runs it inside the next batch, which every request of that batch waits
                    for; the step's own prefill came before its draft, so it delayed nothing).
                    For the server-only kinds the reference's flag is per iteration, so every
                    step of an iteration that ran any prefill is a prefill step: the iteration's
                    tokens and its time leave the throughput together.
  after a hit       the reference's 'target.prev_proactive': a later step whose request's
                    previous step has proactive_hit true (our proactive_hit says whether that
                    round's proactive tree is the next round's tree).
  draft time        SpecEdge: the step's `draft_time_s`. Server-only: the iteration's draft
                    time (the reference logs the iteration's time on every row of it).
  target time       SpecEdge: the step's `wait_time_s`, the client-observed verify time (RTT,
                    queue and forward), the reference's client 'target.end_to_end'. Server-only:
                    the iteration's target time.
  whole step        draft time + target time.
  server log span   first to last `t_end` of the run's `server_batch` events (the reference
                    timestamps each server line when it is written, after its batch).

Definitions (sample standard deviations, ddof 1, as polars' `std`):

  throughput        SpecEdge: the tokens of every step, the first included / server log span.
                    Server-only: the tokens of non-prefill steps / the summed time (draft +
                    target) of the iterations that ran no prefill.
  ITL               the summed whole-step time of the later non-prefill steps / their tokens.
  tokens per step   mean and std of n_tokens over every step, the first included.
  draft split       prefill: the earliest steps; non-prefill: the later steps; after a hit: the
                    later steps after a hit (the reference's draft filter reads
                    '(prev_proactive & step_idx) != 0' by Python's precedence; this is the
                    intended 'prev_proactive and step_idx != 0').
  target / whole-step split  prefill: the prefill steps; non-prefill: the rest; after a hit: the
                    non-prefill steps after a hit.
  server per-batch  per iteration, its draft + target time, split by whether it ran a prefill
                    (auto_batch.py averages over rows, that is weighted by batch size; this is
                    per iteration, as specedge.py's server log is per batch).
  draft-model prefill  SpecEdge only: the durations of `edge_busy` op 'prefill' (the draft
                    model's prompt prefill). The reference's step-0 draft time holds it; our
                    edge runs it as a job of its own, not attributed to a request (edge_busy has
                    no request_id), so it is reported apart and added to the edge running time.
  proactive ratio   later steps after a hit / later steps whose previous step has a
                    proactive_hit that is not null.
  running time      server: SpecEdge the server log span; server-only the summed time of every
                    iteration. Edge (SpecEdge): the summed whole-step time of every step plus
                    the draft-model prefills.
  cost              SpecEdge: server price x server log span + edge price x edge running time
                    (each edge billed for its draft and target time, waits included). Server-only:
                    server price x the summed time of the non-prefill iterations. Dollars per 1M
                    tokens: that cost / the throughput's tokens. Prices: `metrics.CostConfig`.

Known gaps of the mapping. Our first token comes from the prefill alone (a one-token step of its
own); the reference's first round verifies a tree drafted on the prompt, so its step 0 holds a
round's tokens (our speculative first round matches it). With K > 1 requests interleaved on one
edge, summed step times count the edge's overlapping time once per request; the reference's
client runs one request at a time.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from specedge_jax.measure import metrics

SPECEDGE = "specedge"
SERVER_ONLY_SPEC = "server_only_spec"
SERVER_ONLY_AR = "server_only_ar"
KINDS = (SPECEDGE, SERVER_ONLY_SPEC, SERVER_ONLY_AR)
REFERENCE_SCRIPTS = {SPECEDGE: "src/metric/specedge.py",
                     SERVER_ONLY_SPEC: "src/metric/server_only.py",
                     SERVER_ONLY_AR: "src/metric/auto_batch.py"}

DEFINITION_SETS = ("ours", "reference")

# The short legend every report prints under its table (one line per figure that differs).
LEGEND: Mapping[str, tuple[str, ...]] = {
    "ours": (
        ("[ours] throughput: tokens of every step (first included) / summed forward_time_s of "
         "every server_batch (prefill included), for every system; wall: / the run's span"),
        ("[ours] ITL: token-weighted gaps between the arrival times of token-bearing steps, the "
         "first step excluded (it is the TTFT)"),
        "[ours] tokens per step: mean over verifications (the first token excluded)",
        "[ours] cost: server price x wall time + each edge's price x its busy time",
    ),
    "reference": (
        ("[ref] throughput: SpecEdge all tokens (first round included) / server log span (first "
         "to last server_batch end); server-only non-prefill tokens / summed time of iterations "
         "with no prefill (kaist-ina/specedge src/metric/*.py)"),
        ("[ref] ITL: summed draft + target time of the later steps whose server iteration ran "
         "no prefill (SpecEdge: of another request) / their tokens"),
        "[ref] tokens per step: mean and sample std over every step, the first included",
        ("[ref] cost: SpecEdge server price x log span + edge price x (draft + target time per "
         "step, waits included, + draft prefills); server-only server price x non-prefill time"),
    ),
}


def legend(definitions: Iterable[str]) -> list[str]:
  """The legend lines of the given definition sets ('ours', 'reference'), in that order."""
  wanted = set(definitions)
  unknown = wanted - set(DEFINITION_SETS)
  if unknown:
    raise ValueError(f"unknown definition sets {sorted(unknown)}; known: {DEFINITION_SETS}")
  return [line for name in DEFINITION_SETS if name in wanted for line in LEGEND[name]]


# --------------------------------------------------------------------------------------------
# Summaries.


@dataclasses.dataclass(frozen=True)
class MeanStd:
  count: int
  mean: float | None
  std: float | None  # sample std (ddof 1); None under two samples, as polars gives

  @classmethod
  def of(cls, values: Sequence[float]) -> MeanStd:
    array = np.asarray(values, np.float64)
    if array.size == 0:
      return cls(0, None, None)
    return cls(int(array.size), float(array.mean()),
               float(array.std(ddof=1)) if array.size > 1 else None)


@dataclasses.dataclass(frozen=True)
class Split:
  prefill: MeanStd
  non_prefill: MeanStd
  after_hit: MeanStd | None  # None where the reference has no such split (server batches)


@dataclasses.dataclass(frozen=True)
class ReferenceSummary:
  """One run's figures under the reference's definitions (see the module docstring)."""

  run: str
  system: str
  kind: str
  reference_script: str
  n_steps: int
  n_iterations: int
  n_prefill_iterations: int
  tokens_counted: int  # the throughput's numerator
  throughput_time_s: float | None  # its denominator
  throughput_tok_s: float | None
  itl_s: float | None  # per token
  itl_tokens: int
  itl_steps: int
  itl_excluded_prefill_steps: int  # later steps left out for a prefill in their iteration
  tokens_per_step: MeanStd
  draft: Split
  target: Split
  step: Split
  server_batch: Split
  draft_model_prefill: MeanStd | None  # SpecEdge only
  proactive_ratio: float | None
  server_running_time_s: float | None
  edge_running_time_s: float | None  # SpecEdge only
  server_usd: float | None
  edge_usd: float | None
  total_usd: float | None
  usd_per_million_tokens: float | None

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------------------------
# Iterations and rows.

_CLOSING_OPS = frozenset({"verify", "decode"})
_DRAFT_OPS = frozenset({"draft", "draft_prefill"})


@dataclasses.dataclass(frozen=True)
class Iteration:
  """A server iteration in the reference's sense (module docstring)."""

  t_start: float
  t_end: float
  closed: bool  # ends with a verify/decode batch
  closing_ids: frozenset[str]  # the requests of that batch
  prefill_ids: tuple[frozenset[str], ...]  # the request_ids of each of its prefill batches
  draft_s: float
  target_s: float

  @property
  def has_prefill(self) -> bool:
    return bool(self.prefill_ids)

  @property
  def time_s(self) -> float:
    return self.draft_s + self.target_s

  def has_prefill_besides(self, request_id: str) -> bool:
    # A prefill batch whose ids are not logged counts as another request's.
    return any(ids != {request_id} for ids in self.prefill_ids)


def _ids(event: Mapping[str, Any]) -> frozenset[str]:
  return frozenset(str(r) for r in event.get("request_ids") or ())


def _iteration(batches: Sequence[Mapping[str, Any]]) -> Iteration:
  closing = batches[-1] if batches[-1]["op"] in _CLOSING_OPS else None
  return Iteration(
      t_start=float(batches[0]["t_start"]),
      t_end=float(batches[-1]["t_end"]),
      closed=closing is not None,
      closing_ids=_ids(closing) if closing is not None else frozenset(),
      prefill_ids=tuple(_ids(b) for b in batches if b["op"] == "prefill"),
      draft_s=sum(float(b["forward_time_s"]) for b in batches if b["op"] in _DRAFT_OPS),
      target_s=sum(float(b["forward_time_s"]) for b in batches if b["op"] not in _DRAFT_OPS))


def server_iterations(batches: Iterable[Mapping[str, Any]]) -> list[Iteration]:
  """Groups `server_batch` events into iterations: each ends with a verify or decode batch."""
  iterations, pending = [], []
  for batch in sorted(batches, key=lambda b: (float(b["t_start"]), float(b["t_end"]))):
    pending.append(batch)
    if batch["op"] in _CLOSING_OPS:
      iterations.append(_iteration(pending))
      pending = []
  if pending:
    iterations.append(_iteration(pending))
  return iterations


@dataclasses.dataclass(frozen=True)
class Row:
  """One step as the reference's client/server row."""

  request_id: str
  n_tokens: int
  first: bool
  prefill: bool
  after_hit: bool
  previous_hit_known: bool
  draft_s: float
  target_s: float

  @property
  def step_s(self) -> float:
    return self.draft_s + self.target_s


class _Attach:
  """Finds the iteration of a step (module docstring, "step's iteration")."""

  def __init__(self, iterations: Sequence[Iteration]):
    self._iterations = iterations
    self._closing: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    self._prefill: dict[str, int] = {}
    for index, iteration in enumerate(iterations):
      if iteration.closed:
        for request_id in iteration.closing_ids:
          self._closing[request_id].append((iteration.t_end, index))
      for ids in iteration.prefill_ids:
        for request_id in ids:
          self._prefill.setdefault(request_id, index)
    for entries in self._closing.values():
      entries.sort()
    # For logs without request_ids: every iteration by start, the closed ones by end.
    self._starts = [(it.t_start, index) for index, it in enumerate(iterations)]
    self._ends = sorted((it.t_end, index) for index, it in enumerate(iterations) if it.closed)

  def _latest(self, entries: Sequence[tuple[float, int]], t: float) -> Iteration | None:
    position = bisect.bisect_right(entries, (t, len(self._iterations)))
    return self._iterations[entries[position - 1][1]] if position else None

  def __call__(self, request_id: str, t: float, first: bool) -> Iteration | None:
    if first:
      if request_id in self._prefill:
        return self._iterations[self._prefill[request_id]]
      return self._latest(self._starts, t)
    if request_id in self._closing:
      return self._latest(self._closing[request_id], t)
    if request_id in self._prefill:  # a later step of a request no verify batch lists
      return None
    return self._latest(self._ends, t)


def step_rows(kind: str, events: Sequence[Mapping[str, Any]],
              iterations: Sequence[Iteration]) -> list[Row]:
  """The reference rows of a run's `request_step` events."""
  steps: dict[str, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for event in events:
    if event["kind"] == "request_step":
      steps[str(event["request_id"])].append(event)
  attach = _Attach(iterations)
  rows = []
  for request_id, request_steps in steps.items():
    previous_hit = None
    for index, event in enumerate(sorted(request_steps, key=lambda e: float(e["t"]))):
      first = index == 0
      iteration = attach(request_id, float(event["t"]), first)
      if kind == SPECEDGE or iteration is None:
        draft_s = float(event.get("draft_time_s") or 0.0)
        target_s = float(event.get("wait_time_s") or 0.0)
      else:
        draft_s, target_s = iteration.draft_s, iteration.target_s
      if kind == SPECEDGE:
        touched = iteration is not None and iteration.has_prefill_besides(request_id)
      else:
        touched = iteration is not None and iteration.has_prefill
      rows.append(Row(request_id=request_id, n_tokens=int(event["n_tokens"]), first=first,
                      prefill=first or touched, after_hit=not first and previous_hit is True,
                      previous_hit_known=not first and previous_hit is not None,
                      draft_s=draft_s, target_s=target_s))
      previous_hit = event.get("proactive_hit")
  return rows


# --------------------------------------------------------------------------------------------
# The figures.


def _ratio(numerator: float, denominator: float | None) -> float | None:
  return numerator / denominator if denominator else None


def _split(rows: Sequence[Row], value, prefill_of) -> Split:
  return Split(prefill=MeanStd.of([value(r) for r in rows if prefill_of(r)]),
               non_prefill=MeanStd.of([value(r) for r in rows if not prefill_of(r)]),
               after_hit=MeanStd.of([value(r) for r in rows if r.after_hit and not prefill_of(r)]))


def kind_of(system: str) -> str | None:
  return system if system in KINDS else None


def summarize_run(name: str, events: Sequence[Mapping[str, Any]],
                  cost_config: metrics.CostConfig = metrics.CostConfig()) -> ReferenceSummary:
  """The reference's figures of one run's events; raises ValueError for a run of no known kind."""
  systems = sorted({str(e["system"]) for e in events if e.get("system")})
  system = "+".join(systems) or name
  kind = kind_of(system)
  if kind is None:
    raise ValueError(f"run {name!r} is of system {system!r}; the reference defines {KINDS}")
  batches = [e for e in events if e["kind"] == "server_batch"]
  iterations = server_iterations(batches)
  rows = step_rows(kind, events, iterations)
  later_clean = [r for r in rows if not r.first and not r.prefill]
  itl_tokens = sum(r.n_tokens for r in later_clean)
  prices = cost_config.gpu_prices_per_hour
  server_price = prices[cost_config.server_gpu] / 3600.0
  edge_price = prices[cost_config.edge_gpu] / 3600.0

  draft_model_prefill = edge_running = edge_usd = None
  if kind == SPECEDGE:
    ends = [float(b["t_end"]) for b in batches]
    span = max(ends) - min(ends) if ends else None
    tokens = sum(r.n_tokens for r in rows)
    throughput_time = server_running = span
    server_usd = span * server_price if span is not None else None
    prefills = [float(e["t_end"]) - float(e["t_start"]) for e in events
                if e["kind"] == "edge_busy" and e.get("op") == "prefill"]
    draft_model_prefill = MeanStd.of(prefills)
    edge_running = sum(r.step_s for r in rows) + sum(prefills)
    edge_usd = edge_running * edge_price
  else:
    tokens = sum(r.n_tokens for r in rows if not r.prefill)
    clean = [it for it in iterations if it.closed and not it.has_prefill]
    throughput_time = sum(it.time_s for it in clean) if clean else None
    server_running = sum(it.time_s for it in iterations) if iterations else None
    server_usd = throughput_time * server_price if throughput_time is not None else None
  # The draft split is by step index (the reference's step_idx / iter_idx), not by prefill.
  draft_split = Split(
      prefill=MeanStd.of([r.draft_s for r in rows if r.first]),
      non_prefill=MeanStd.of([r.draft_s for r in rows if not r.first]),
      after_hit=MeanStd.of([r.draft_s for r in rows if r.after_hit]))
  total_usd = None if server_usd is None else server_usd + (edge_usd or 0.0)
  known = [r for r in rows if r.previous_hit_known]
  return ReferenceSummary(
      run=name, system=system, kind=kind, reference_script=REFERENCE_SCRIPTS[kind],
      n_steps=len(rows), n_iterations=len(iterations),
      n_prefill_iterations=sum(it.has_prefill for it in iterations),
      tokens_counted=tokens, throughput_time_s=throughput_time,
      throughput_tok_s=_ratio(tokens, throughput_time),
      itl_s=_ratio(sum(r.step_s for r in later_clean), itl_tokens),
      itl_tokens=itl_tokens, itl_steps=len(later_clean),
      itl_excluded_prefill_steps=sum(not r.first and r.prefill for r in rows),
      tokens_per_step=MeanStd.of([r.n_tokens for r in rows]),
      draft=draft_split,
      target=_split(rows, lambda r: r.target_s, lambda r: r.prefill),
      step=_split(rows, lambda r: r.step_s, lambda r: r.prefill),
      server_batch=Split(
          prefill=MeanStd.of([it.time_s for it in iterations if it.has_prefill]),
          non_prefill=MeanStd.of([it.time_s for it in iterations if not it.has_prefill]),
          after_hit=None),
      draft_model_prefill=draft_model_prefill,
      proactive_ratio=_ratio(sum(r.after_hit for r in known), len(known)),
      server_running_time_s=server_running, edge_running_time_s=edge_running,
      server_usd=server_usd, edge_usd=edge_usd, total_usd=total_usd,
      usd_per_million_tokens=(total_usd / tokens * 1e6) if total_usd is not None and tokens
      else None)


def summarize_events(events: Iterable[Mapping[str, Any]],
                     cost_config: metrics.CostConfig = metrics.CostConfig()
                     ) -> dict[str, ReferenceSummary]:
  """Groups events into runs as `metrics.group_runs` does; summarizes each run of a known kind
  (run name -> summary; runs of other systems are left out)."""
  summaries = {}
  for name, run_events in metrics.group_runs(events).items():
    systems = {str(e["system"]) for e in run_events if e.get("system")}
    if len(systems) == 1 and kind_of(next(iter(systems))) is not None:
      summaries[name] = summarize_run(name, run_events, cost_config)
  return summaries
