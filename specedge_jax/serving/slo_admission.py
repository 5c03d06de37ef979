"""SLO-aware admission: how many sessions the verifier holds at once so that they meet their ITL
SLOs, found from the ITL it measures (additive increase, multiplicative decrease).

Why: a verifier that takes every session that finds a free slot shares its batches among all of
them; past its capacity every session's rounds queue, and under a mean-ITL SLO all of them miss
together (goodput falls to zero while throughput holds). Holding fewer sessions lets those meet
their SLO while the others wait for admission, where the wait is time to first token, not
inter-token latency: what continuous-batching servers do, and why server-only serving keeps
its ITL under load. The slot count is the hard cap; this is the SLO's cap below it.

What this module owns: per session, EMAs of its measured inter-token latency as the verifier
sees it (time between its consecutive answers over the tokens the later one emitted: drafting,
network, queue and forward, all of it) and of its queue time per token, and the capacity:
- down to max(`min_sessions`, floor(held x `decrease`)) when a session that has answered
  `warmup_rounds` rounds runs over its SLO *because of load*: its own time per token (ITL less
  queue time) leaves at least `own_margin` of the SLO for queueing. A session over its SLO with
  no queue to blame (a long RTT, a slow edge) is lost to its own edge; holding fewer sessions
  would not save it, only cost the others their turn (the first version, without this test,
  cut capacity at 2 clients for the 40 ms edges' sake and lost 15 % of goodput there). Nor is a
  *marginal* session, whose own time leaves it less than `own_margin` of its SLO: only a
  near-empty server would save it, and chasing it held 1-3 sessions on a verifier of 4-lane
  batches at 4 clients, half static's throughput for 4 more requests met (session 20). At
  most once per `cooldown_s`, since a cut takes a while to show in the EMAs;
- up by one when every warmed-up session that its edge has not lost is within
  (1 - `headroom`) of its SLO, at most once per `cooldown_s`, and only while the capacity
  binds (sessions are waiting or it is full).
Sessions without an SLO neither count nor are held back. Pure: the caller passes `now`.

`for_server` is the verifier's policy (the servicer's and the simulator's): never below one
full batch of sessions, since a verifier holding fewer leaves every forward short of lanes.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
  min_sessions: int = 1
  decrease: float = 0.75  # multiplicative cut on a violation
  headroom: float = 0.15  # all under (1 - headroom) x SLO: room for one more
  cooldown_s: float = 0.5
  warmup_rounds: int = 3  # answers before a session's ITL counts
  smoothing: float = 0.3  # EMA weight of a new round
  own_margin: float = 0.25  # of the SLO a session's own time must leave for queueing

  def __post_init__(self):
    if self.min_sessions < 1:
      raise ValueError(f"min_sessions must be >= 1, got {self.min_sessions}")
    if not 0 < self.decrease < 1 or not 0 <= self.headroom < 1 or not 0 < self.smoothing <= 1:
      raise ValueError("decrease must be in (0, 1), headroom in [0, 1), smoothing in (0, 1]")
    if self.cooldown_s < 0 or self.warmup_rounds < 1:
      raise ValueError("cooldown_s must be >= 0 and warmup_rounds >= 1")
    if not 0 <= self.own_margin < 1:
      raise ValueError(f"own_margin must be in [0, 1), got {self.own_margin}")


@dataclasses.dataclass
class _SessionItl:
  itl_slo_s: float
  last_answer_s: float
  itl_s: float = 0.0
  queue_s: float = 0.0  # queue time per token
  rounds: int = 0

  def lost(self, own_margin: float) -> bool:
    """Its own edge's time (the ITL less the queue) leaves it less than `own_margin` of its SLO
    for queueing: lost or marginal, not a session fewer held sessions would save."""
    return self.itl_s - self.queue_s > (1.0 - own_margin) * self.itl_slo_s

  def over_by_load(self, own_margin: float) -> bool:
    return self.itl_s > self.itl_slo_s and not self.lost(own_margin)


class SloAdmission:
  """The number of sessions to hold at once, from their measured ITL against their SLOs."""

  def __init__(self, max_sessions: int, config: AdmissionConfig = AdmissionConfig()):
    if max_sessions < 1:
      raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
    self.max_sessions = max_sessions
    self.config = config
    self.capacity = max_sessions
    self._sessions: dict[str, _SessionItl] = {}
    self._last_change_s = -math.inf

  def opened(self, session: str, *, itl_slo_s: float, now: float) -> None:
    """A session was admitted (its first token is out at `now`)."""
    if itl_slo_s > 0:
      self._sessions[session] = _SessionItl(itl_slo_s=itl_slo_s, last_answer_s=now)

  def forget(self, session: str) -> None:
    self._sessions.pop(session, None)

  def itl_s(self, session: str) -> float | None:
    """The session's measured ITL EMA; None before its first answer (or without an SLO)."""
    state = self._sessions.get(session)
    return state.itl_s if state is not None and state.rounds > 0 else None

  def answered(self, session: str, *, emitted: int, now: float, held: int,
               waiting: bool, queue_s: float = 0.0) -> bool:
    """Records one answer of `emitted` tokens whose round waited `queue_s` in the verifier's
    queue; `held`: sessions held now, `waiting`: opens are queued for admission. Returns
    whether the capacity changed."""
    state = self._sessions.get(session)
    if state is None or emitted < 1:
      return False
    itl, queue = (now - state.last_answer_s) / emitted, max(queue_s, 0.0) / emitted
    state.last_answer_s = now
    if state.rounds == 0:
      state.itl_s, state.queue_s = itl, queue
    else:
      alpha = self.config.smoothing
      state.itl_s += alpha * (itl - state.itl_s)
      state.queue_s += alpha * (queue - state.queue_s)
    state.rounds += 1
    return self._adjust(now, held, waiting)

  def _adjust(self, now: float, held: int, waiting: bool) -> bool:
    config = self.config
    if now - self._last_change_s < config.cooldown_s:
      return False
    counted = [s for s in self._sessions.values() if s.rounds >= config.warmup_rounds]
    if not counted:
      return False
    if any(s.over_by_load(config.own_margin) for s in counted):
      target = max(config.min_sessions, math.floor(min(held, self.capacity) * config.decrease))
      if target < self.capacity:
        self.capacity, self._last_change_s = target, now
        return True
      return False
    binding = waiting or held >= self.capacity
    savable = [s for s in counted if not s.lost(config.own_margin)]  # tell nothing about load
    if (binding and self.capacity < self.max_sessions and savable and
        all(s.itl_s <= (1 - config.headroom) * s.itl_slo_s for s in savable)):
      self.capacity, self._last_change_s = self.capacity + 1, now
      return True
    return False


def for_server(num_slots: int, max_batch_size: int,
               config: AdmissionConfig = AdmissionConfig()) -> SloAdmission:
  """The verifier's SLO admission (module docstring): `num_slots` at most, one batch at least."""
  return SloAdmission(num_slots, dataclasses.replace(
      config, min_sessions=max(config.min_sessions, min(max_batch_size, num_slots))))
