"""The simulated verifier's batching decisions, with the real rules.

What this module owns: `SloPolicy`, the per-session state the worker keeps for its 'slo' mode
with the calls it makes into the real `serving/slo_scheduler.py` (`round_deadline`,
`start_time`, `plan_batch`, `AcceptanceStats`) and the real `serving/verify_time.
VerifyTimeEstimator`. The static/dynamic rule is the worker's own, `serving/batching_rules.py`
(re-exported here for the simulator). No clock of its own: callers pass the simulated `now`.
What is repeated here is the worker's bookkeeping around the scheduler (which features it
feeds it), cited line for line in `SloPolicy`; `tests/sim/test_simulator.py` drives the real
`EngineWorker` and this module through the same hand-made cases and asserts equal decisions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Sequence

import numpy as np

from specedge_jax.serving import slo_scheduler
from specedge_jax.serving.batching_rules import batch_ready, late_after_batch, wake_at  # noqa: F401
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.verify_time import BatchShape, VerifyTimeEstimator


@dataclasses.dataclass
class SloSession:
  """`engine_worker._SlotState`: what the worker keeps per session for the scheduler."""

  context_len: int
  itl_slo_s: float
  acceptance: slo_scheduler.AcceptanceStats = dataclasses.field(
      default_factory=slo_scheduler.AcceptanceStats)
  last_reply_at: float | None = None
  edge_time_s: float | None = None


@dataclasses.dataclass
class SloJob:
  """What the scheduler sees of one pending verify (`engine_worker._VerifyJob`'s slo fields)."""

  key: Hashable
  slot: int
  enqueued_at: float
  parents: np.ndarray
  deadline_s: float = math.inf
  node_values: tuple[float, ...] = ()
  context_len: int = 0


class SloPolicy:
  """The worker's 'slo' bookkeeping around the real scheduler (see the module docstring)."""

  def __init__(self, batching: BatchingConfig, max_batch_size: int,
               estimator: VerifyTimeEstimator):
    self.batching = batching
    self.max_batch_size = max_batch_size
    self.estimator = estimator
    self.sessions: dict[int, SloSession] = {}

  @property
  def max_queue_s(self) -> float:
    return self.batching.max_queue_ms / 1000.0

  @property
  def margin_s(self) -> float:
    return self.batching.slo_margin_ms / 1000.0

  def open(self, slot: int, *, context_len: int, itl_slo_ms: float, now: float) -> None:
    """`EngineWorker._open`: a new session's state (its SLO, else the server's default)."""
    slo_ms = itl_slo_ms or self.batching.default_itl_slo_ms
    self.sessions[slot] = SloSession(context_len=context_len, itl_slo_s=slo_ms / 1000.0,
                                     last_reply_at=now)

  def close(self, slot: int) -> None:
    self.sessions.pop(slot, None)

  def schedule(self, job: SloJob) -> None:
    """`EngineWorker._schedule`: the job's context, node values and round deadline."""
    state = self.sessions.get(job.slot)
    if state is None:
      return
    job.context_len = state.context_len
    values = state.acceptance.node_values(job.parents)
    job.node_values = tuple(float(v) for v in values)
    edge_time = (job.enqueued_at - state.last_reply_at if state.last_reply_at is not None
                 else 0.0)
    if state.last_reply_at is not None:
      state.edge_time_s = (edge_time if state.edge_time_s is None
                           else 0.5 * (state.edge_time_s + edge_time))
    job.deadline_s = slo_scheduler.round_deadline(
        job.enqueued_at, itl_slo_s=state.itl_slo_s, expected_emitted=1.0 + float(values.sum()),
        edge_time_s=max(edge_time, 0.0), max_queue_s=self.max_queue_s)

  def candidates(self, pending: Sequence[SloJob]) -> list[slo_scheduler.Candidate]:
    return [slo_scheduler.Candidate(key=i, arrival_s=job.enqueued_at, deadline_s=job.deadline_s,
                                    node_values=job.node_values, context_len=job.context_len)
            for i, job in enumerate(pending)]

  def wake_at(self, now: float, pending: Sequence[SloJob], active_slots: set[int]) -> float:
    """`EngineWorker._wake_at` in 'slo' mode: `slo_scheduler.start_time` with the absent
    sessions' expected arrivals (last answer + measured edge time)."""
    waiting = {job.slot for job in pending}
    expected = []
    for slot in active_slots - waiting:
      state = self.sessions.get(slot)
      if state is not None and state.last_reply_at is not None and state.edge_time_s is not None:
        expected.append(state.last_reply_at + state.edge_time_s)
    return slo_scheduler.start_time(now, self.candidates(pending), self.estimator,
                                    max_batch_size=self.max_batch_size,
                                    max_queue_s=self.max_queue_s, margin_s=self.margin_s,
                                    expected_arrivals=expected)

  def plan(self, now: float, pending: Sequence[SloJob]) -> slo_scheduler.BatchPlan:
    """`EngineWorker._take_slo_batch`: the real plan (the caller cuts the trees)."""
    return slo_scheduler.plan_batch(now, self.candidates(pending), self.estimator,
                                    max_batch_size=self.max_batch_size,
                                    max_queue_s=self.max_queue_s, margin_s=self.margin_s)

  def after_batch(self, slot: int, *, tokens: np.ndarray, parents: np.ndarray, kept: int,
                  accepted: Sequence[int], bonus: int, ended: float) -> None:
    """`EngineWorker._run_batch`'s per-session update after the answers went out."""
    state = self.sessions.get(slot)
    if state is None:
      return
    state.context_len += 1 + len(accepted)
    state.last_reply_at = ended
    state.acceptance.observe(tokens, parents, kept, accepted, bonus)

  def observe_forward(self, shape: BatchShape, seconds: float) -> None:
    self.estimator.observe(shape, seconds)
    self.estimator.refit()
