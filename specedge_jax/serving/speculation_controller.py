"""The speculation controller: the tree each edge should draft next, decided by the verifier.

SpecEdge fixes the tree. What a tree is worth changes per edge and over time: a draft that
agrees with the target deep into the tree is worth a deep tree; a long RTT makes each round
dear, so it pays to send more per round; a busy server makes each tree token dear, since its
verify cost is shared by everyone in the batch. The verifier sees all three, so after every
round it advises each edge a `TreeLimits` (budget, depth), which the edge follows within its
configured caps (`TreeLimits.within`; the draft engine takes them at run time, no recompile).

Per session it keeps exponential moving averages of
- `survival[d]`: P(the accepted path reaches depth d | the tree reached depth d), the conditional
  acceptance by depth that WISP's controller uses to predict the first rejection;
- the edge's round trip (network) and its draft time per growth step (reported by the edge).

`advise` then picks
- the depth: the deepest d whose probability of being reached, prod(survival[1..d]), stays at or
  above `reach_threshold` scaled down by how much of a round the RTT is (a long RTT amortizes
  deeper trees), and within the SLO: the round's estimated time (RTT + draft steps + the
  server's queue and forward) over its expected tokens must not exceed the ITL target;
- the budget: the configured one under no load, shrinking towards `depth` (a chain) as the
  server's queue fills, because then every extra node costs other sessions' time. Under an SLO
  only sessions with slack give nodes back: one near or over its target needs every token a
  round can bring (each round pays the RTT again), so its shrink is scaled by its slack,
  1 - estimated ITL / SLO, over `slack_for_full_shrink`;
- and never more than the verifier keeps: where 'slo' batching cuts a session's trees because
  their nodes are not worth the forward time they add (`slo_scheduler` rule 4; not its
  per-batch deadline cuts), the budget follows an EMA of the nodes kept, probing upwards on
  every whole tree. With fewer nodes the advised depth falls too, and with it the edge's draft
  time. Why: the slack rule keeps trees whole for sessions over their SLO, right when the round
  is mostly RTT (this CPU)
  and wrong when the verify is compute-bound (a 14B target at batch 50: in the simulator's A100
  model at 100 edges it cut goodput from 400 to 77 tok/s, session 21); the verifier's cut,
  which prices a node with the verify-time estimate, tells the two apart.

Pure: no threads, no gRPC, no clock; the servicer feeds it and the simulator reuses it.
"""

from __future__ import annotations

import dataclasses
import math

from specedge_jax.api import TreeLimits, TreeParams


@dataclasses.dataclass(frozen=True)
class RoundObservation:
  """What one verified round tells the controller about a session."""

  tree_depth: int  # deepest node of the verified tree (root = 0)
  accepted: int  # tree tokens accepted below the root (bonus excluded)
  rtt_s: float = 0.0  # the edge's network round trip for this round, as it measured it
  draft_step_s: float = 0.0  # the edge's draft time per growth step this round
  server_s: float = 0.0  # the round's time on the server: queue + forward
  # Nodes below the root the edge sent, and how many of them the verifier's batch kept ('slo'
  # batching cuts trees to what the batch's time and a node's worth allow); 0, 0: unknown.
  sent_nodes: int = 0
  kept_nodes: int = 0


def tree_report(sent_nodes: int, kept_nodes: int, cut_for_worth: bool) -> dict[str, int]:
  """`RoundObservation`'s sent/kept fields for a verified tree: a whole tree, or one cut because
  its nodes were not worth their forward time (`slo_scheduler.Selection.cut_for_worth`), tells
  the controller what the verifier keeps; a deadline's cut is about that one batch, so it tells
  nothing (0, 0)."""
  if kept_nodes >= sent_nodes or cut_for_worth:
    return {"sent_nodes": sent_nodes, "kept_nodes": min(kept_nodes, sent_nodes)}
  return {"sent_nodes": 0, "kept_nodes": 0}


@dataclasses.dataclass
class _SessionState:
  survival: list[float]
  rtt_s: float = 0.0
  draft_step_s: float = 0.0
  server_s: float = 0.0
  rounds: int = 0
  kept_cap: float | None = None  # EMA of the nodes the verifier would keep (None: no cut yet)


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
  reach_threshold: float = 0.3  # deepest depth reached with at least this probability
  smoothing: float = 0.2  # EMA weight of a new round
  prior_survival: float = 0.7  # before any round: a fair draft
  min_budget_fraction: float = 0.25  # of the configured budget, at a full queue
  itl_slo_s: float = 0.0  # 0: no SLO
  slack_for_full_shrink: float = 0.3  # SLO slack at which a full queue shrinks a budget fully

  def __post_init__(self):
    if not 0 < self.reach_threshold < 1 or not 0 < self.smoothing <= 1:
      raise ValueError("reach_threshold must be in (0, 1) and smoothing in (0, 1]")
    if not 0 < self.prior_survival < 1 or not 0 < self.min_budget_fraction <= 1:
      raise ValueError("prior_survival must be in (0, 1), min_budget_fraction in (0, 1]")
    if not 0 < self.slack_for_full_shrink <= 1:
      raise ValueError(
          f"slack_for_full_shrink must be in (0, 1], got {self.slack_for_full_shrink}")
    if self.itl_slo_s < 0:
      raise ValueError(f"itl_slo_s must be >= 0, got {self.itl_slo_s}")


class SpeculationController:
  """Per-session tree advice from acceptance by depth, RTT, draft speed and server load."""

  def __init__(self, caps: TreeParams, config: ControllerConfig = ControllerConfig()):
    self.caps = caps
    self.config = config
    self._sessions: dict[str, _SessionState] = {}

  def _state(self, session: str) -> _SessionState:
    if session not in self._sessions:
      self._sessions[session] = _SessionState(
          survival=[self.config.prior_survival] * self.caps.max_beam_len)
    return self._sessions[session]

  def forget(self, session: str) -> None:
    self._sessions.pop(session, None)

  def observe(self, session: str, round_: RoundObservation) -> None:
    """Updates a session's estimates with one verified round. Depth d (1-based) was *tried* if
    the tree reached it and the path reached d - 1; it *survived* if the path reached d."""
    state = self._state(session)
    alpha = self.config.smoothing
    for d in range(1, min(round_.tree_depth, len(state.survival)) + 1):
      if round_.accepted < d - 1:
        break  # the path stopped above: depth d was not tried
      survived = 1.0 if round_.accepted >= d else 0.0
      state.survival[d - 1] += alpha * (survived - state.survival[d - 1])
    if round_.sent_nodes > 0 and round_.kept_nodes < round_.sent_nodes:
      state.kept_cap = (float(round_.kept_nodes) if state.kept_cap is None else
                        state.kept_cap + alpha * (round_.kept_nodes - state.kept_cap))
    elif round_.sent_nodes > 0 and state.kept_cap is not None:
      # A whole tree says only that the verifier would have kept that many: probe upwards (half
      # as much again, smoothed: about 10 % a round), so a cap set under load lifts once cuts
      # stop, and is dropped when it no longer binds. (Unsmoothed jumps and +1 steps were
      # tried in the simulator's A100 model at 100 edges, three seeds: mean ITL 75-76 and
      # 73-75 ms against 69-73 ms for this.)
      probe = max(1.5 * round_.sent_nodes, round_.sent_nodes + 1.0)
      state.kept_cap += alpha * (probe - state.kept_cap)
      if state.kept_cap > self.caps.max_budget:
        state.kept_cap = None
    for name in ("rtt_s", "draft_step_s", "server_s"):
      value = getattr(round_, name)
      if value > 0:
        old = getattr(state, name)
        setattr(state, name, value if state.rounds == 0 or old == 0 else
                old + alpha * (value - old))
    state.rounds += 1

  def reach(self, session: str) -> list[float]:
    """P(the accepted path reaches depth d), d = 1 .. max depth."""
    probs, p = [], 1.0
    for q in self._state(session).survival:
      p *= q
      probs.append(p)
    return probs

  def expected_tokens(self, session: str, depth: int) -> float:
    """Expected tokens per round of a tree of this depth: the bonus plus the accepted path."""
    return 1.0 + sum(self.reach(session)[:depth])

  def advise(self, session: str, *, queue_fraction: float = 0.0,
             itl_slo_s: float | None = None) -> TreeLimits:
    """The next tree's limits. `queue_fraction`: the server's waiting work relative to one full
    batch (0 idle, >= 1 a full batch waiting); `itl_slo_s`: this session's SLO (default: the
    config's; 0 none)."""
    state = self._state(session)
    reach = self.reach(session)
    round_s = state.server_s + state.draft_step_s * self.caps.max_beam_len
    # A round trip that is large against the rest of a round makes each round dear: accept a
    # lower probability of reaching a depth (up to 4x lower) to send more per round.
    rtt_share = state.rtt_s / (state.rtt_s + round_s) if state.rtt_s + round_s > 0 else 0.0
    threshold = self.config.reach_threshold * (1.0 - 0.75 * rtt_share)
    depth = 1
    for d in range(1, len(reach) + 1):
      if reach[d - 1] >= threshold:
        depth = d
    slo = self.config.itl_slo_s if itl_slo_s is None else itl_slo_s
    pressure = min(max(queue_fraction, 0.0), 1.0)
    if slo > 0 and state.rounds > 0:
      depth = self._within_slo(session, depth, slo)
      slack = 1.0 - self.estimated_itl_s(session, depth) / slo
      pressure *= min(max(slack / self.config.slack_for_full_shrink, 0.0), 1.0)
    scale = 1.0 - (1.0 - self.config.min_budget_fraction) * pressure
    budget = max(depth, int(math.floor(self.caps.max_budget * scale)))
    if state.kept_cap is not None:
      # Do not draft what the verifier cuts: its batches keep a node only while the node is worth
      # its time there, which it knows (its verify-time estimate) and the edge does not.
      budget = min(budget, max(1, math.ceil(state.kept_cap)))
      depth = min(depth, budget)
    return TreeLimits(budget=budget, depth=depth).within(self.caps)

  def estimated_itl_s(self, session: str, depth: int) -> float:
    """A round's estimated time (RTT + the server's queue and forward + draft steps) over its
    expected tokens, for a tree of this depth."""
    state = self._state(session)
    round_s = state.rtt_s + state.server_s + state.draft_step_s * depth
    return round_s / self.expected_tokens(session, depth)

  def _within_slo(self, session: str, depth: int, slo_s: float) -> int:
    """The deepest depth <= `depth` whose estimated ITL meets the SLO. When none does, the depth
    with the least estimated time per token: a shallower tree only drafts less while every round
    still pays the RTT and the server's time, so depth 1 is the worst choice when those dominate."""
    for d in range(depth, 0, -1):
      if self.estimated_itl_s(session, d) <= slo_s:
        return d
    return min(range(1, self.caps.max_beam_len + 1),
               key=lambda d: (self.estimated_itl_s(session, d), -d))
