"""The discrete-event model: N edges with K interleaved requests each and one verifier, or the
server alone (autoregressive, continuous batching); a heapq of events on a simulated clock.

What this module owns: the specs of a simulated system (`SpecEdgeSpec`, `ServerOnlySpec`,
`RttSpec`, `RequestSpec`), the event loop (`_Loop`), processors shared by processor sharing
(`_SharedCores`), the edge device (one job at a time, FIFO, as `serving/drafter.EdgeDevice`), a
request's life on an edge (open, draft prefill, draft -> verify -> commit rounds, close;
`_lane`), the verifier's engine thread with the real batching rules (`_engine_thread`, following
`serving/engine_worker.EngineWorker._run` step by step), server-only decoding
(`run_server_only`, following `serving/baselines.run_baseline`), and the run's output: event
dicts in the schema of `measure/events.py`, which `summarize` turns into figures with
`measure/metrics.py`'s own definitions. No threads, no real time, no I/O.

What a simulated round is (one request; `serving/drafter.Drafter._round`):
  edge device: draft (`EdgeCosts.draft_s` at the round's tree limits); the Verify call: the
  edge's gRPC CPU, RTT/2 and half the round overhead, the servicer's request CPU, the engine
  thread's inbox, its pending list until the batching rule releases a batch, the batch's forward
  (`CostModel.verify` of the batch's shape); the answer leaves in its place among the batch's
  serialized replies, then half the overhead, RTT/2 and the edge's CPU again; then the device's
  commit, where the tokens reach the user (the `request_step` event's time, as in the drafter).
  The verifier decides the accepted path (`acceptance.PathModel`, or a replayed trace) and, with
  a speculation controller, the edge's next tree limits (the real `SpeculationController`).

The engine thread (as `EngineWorker._run`): it takes everything queued in its inbox, runs opens
(prefill) and closes at once and in order, appends verifies to the pending list, then runs
batches while the rule says one is ready; it waits for the next job or the rule's deadline.
Opens therefore wait behind a running forward, and a forward behind a prefill, as on the real
server.

Shared processors, for the CPU box the sweep ran on: with `shared_edge_cores`, every edge's
device jobs and gRPC CPU share those cores (each job's work scaled by the measured inflation of
that many processes per core); with `shared_server_core`, the engine thread's forwards and
prefills share one core with the servicer's request CPU. Elsewhere each edge has its own
accelerator and CPU, and the server's host CPU runs beside its accelerator.

SLO-aware admission (`slo_admission`): the real `serving/slo_admission.SloAdmission`, fed as the
servicer feeds it (each answer's ITL and queue time, the sessions held, whether opens wait), caps
the sessions held below the slots; opens past the cap wait in the same FIFO as opens past the
slots (`Servicer._free_slots`).

Not modelled: proactive drafting, the speculative first round, faults and retries, the admission
queue's bound and retry-after (opens beyond the slots wait FIFO, unbounded).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from specedge_jax.api import TreeLimits, TreeParams
from specedge_jax.measure import metrics
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving import slo_admission as slo_admission_lib
from specedge_jax.serving.speculation_controller import (
  ControllerConfig,
  RoundObservation,
  tree_report,
  SpeculationController,
)
from specedge_jax.serving.verify_time import (
  DEFAULT_PRIOR_MS,
  BatchShape,
  VerifyTimeEstimator,
  fit_coefficients,
)
from specedge_jax.sim import acceptance as acceptance_lib
from specedge_jax.sim import batching as batching_lib
from specedge_jax.sim.costs import CostModel, cached

# ----------------------------------------------------------------------------------------------
# Specs


@dataclasses.dataclass(frozen=True)
class RttSpec:
  """The edge-server round trip. 'constant': every call `rtt_s`; 'per_edge': edge i gets
  `per_edge_s[i % len]` (mixed links); 'lognormal': each direction RTT/2 x exp(N(0, sigma)), so
  the median round trip stays `rtt_s` (per_edge values as medians when given). Half of a round
  trip is spent before the request reaches the server and half after the answer leaves it, as
  the drafter's simulated delay does."""

  kind: str = "constant"
  rtt_s: float = 0.014
  per_edge_s: tuple[float, ...] = ()
  sigma: float = 0.0

  def __post_init__(self):
    if self.kind not in ("constant", "per_edge", "lognormal"):
      raise ValueError(f"rtt kind must be constant, per_edge or lognormal, got {self.kind!r}")
    if self.kind == "per_edge" and not self.per_edge_s:
      raise ValueError("rtt kind 'per_edge' needs per_edge_s")
    if self.rtt_s < 0 or self.sigma < 0 or any(v < 0 for v in self.per_edge_s):
      raise ValueError("round trips and sigma must be >= 0")

  def median_s(self, edge: int) -> float:
    return self.per_edge_s[edge % len(self.per_edge_s)] if self.per_edge_s else self.rtt_s

  def one_way_s(self, rng: np.random.Generator, edge: int) -> float:
    half = self.median_s(edge) / 2.0
    if self.kind == "lognormal" and self.sigma > 0:
      return half * float(np.exp(rng.normal(0.0, self.sigma)))
    return half


@dataclasses.dataclass(frozen=True)
class RequestSpec:
  """One request: its prompt and output lengths (the first token included) and, to replay a
  real run, its recorded rounds (accepted depth and tokens emitted per round)."""

  request_id: str
  prompt_tokens: int
  output_tokens: int
  accepted_depths: tuple[int, ...] | None = None
  round_tokens: tuple[int, ...] | None = None

  @classmethod
  def replay(cls, trace: acceptance_lib.RequestTrace) -> "RequestSpec":
    return cls(trace.request_id, trace.prompt_tokens, trace.output_tokens, trace.accepted_depths,
               trace.round_tokens)


@dataclasses.dataclass(frozen=True)
class SpecEdgeSpec:
  """SpecEdge: `num_edges` edges, each interleaving `requests_per_edge` (K) requests, and one
  verifier batching by `batching` up to `max_batch_size`.

  shared_edge_cores: 0 gives every edge a device of its own (the paper's setting); n >= 1 puts
    every edge's device on n shared processors, processor-sharing (this CPU box, where every
    drafter process is pinned to one core). edge_start_s: when each edge starts its first
    request (edge processes that come up one after another). num_slots: the verifier's
    sessions (0: one for every request in flight); opens beyond wait first come first served.
  controller: the real speculation controller advises each session's next tree (None: the
    configured tree every round), fed as the servicer feeds it (`Servicer._advise`).
  itl_slo_ms: the SLO every session asks for ('slo' batching; 0: the server's default).
  slo_admission: hold only as many sessions as the real `SloAdmission` allows (needs
    itl_slo_ms > 0), as `server.slo_admission`."""

  num_edges: int
  requests_per_edge: int
  tree: TreeParams
  batching: BatchingConfig
  max_batch_size: int
  rtt: RttSpec = RttSpec()
  num_slots: int = 0
  shared_edge_cores: int = 0
  edge_start_s: tuple[float, ...] = ()
  controller: ControllerConfig | None = None
  itl_slo_ms: float = 0.0
  # The verifier's engine thread and its servicer share one core (a CPU verifier, pinned): each
  # arriving call's `CostModel.server_request_cpu_s` then slows a running forward (processor
  # sharing); else it runs beside the forward (a GPU server's host).
  shared_server_core: bool = False
  # Background work on the shared edge cores, (start s, CPU seconds): drafter processes warming
  # up (compiling) while others already serve.
  edge_background: tuple[tuple[float, float], ...] = ()
  # The 'slo' estimator's seed (`VerifyTimeEstimator` coefficients, ms); None: fitted to the
  # verify cost curve at the start, as a verifier seeded from its bench_core curve would be.
  estimator_prior_ms: tuple[float, ...] | None = None
  slo_admission: bool = False

  def __post_init__(self):
    if self.num_edges < 1 or self.requests_per_edge < 1 or self.max_batch_size < 1:
      raise ValueError("num_edges, requests_per_edge and max_batch_size must be >= 1")
    if self.shared_edge_cores < 0 or self.num_slots < 0:
      raise ValueError("shared_edge_cores and num_slots must be >= 0")
    if self.slo_admission and not self.itl_slo_ms > 0:
      raise ValueError("slo_admission needs an itl_slo_ms > 0")


@dataclasses.dataclass(frozen=True)
class ServerOnlySpec:
  """Server-only autoregressive serving: `num_users` users on the server alone, continuous
  batching with at most `max_batch_size` in flight (`serving/baselines.run_baseline`). Users
  either all submit at t = 0 (closed workload, as the sweep's baseline: `closed_loop` False), or
  each submits its next request when the previous one ends (`closed_loop`), over the network
  (`rtt`: TTFT pays one round trip, ITL none)."""

  num_users: int
  max_batch_size: int
  rtt: RttSpec = RttSpec(rtt_s=0.0)
  closed_loop: bool = True

  def __post_init__(self):
    if self.num_users < 1 or self.max_batch_size < 1:
      raise ValueError("num_users and max_batch_size must be >= 1")


# ----------------------------------------------------------------------------------------------
# The event loop


class _Loop:
  """A heapq of (time, sequence, callback, args) and the simulated clock."""

  def __init__(self):
    self.now = 0.0
    self._heap: list = []
    self._sequence = itertools.count()
    self.events_run = 0

  def at(self, t: float, callback: Callable, *args) -> None:
    heapq.heappush(self._heap, (max(t, self.now), next(self._sequence), callback, args))

  def run(self, until: float = math.inf, on_progress: Callable[[float], None] | None = None):
    heap = self._heap
    while heap:
      t, _, callback, args = heapq.heappop(heap)
      if t > until:
        break
      self.now = t
      callback(*args)
      self.events_run += 1
      if on_progress is not None and not self.events_run % 20000:
        on_progress(t)


class _SharedCores:
  """`cores` processors shared by processor sharing among the jobs running on them (each edge
  device runs one job at a time; with more devices than cores each gets cores / n of one)."""

  def __init__(self, loop: _Loop, cores: int):
    self.loop, self.cores = loop, cores
    self._jobs: dict[int, list] = {}  # id -> [remaining work s, callback]
    self._ids = itertools.count()
    self._t = 0.0
    self._version = 0

  def _rate(self) -> float:
    return min(1.0, self.cores / len(self._jobs)) if self._jobs else 0.0

  def _advance(self) -> None:
    rate, elapsed = self._rate(), self.loop.now - self._t
    for job in self._jobs.values():
      job[0] -= elapsed * rate
    self._t = self.loop.now

  def start(self, work_s: float, callback: Callable[[], None]) -> None:
    self._advance()
    self._jobs[next(self._ids)] = [work_s, callback]
    self._reschedule()

  def _reschedule(self) -> None:
    self._version += 1
    if self._jobs:
      soonest = min(job[0] for job in self._jobs.values())
      self.loop.at(self.loop.now + max(soonest, 0.0) / self._rate(), self._tick, self._version)

  def _tick(self, version: int) -> None:
    if version != self._version:
      return
    self._advance()
    done = [i for i, job in self._jobs.items() if job[0] <= 1e-12]
    callbacks = [self._jobs.pop(i)[1] for i in done]
    self._reschedule()
    for callback in callbacks:
      callback()


class _Device:
  """One edge's device: FIFO, one job at a time; its busy intervals are `edge_busy` events."""

  def __init__(self, sim: "_SpecEdgeRun", name: str, shared: _SharedCores | None):
    self.sim, self.name, self.shared = sim, name, shared
    self._queue: collections.deque = collections.deque()
    self._busy = False

  def submit(self, op: str, duration_s: float, callback: Callable[[float], None]) -> None:
    """Queues a job; `callback` gets its service time (its wall time once it started)."""
    self._queue.append((op, duration_s, callback))
    if not self._busy:
      self._start()

  def _start(self) -> None:
    op, duration, callback = self._queue.popleft()
    self._busy = True
    started = self.sim.loop.now
    if self.shared is not None:
      self.shared.start(duration * self.sim.edge_inflation,
                        lambda: self._done(op, started, callback))
    else:
      self.sim.loop.at(started + duration, self._done, op, started, callback)

  def _done(self, op: str, started: float, callback: Callable[[float], None]) -> None:
    self.sim.emit("edge_busy", t=self.sim.loop.now, client_id=self.name, t_start=started,
                  t_end=self.sim.loop.now, op=op)
    self._busy = False
    if self._queue:
      self._start()
    callback(self.sim.loop.now - started)


# ----------------------------------------------------------------------------------------------
# Server jobs


@dataclasses.dataclass
class _Open:
  request: RequestSpec
  reply: Callable[[Any], None]
  enqueued_at: float = 0.0


@dataclasses.dataclass
class _Close:
  slot: int
  reply: Callable[[Any], None]
  enqueued_at: float = 0.0


@dataclasses.dataclass
class _Verify:
  slot: int
  tree: acceptance_lib.SimTree
  reply: Callable[[Any], None]
  draft_s: float
  edge_rtt_s: float  # the edge's last measured network time, for the controller
  enqueued_at: float = 0.0
  slo: batching_lib.SloJob | None = None


@dataclasses.dataclass
class _Session:
  request: RequestSpec
  generated: int  # tokens emitted so far, the first included
  context: int  # committed rows
  rounds: int = 0


@dataclasses.dataclass(frozen=True)
class OpenReply:
  slot: int
  finished: bool
  queue_s: float
  forward_s: float


@dataclasses.dataclass(frozen=True)
class VerifyReply:
  emitted: int
  accepted: int
  finished: bool
  queue_s: float
  forward_s: float
  batch_size: int
  kept_nodes: int
  limits: TreeLimits | None


# ----------------------------------------------------------------------------------------------
# SpecEdge


class _SpecEdgeRun:
  def __init__(self, spec: SpecEdgeSpec, costs: CostModel, requests: Sequence[RequestSpec],
               path_model: acceptance_lib.PathModel, *, seed: int, run_id: str):
    self.spec, self.costs, self.path_model = spec, costs, path_model
    self.verify_cost = cached(costs.verify)
    self.family = path_model.family
    self.loop = _Loop()
    self.run_id = run_id
    self.events: list[dict[str, Any]] = []
    seeds = np.random.SeedSequence(seed).spawn(2)
    self.net_rng = np.random.default_rng(seeds[0])
    self.acceptance_rng = np.random.default_rng(seeds[1])
    shared = (_SharedCores(self.loop, spec.shared_edge_cores) if spec.shared_edge_cores else None)
    self.shared_cores = shared
    # Work on the shared edge cores costs more with more processes on them (measured).
    self.edge_inflation = (costs.inflation(spec.num_edges) if shared is not None else 1.0)
    self.server_core = _SharedCores(self.loop, 1) if spec.shared_server_core else None
    self.edge_names = [f"edge{i}" for i in range(spec.num_edges)]
    self.devices = [_Device(self, name, shared) for name in self.edge_names]
    # Dealt round-robin, as `serving/workload.shard`; each edge's K lanes take them in order.
    self.queues = [collections.deque(requests[i::spec.num_edges]) for i in range(spec.num_edges)]
    in_flight = spec.num_edges * spec.requests_per_edge
    self.free_slots = collections.deque(range(spec.num_slots or in_flight))
    self.total_slots = len(self.free_slots)
    self.slots_available = len(self.free_slots)  # less the opens admitted and not yet run
    self.admission: collections.deque[_Open] = collections.deque()
    self.slo_admission = (slo_admission_lib.for_server(self.total_slots, spec.max_batch_size)
                          if spec.slo_admission else None)
    self.capacity_trace: list[tuple[float, int]] = []  # (time, SLO admission's capacity)
    self.sessions: dict[int, _Session] = {}
    # The engine thread's state (`EngineWorker`).
    self.inbox: collections.deque = collections.deque()
    self.pending: collections.deque[_Verify] = collections.deque()
    self.active: set[int] = set()
    self.late: set[int] = set()
    self._waiting = False
    self._wake_version = 0
    self._engine = self._engine_thread()
    self.controller = (SpeculationController(spec.tree, spec.controller)
                       if spec.controller is not None else None)
    self.slo: batching_lib.SloPolicy | None = None
    if spec.batching.mode == "slo":
      prior = spec.estimator_prior_ms or estimator_prior(costs.verify, spec)
      self.slo = batching_lib.SloPolicy(spec.batching, spec.max_batch_size,
                                        VerifyTimeEstimator(prior))
    self.truncated_nodes = 0

  def emit(self, kind: str, **fields) -> None:
    fields.setdefault("t", self.loop.now)
    self.events.append({"kind": kind, "system": "specedge", "run_id": self.run_id, **fields})

  # -- edges -------------------------------------------------------------------------------------

  def start(self) -> None:
    self.loop.at(0.0, self._resume)  # the engine thread comes up and waits for jobs
    if self.shared_cores is not None:
      for at, seconds in self.spec.edge_background:
        self.loop.at(at, self.shared_cores.start, seconds, lambda: None)
    for edge in range(self.spec.num_edges):
      offset = self.spec.edge_start_s[edge] if edge < len(self.spec.edge_start_s) else 0.0
      for _ in range(self.spec.requests_per_edge):
        lane = self._lane(edge)
        self.loop.at(offset, self._advance, lane, None)

  def _advance(self, lane: Iterator, value: Any) -> None:
    try:
      command = lane.send(value)
    except StopIteration:
      return
    kind = command[0]
    if kind == "device":
      _, edge, op, duration = command
      self.devices[edge].submit(op, duration, lambda service_s: self._advance(lane, service_s))
    elif kind == "call":
      _, edge, job = command
      self._call(edge, job, lambda value: self._advance(lane, value))
    else:
      raise AssertionError(f"unknown lane command {kind}")

  def _edge_cpu(self, seconds: float, then: Callable[[], None]) -> None:
    """The edge's CPU work outside its device (the gRPC client): on shared processors it takes
    its share of them beside the devices' jobs; on an edge of its own it is a plain delay."""
    if seconds <= 0:
      then()
    elif self.shared_cores is not None:
      self.shared_cores.start(seconds * self.edge_inflation, then)
    else:
      self.loop.at(self.loop.now + seconds, then)

  def _call(self, edge: int, job, resume: Callable[[Any], None]) -> None:
    """An RPC: the client's CPU, RTT/2 and half the overhead there; the verifier; the same back
    (after `extra_s`, the answer's place in its batch's serialized replies)."""
    half_cpu = self.costs.edge.rpc_cpu_s / 2

    def reply(value: Any, extra_s: float = 0.0) -> None:
      back = (extra_s + self.spec.rtt.one_way_s(self.net_rng, edge) +
              self.costs.round_overhead_s / 2)
      self.loop.at(self.loop.now + back, self._edge_cpu, half_cpu, lambda: resume(value))

    job.reply = reply

    def send() -> None:
      there = self.spec.rtt.one_way_s(self.net_rng, edge) + self.costs.round_overhead_s / 2
      self.loop.at(self.loop.now + there, self._submit, job)

    self._edge_cpu(half_cpu, send)

  def _lane(self, edge: int) -> Iterator:
    """One of an edge's K places: serves the edge's requests one after another (module
    docstring; `Drafter._serve`)."""
    spec, costs, name = self.spec, self.costs, self.edge_names[edge]
    queue = self.queues[edge]
    while queue:
      request = queue.popleft()
      rid = request.request_id
      self.emit("request_start", client_id=name, request_id=rid,
                prompt_tokens=request.prompt_tokens, dataset="sim", category=None)
      t_place = self.loop.now
      opened: OpenReply = yield ("call", edge, _Open(request, reply=None))  # type: ignore[arg-type]
      self.emit("request_step", client_id=name, request_id=rid, n_tokens=1, draft_time_s=0.0,
                wait_time_s=self.loop.now - t_place, tree_size=0, accepted_depth=None,
                proactive_hit=None, phase="prefill")
      finished = opened.finished
      if not finished:
        yield ("device", edge, "prefill", costs.edge.open_s(request.prompt_tokens))
      limits = TreeLimits(spec.tree.max_budget, spec.tree.max_beam_len)
      network_s = 0.0
      while not finished:
        draft_s = yield ("device", edge, "draft", costs.edge.draft_s(limits.depth, limits.budget))
        tree = self.family.tree(limits.budget, limits.depth)
        sent = self.loop.now
        answer: VerifyReply = yield ("call", edge, _Verify(
            opened.slot, tree, reply=None, draft_s=draft_s,  # type: ignore[arg-type]
            edge_rtt_s=network_s))
        wait = self.loop.now - sent
        network_s = max(wait - answer.queue_s - answer.forward_s, 0.0)
        yield ("device", edge, "commit", costs.edge.commit_s)
        self.emit("request_step", client_id=name, request_id=rid, n_tokens=answer.emitted,
                  phase="verify", draft_time_s=draft_s, wait_time_s=wait,
                  tree_size=tree.size - 1, accepted_depth=answer.accepted, proactive_hit=None,
                  server_queue_time_s=answer.queue_s, server_forward_time_s=answer.forward_s,
                  server_batch_size=answer.batch_size, kept_nodes=answer.kept_nodes - 1)
        finished = answer.finished
        if answer.limits is not None:
          limits = answer.limits
      yield ("device", edge, "close", costs.edge.close_s)
      yield ("call", edge, _Close(opened.slot, reply=None))  # type: ignore[arg-type]
      self.emit("request_end", client_id=name, request_id=rid, n_generated=None,
                finished_reason="length", error=None)

  # -- the verifier ------------------------------------------------------------------------------

  def _submit(self, job) -> None:
    """A job reaches the servicer: its request CPU (on the engine's core where they share it),
    then opens wait for a free session slot (FIFO admission), and everything goes to the engine
    thread's inbox."""
    if self.server_core is not None and self.costs.server_request_cpu_s > 0:
      self.server_core.start(self.costs.server_request_cpu_s, lambda: self._admit(job))
    else:
      self._admit(job)

  def _may_open(self) -> bool:
    """A slot is free and SLO admission, if on, holds fewer sessions (open or opening) than its
    capacity (`Servicer._free_slots`)."""
    if not self.slots_available:
      return False
    if self.slo_admission is None:
      return True
    return self.total_slots - self.slots_available < self.slo_admission.capacity

  def _admit(self, job) -> None:
    job.enqueued_at = self.loop.now
    if isinstance(job, _Open):
      if self.admission or not self._may_open():  # FIFO: nobody passes a waiting open
        self.admission.append(job)
        return
      self.slots_available -= 1
    self._to_inbox(job)

  def _wake_admission(self) -> None:
    while self.admission and self._may_open():
      self.slots_available -= 1
      self._to_inbox(self.admission.popleft())

  def _to_inbox(self, job) -> None:
    job.enqueued_at = self.loop.now
    self.inbox.append(job)
    if self._waiting:
      self._waiting = False
      self._wake_version += 1
      self._resume()

  def _timeout(self, version: int) -> None:
    if self._waiting and version == self._wake_version:
      self._waiting = False
      self._resume()

  def _resume(self) -> None:
    """Runs the engine thread until it waits (for a job or a deadline) or is busy."""
    command = next(self._engine)
    if command[0] == "busy":
      if self.server_core is not None:
        self.server_core.start(command[1], self._resume)
      else:
        self.loop.at(self.loop.now + command[1], self._resume)
    else:
      self._waiting = True
      self._wake_version += 1
      if command[1] is not None:
        self.loop.at(command[1], self._timeout, self._wake_version)

  def _wake_at(self) -> float:
    if self.slo is not None:
      return self.slo.wake_at(self.loop.now, [job.slo for job in self.pending], self.active)
    return batching_lib.wake_at(self.spec.batching, self.pending[0].enqueued_at)

  def _batch_ready(self) -> bool:
    spec = self.spec
    return batching_lib.batch_ready(
        spec.batching, now=self.loop.now, pending_slots=[job.slot for job in self.pending],
        oldest_enqueued_s=self.pending[0].enqueued_at, active_slots=self.active,
        late_slots=self.late, max_batch_size=spec.max_batch_size,
        slo_wake_at=self._wake_at if self.slo is not None else None)

  def _engine_thread(self) -> Iterator[tuple]:
    """`EngineWorker._run`, yielding ('busy', seconds) or ('wait', wake time or None)."""
    while True:
      if not self.inbox:
        wake = self._wake_at() if self.pending else None
        if wake is None or wake > self.loop.now:
          yield ("wait", wake)
      items = list(self.inbox)
      self.inbox.clear()
      for job in items:
        if isinstance(job, _Open):
          yield from self._open(job)
        elif isinstance(job, _Close):
          self._close(job)
        else:
          self.late.discard(job.slot)
          if self.slo is not None:
            job.slo = batching_lib.SloJob(key=id(job), slot=job.slot, enqueued_at=job.enqueued_at,
                                          parents=job.tree.parents)
            self.slo.schedule(job.slo)
          self.pending.append(job)
      while self.pending and self._batch_ready():
        yield from self._run_batch()

  def _open(self, job: _Open) -> Iterator[tuple]:
    started = self.loop.now
    yield ("busy", self.costs.prefill.seconds(job.request.prompt_tokens))
    duration = self.loop.now - started  # longer than the cost where the core is shared
    slot = self.free_slots.popleft()
    finished = job.request.output_tokens <= 1
    self.sessions[slot] = _Session(job.request, generated=1, context=job.request.prompt_tokens)
    if not finished:
      self.active.add(slot)
      if self.slo is not None:
        self.slo.open(slot, context_len=job.request.prompt_tokens,
                      itl_slo_ms=self.spec.itl_slo_ms, now=self.loop.now)
      if self.slo_admission is not None:
        self.slo_admission.opened(str(slot), itl_slo_s=self.spec.itl_slo_ms / 1000.0,
                                  now=self.loop.now)
    self.emit("server_batch", t_start=started, t_end=self.loop.now, op="prefill", batch_size=1,
              tokens=job.request.prompt_tokens, forward_time_s=duration,
              queue_time_s=started - job.enqueued_at, request_ids=[job.request.request_id])
    job.reply(OpenReply(slot=slot, finished=finished, queue_s=started - job.enqueued_at,
                        forward_s=duration))

  def _close(self, job: _Close) -> None:
    self.active.discard(job.slot)
    self.late.discard(job.slot)
    self.sessions.pop(job.slot, None)
    if self.slo is not None:
      self.slo.close(job.slot)
    if self.controller is not None:
      self.controller.forget(str(job.slot))
    if self.slo_admission is not None:
      self.slo_admission.forget(str(job.slot))
    self.free_slots.append(job.slot)
    self.slots_available += 1
    job.reply(None)
    self._wake_admission()

  def _take(self) -> tuple[list[_Verify], list[int], list[bool]]:
    """The next batch, how many nodes of each tree it keeps, and which were cut for worth."""
    spec = self.spec
    if self.slo is None:
      batch = [self.pending.popleft() for _ in range(min(spec.max_batch_size, len(self.pending)))]
      self.late = batching_lib.late_after_batch(
          spec.batching, batch_slots=[job.slot for job in batch],
          still_pending_slots=[job.slot for job in self.pending], active_slots=self.active,
          late_slots=self.late, max_batch_size=spec.max_batch_size)
      return batch, [job.tree.size for job in batch], [False] * len(batch)
    jobs = list(self.pending)
    plan = self.slo.plan(self.loop.now, [job.slo for job in jobs])
    chosen = {selection.key for selection in plan.selections}
    self.pending = collections.deque(job for i, job in enumerate(jobs) if i not in chosen)
    batch = [jobs[int(selection.key)] for selection in plan.selections]
    return (batch, [selection.keep_nodes for selection in plan.selections],
            [selection.cut_for_worth for selection in plan.selections])

  def _run_batch(self) -> Iterator[tuple]:
    batch, keep, worth_cut = self._take()
    shape = BatchShape.of(keep, [self.sessions[job.slot].context for job in batch])
    started = self.loop.now
    yield ("busy", self.verify_cost.seconds(shape))
    ended = self.loop.now
    duration = ended - started  # longer than the cost where the core is shared
    depths = []
    # The controller's load signal, as the servicer computes it (`Servicer._advise`): the
    # verifies in flight (sent, not yet answered) over one full batch.
    waiting = len(self.pending) + sum(isinstance(job, _Verify) for job in self.inbox)
    for position, (job, kept, cut_for_worth) in enumerate(zip(batch, keep, worth_cut)):
      session = self.sessions[job.slot]
      accepted_nodes, full_path = self._accept(session, job.tree, kept)
      remaining = session.request.output_tokens - session.generated
      emitted = self._emitted(session, len(accepted_nodes), kept == job.tree.size)
      emitted = max(min(emitted, remaining), 1)
      session.generated += emitted
      session.context += 1 + len(accepted_nodes)
      session.rounds += 1
      finished = session.generated >= session.request.output_tokens
      if finished:
        self.active.discard(job.slot)
      depths.append(len(accepted_nodes))
      self.truncated_nodes += job.tree.size - kept
      limits = None
      if self.controller is not None:
        key = str(job.slot)
        self.controller.observe(key, RoundObservation(
            tree_depth=job.tree.max_depth, accepted=len(accepted_nodes), rtt_s=job.edge_rtt_s,
            draft_step_s=job.draft_s / max(job.tree.max_depth, 1),
            server_s=ended - job.enqueued_at,
            **tree_report(job.tree.size - 1, kept - 1, cut_for_worth)))
        in_flight = waiting + len(batch) - position - 1
        limits = self.controller.advise(
            key, queue_fraction=in_flight / self.spec.max_batch_size,
            itl_slo_s=self.spec.itl_slo_ms / 1000.0 if self.spec.itl_slo_ms > 0 else None)
      if self.slo is not None:
        bonus = full_path[len(accepted_nodes)] if len(full_path) > len(accepted_nodes) else -1
        self.slo.after_batch(job.slot, tokens=job.tree.tokens, parents=job.tree.parents,
                             kept=kept, accepted=accepted_nodes, bonus=bonus, ended=ended)
      if self.slo_admission is not None and self.slo_admission.answered(
          str(job.slot), emitted=emitted, now=ended + position * self.costs.reply_serial_s,
          held=len(self.sessions), waiting=bool(self.admission), queue_s=started - job.enqueued_at):
        self.capacity_trace.append((ended, self.slo_admission.capacity))
        self._wake_admission()  # a raised capacity lets waiting opens in
      job.reply(VerifyReply(emitted=emitted, accepted=len(accepted_nodes), finished=finished,
                            queue_s=started - job.enqueued_at, forward_s=duration,
                            batch_size=len(batch), kept_nodes=kept, limits=limits),
                position * self.costs.reply_serial_s)
    if self.slo is not None:
      self.slo.observe_forward(shape, duration)
    self.emit("server_batch", t_start=started, t_end=ended, op="verify", batch_size=len(batch),
              tokens=shape.tree_tokens, forward_time_s=duration,
              queue_time_s=float(np.mean([started - job.enqueued_at for job in batch])),
              request_ids=[self.sessions[job.slot].request.request_id for job in batch],
              accepted_depths=depths, truncated_nodes=int(sum(j.tree.size for j in batch) -
                                                          sum(keep)))

  def _accept(self, session: _Session, tree: acceptance_lib.SimTree,
              kept: int) -> tuple[list[int], list[int]]:
    """(the accepted nodes of the tree cut to `kept`, the full tree's path)."""
    recorded = session.request.accepted_depths
    depth = None
    if recorded is not None and session.rounds < len(recorded):
      depth = recorded[session.rounds]
    path = self.path_model.sample(self.acceptance_rng, tree, depth=depth)
    return acceptance_lib.accepted_within(path, kept), path

  def _emitted(self, session: _Session, accepted: int, whole_tree: bool) -> int:
    """Tokens a round emits: the replayed count where the round is the recorded one (full
    tree), else the accepted path and the bonus (capped by the caller at the request's end)."""
    recorded = session.request.round_tokens
    if (whole_tree and recorded is not None and session.rounds < len(recorded) and
        session.request.accepted_depths is not None and
        session.request.accepted_depths[session.rounds] == accepted):
      return recorded[session.rounds]
    return accepted + 1


def estimator_prior(verify, spec: SpecEdgeSpec) -> tuple[float, ...]:
  """The 'slo' estimator's seed: the verify-time model fitted to the cost curve over the shapes
  the run can make (as a verifier seeded from its own bench_core curve starts)."""
  rows = []
  nodes = spec.tree.max_budget + 1
  for batch in sorted({1, 2, max(spec.max_batch_size // 2, 1), spec.max_batch_size}):
    for per_lane in sorted({1, max(nodes // 2, 1), nodes}):
      for context in (128, 512):
        shape = BatchShape(batch, batch * per_lane, batch * context)
        rows.append((batch, shape.tree_tokens, shape.context_tokens,
                     1000.0 * verify.seconds(shape)))
  return tuple(float(v) for v in fit_coefficients(np.array(rows, float), DEFAULT_PRIOR_MS, 1e-2))


def run_specedge(spec: SpecEdgeSpec, costs: CostModel, requests: Sequence[RequestSpec],
                 path_model: acceptance_lib.PathModel, *, seed: int = 0, run_id: str = "specedge",
                 on_progress: Callable[[float], None] | None = None) -> "SimRun":
  """Simulates SpecEdge serving `requests` to the end; returns its events and counters."""
  if path_model.family.caps != spec.tree:
    raise ValueError("the acceptance model's tree family must have the spec's tree caps")
  run = _SpecEdgeRun(spec, costs, requests, path_model, seed=seed, run_id=run_id)
  run.start()
  run.loop.run(on_progress=on_progress)
  unserved = sum(len(q) for q in run.queues) + len(run.admission)
  if unserved or run.pending or run.sessions:
    raise RuntimeError(f"the simulation stopped with {unserved} requests unserved, "
                       f"{len(run.pending)} verifies pending, {len(run.sessions)} sessions open")
  return SimRun(run_id=run_id, system="specedge", events=run.events,
                events_run=run.loop.events_run, truncated_nodes=run.truncated_nodes,
                num_edges=spec.num_edges, clients=spec.num_edges * spec.requests_per_edge,
                admission_capacity=tuple(run.capacity_trace))


# ----------------------------------------------------------------------------------------------
# Server-only autoregressive serving


def run_server_only(spec: ServerOnlySpec, costs: CostModel, requests: Sequence[RequestSpec], *,
                    seed: int = 0, run_id: str = "server_only_ar",
                    on_progress: Callable[[float], None] | None = None) -> "SimRun":
  """The target alone (`serving/baselines.run_baseline`, 'autoregressive'): each loop admits
  waiting requests up to the batch (one prefill each, in turn), then decodes one token for every
  request in flight in one forward (`CostModel.decode` + the loop's per-step host work)."""
  loop = _Loop()
  rng = np.random.default_rng(seed)
  events: list[dict[str, Any]] = []
  decode = cached(costs.decode)

  def emit(kind: str, **fields) -> None:
    fields.setdefault("t", loop.now)
    events.append({"kind": kind, "system": "server_only_ar", "run_id": run_id, **fields})

  users = [collections.deque(requests[i::spec.num_users]) for i in range(spec.num_users)]
  arrived: collections.deque = collections.deque()  # (request, user, submitted at)
  state = {"waiting": False}

  def submit(user: int) -> None:
    if not users[user]:
      return
    request = users[user].popleft()
    emit("request_start", client_id=f"user{user}", request_id=request.request_id,
         prompt_tokens=request.prompt_tokens, dataset="sim", category=None)
    there = spec.rtt.one_way_s(rng, user) + costs.round_overhead_s / 2
    loop.at(loop.now + there, arrive, request, user)

  def arrive(request: RequestSpec, user: int) -> None:
    arrived.append((request, user))
    if state["waiting"]:
      state["waiting"] = False
      resume()

  def deliver(user: int, request_id: str, n_tokens: int, phase: str, done: bool) -> None:
    back = spec.rtt.one_way_s(rng, user) + costs.round_overhead_s / 2

    def reach() -> None:
      emit("request_step", client_id=f"user{user}", request_id=request_id, n_tokens=n_tokens,
           draft_time_s=0.0, wait_time_s=0.0, tree_size=0, accepted_depth=None,
           proactive_hit=None, phase=phase)
      if done:
        emit("request_end", client_id=f"user{user}", request_id=request_id, n_generated=None,
             finished_reason="length", error=None)
        if spec.closed_loop:
          submit(user)

    loop.at(loop.now + back, reach)

  def thread() -> Iterator[tuple]:
    active: dict[str, list] = {}  # request id -> [request, user, generated, context]
    while True:
      while arrived and len(active) < spec.max_batch_size:
        request, user = arrived.popleft()
        started = loop.now
        duration = costs.prefill.seconds(request.prompt_tokens)
        yield ("busy", duration)
        emit("server_batch", t_start=started, t_end=loop.now, op="prefill", batch_size=1,
             tokens=request.prompt_tokens, forward_time_s=duration, queue_time_s=0.0,
             request_ids=[request.request_id])
        done = request.output_tokens <= 1
        deliver(user, request.request_id, 1, "prefill", done)
        if not done:
          active[request.request_id] = [request, user, 1, request.prompt_tokens]
      if not active:
        yield ("wait", None)
        continue
      started = loop.now
      shape = BatchShape(len(active), len(active), sum(a[3] for a in active.values()))
      forward = decode.seconds(shape)
      yield ("busy", forward + costs.server_only_step_overhead_s)
      emit("server_batch", t_start=started, t_end=started + forward, op="decode",
           batch_size=shape.batch_size, tokens=shape.tree_tokens, forward_time_s=forward,
           queue_time_s=0.0, request_ids=list(active))
      for request_id in list(active):
        entry = active[request_id]
        entry[2] += 1
        entry[3] += 1
        done = entry[2] >= entry[0].output_tokens
        deliver(entry[1], request_id, 1, "decode", done)
        if done:
          del active[request_id]

  engine = thread()

  def resume() -> None:
    command = next(engine)
    if command[0] == "busy":
      loop.at(loop.now + command[1], resume)
    else:
      state["waiting"] = True

  for user in range(spec.num_users):
    if spec.closed_loop:
      loop.at(0.0, submit, user)
    else:
      while users[user]:
        submit(user)
  loop.at(0.0, resume)
  loop.run(on_progress=on_progress)
  return SimRun(run_id=run_id, system="server_only_ar", events=events,
                events_run=loop.events_run, truncated_nodes=0, num_edges=0,
                clients=spec.num_users)


# ----------------------------------------------------------------------------------------------
# Output


@dataclasses.dataclass
class SimRun:
  run_id: str
  system: str
  events: list[dict[str, Any]]
  events_run: int
  truncated_nodes: int
  num_edges: int
  clients: int  # concurrent requests: edges x K, or server-only users
  # SLO admission's capacity after each change, (time, sessions held at most); () without it.
  admission_capacity: tuple[tuple[float, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class SloSpec:
  """A request meets the SLO when its mean ITL is within `itl_s` (`metrics.RequestTrace.
  mean_itl_s`; None for a one-step request, which meets it) and its TTFT within `ttft_s`."""

  itl_s: float
  ttft_s: float = math.inf


def summarize(run: SimRun, slo: SloSpec, cost_config: metrics.CostConfig = metrics.CostConfig()
              ) -> dict[str, Any]:
  """The run's figures by `measure/metrics.py` (our definitions), plus the SLO attainment with
  the TTFT bound, goodput under it, and the server GPU-hours (wall and busy) for pricing."""
  parsed = metrics.parse_run(run.run_id, run.events)
  summary = metrics.summarize(parsed, cost_config, itl_slo_s=slo.itl_s)
  requests = parsed.requests
  met = [r for r in requests
         if (r.mean_itl_s is None or r.mean_itl_s <= slo.itl_s) and
         (r.ttft_s is not None and r.ttft_s <= slo.ttft_s)]
  wall = parsed.wall_time_s
  out = summary.to_dict()
  prices = cost_config.gpu_prices_per_hour
  out["sim"] = {
      "clients": run.clients, "num_edges": run.num_edges, "events_run": run.events_run,
      "truncated_nodes": run.truncated_nodes,
      "slo": {"itl_s": slo.itl_s, "ttft_s": None if math.isinf(slo.ttft_s) else slo.ttft_s},
      "slo_attainment": len(met) / len(requests) if requests else None,
      "goodput_tokens_per_s": sum(r.generated for r in met) / wall if wall > 0 else None,
      "goodput_requests_per_s": len(met) / wall if wall > 0 else None,
      "server_gpu_hours_wall": wall / 3600.0,
      "server_gpu_hours_busy": summary.server_busy_s / 3600.0,
      "edge_gpu_busy_hours": ((summary.mean_edge_busy_s or 0.0) * summary.n_edges / 3600.0),
      "usd_per_million_tokens_busy_billed": (
          (summary.server_busy_s / 3600.0 * prices[cost_config.server_gpu] +
           summary.cost.edge_usd) / summary.generated_tokens * 1e6
          if summary.generated_tokens else None),
  }
  return out


def headline(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The figures the tables print, from a `summarize` dict."""
  requests = summary["requests"]
  itl, ttft = requests["itl"], requests["ttft"]
  return {
      "wall_s": summary["wall_time_s"],
      "tok_s_wall": summary["throughput_per_wall_s"],
      "tok_s_compute": summary["throughput_per_compute_s"],
      "itl_mean_ms": None if itl["mean_s"] is None else 1e3 * itl["mean_s"],
      "itl_p50_ms": None if itl["p50_s"] is None else 1e3 * itl["p50_s"],
      "itl_p99_ms": None if itl["p99_s"] is None else 1e3 * itl["p99_s"],
      "ttft_mean_ms": None if ttft["mean_s"] is None else 1e3 * ttft["mean_s"],
      "server_util": summary["server_utilization"],
      "tokens_per_step": requests["mean_tokens_per_step"],
      "slo_attainment": summary["sim"]["slo_attainment"],
      "goodput_tok_s": summary["sim"]["goodput_tokens_per_s"],
      "goodput_req_s": summary["sim"]["goodput_requests_per_s"],
      "usd_per_mtok_wall": summary["cost"]["usd_per_million_tokens"],
      "usd_per_mtok_busy": summary["sim"]["usd_per_million_tokens_busy_billed"],
      "server_gpu_h": summary["sim"]["server_gpu_hours_wall"],
      "edge_gpu_busy_h": summary["sim"]["edge_gpu_busy_hours"],
  }
