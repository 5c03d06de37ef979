"""SLO-aware verification scheduling: which pending verifies form the next batch, how much of each
tree they keep, and when that batch should start. The decision logic of the "slo" batching mode.

What this module owns: a session's measured acceptance (`AcceptanceStats`: by depth, and by rank
within a depth, which stands in for the nodes' draft scores), the value of each tree node
(`node_values`: the probability that the node is on the accepted path), a round's deadline from
its inter-token-latency SLO (`round_deadline`), and the two decisions, `plan_batch` (what runs)
and `start_time` (when). Pure: no threads, no gRPC, no JAX, no clock of its own (callers pass
`now`). The engine thread (`engine_worker.EngineWorker`) feeds it and applies its plans; the
forward-time estimate comes from a `verify_time.VerifyTimeModel`.

Why a tree may be cut to any prefix of its nodes
------------------------------------------------
Trees travel with every parent before its children, so any prefix of the node list is a tree.
Our drafter also sends nodes sorted by draft score, descending (`spec/draft.py`: each growth
step keeps the global top budget with one `lax.top_k`, whose output is the tree; a child always
scores below its parent, so score order is a topological order; `tree.wire_arrays` keeps that
order, and a re-rooted tree keeps it with a stable sort and then goes through the same top_k).
A prefix is thus the best-scored subtree of its size. And a cut costs no exactness: the target
samples at every kept node as it would have, so the accepted path of the cut tree is the longest
prefix of the full tree's accepted path whose nodes were kept (indices grow along a path), every
emitted token is still a target sample, and the edge finds that path in its own tree.

The value of a cut
------------------
With p_i the probability that node i is on the accepted path, a cut to k nodes is worth
sum(p_i, 0 < i < k) expected accepted tokens (the bonus comes either way). p_i is estimated
per session as a(d_i) * rho(d_i, r_i): a(d) = P(the accepted path reaches depth d), a product of
per-depth hazards counted from the session's rounds, and rho(d, r) = P(the path's depth-d node
is the r-th node of its depth, in tree order), the rank standing in for the draft score the
wire does not carry. Both start from a prior worth a few rounds. The verifier keeps every full
tree, so a round it cut still tells it whether the full path went one node deeper: the target's
bonus token at the last accepted node names the dropped child it would have accepted. Only
deeper than that is unknown (censored), and nothing is counted there.

The plan
--------
1. Overdue requests first: one that has waited `max_queue_s` is admitted, oldest first, whatever
   its deadline or value. This is the bound on waiting that no stream of more urgent or more
   valuable requests can push back (no starvation).
2. The rest by earliest deadline (EDF): a request is admitted, with its root alone, unless that
   would make an admitted request that can still meet its deadline miss it; a request that
   cannot make its own deadline any more is admitted too, it just does not bind the time. A
   *lost* round, whose budget its edge alone overspent, comes after every other: running it
   first cannot save it and would cost rounds that can still be saved (how EDF collapses
   under overload); rule 1 still bounds its wait. At most `max_batch_size`.
3. Fill by value: the time budget is the earliest deadline among admitted requests that can
   still meet theirs (less `margin_s`). Tree nodes are added in order of expected accepted tokens
   per added node (over each tree's upper concave hull of its cumulative value, so a cheap node
   that opens a valuable one is taken with it) while the estimated batch time stays within the
   budget. With no binding deadline and no backlog every tree is kept whole: the batch is
   bounded by count.
4. Under a backlog (a pending request left for a later batch), the server is the bottleneck, and
   a node costs everyone the forward time it adds. A segment of nodes is then kept only if the
   expected tokens it adds, per second of forward it adds, are at least the batch's expected
   tokens (each lane's bonus plus the kept values) per estimated second so far, on top of any
   deadline. Where the
   forward has a large fixed part (memory-bound: reading the weights) nearly every node passes;
   where it is all per-token cost (compute-bound: a big model at a large batch), trees shrink
   towards their roots, since a root is already one token per node. Why: in the simulator's
   Qwen3-14B / A100 model at 100 edges (compute-bound verifies, every round lost, so no deadline
   bound the batch) whole trees made the forward 28 ms at 5.4 nodes a lane; with this rule
   it is 20 ms at 3.5 (`launch.simulate --scale`, session 21).

When to start
-------------
Now when the batch is full, when something is overdue, or when no absent session is expected to
arrive before the latest start: the earliest of the start that keeps the pending trees whole
within the earliest deadline, the starvation bound, and now + the pending batch's estimated
forward; else at that latest start, or when the expected joiners should have come, whichever is
first. Waiting only pays when someone can join: `start_time` takes the absent sessions' expected
arrivals (the worker's estimate: last reply + the session's measured edge time). And only for a
joiner due within one forward: one due later finds the server free again if the batch runs now,
so waiting for it delays everyone for nothing. Without that cap (session 20) the batch waited for
joiners up to the deadline, so every round finished at its deadline and any error in it (fewer
tokens than expected, a late answer) put the ITL over the SLO: at 4 clients the queue per batch
was 29 ms against static batching's 17 at the same batch size (3.5), the mean ITL 33.9 against
23.8 ms (`launch.bench_goodput --clients=4,6 --itl_slo_ms=24`).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Hashable, Sequence

import numpy as np

from specedge_jax.serving.verify_time import BatchShape, VerifyTimeModel

# Acceptance-stat defaults: what a session is assumed to do before its rounds say otherwise.
PRIOR_HAZARD = 0.6  # P(the path goes one node deeper | it got here and the tree goes on)
PRIOR_RANK_DECAY = 0.5  # rho(d, r) proportional to decay ** r
PRIOR_ROUNDS = 4.0  # how many rounds the prior is worth


def depths_and_ranks(parents: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each node's depth (root 0) and its rank among the nodes of its depth, in tree order (the
  first node of a depth is rank 0). `parents[0] == -1`, parents precede children."""
  parents = np.asarray(parents)
  depth = np.zeros(parents.size, np.int64)
  rank = np.zeros(parents.size, np.int64)
  seen: dict[int, int] = {}
  for i in range(1, parents.size):
    depth[i] = depth[parents[i]] + 1
    rank[i] = seen.get(int(depth[i]), 0)
    seen[int(depth[i])] = rank[i] + 1
  return depth, rank


class AcceptanceStats:
  """One session's measured acceptance by depth and by rank within a depth (module docstring).

  Depths beyond `max_depth` share the last one's statistics; ranks from `ranks - 1` on share the
  last bucket, split over them geometrically.
  """

  def __init__(self, *, max_depth: int = 16, ranks: int = 8, prior_hazard: float = PRIOR_HAZARD,
               prior_rank_decay: float = PRIOR_RANK_DECAY, prior_rounds: float = PRIOR_ROUNDS):
    if max_depth < 1 or ranks < 1 or not 0 <= prior_hazard <= 1 or not 0 < prior_rank_decay < 1:
      raise ValueError("max_depth and ranks must be >= 1, prior_hazard in [0, 1] and "
                       "prior_rank_decay in (0, 1)")
    self.max_depth, self.ranks = max_depth, ranks
    # Index d = depth (0 unused). Pseudo-counts of the prior, then the rounds on top.
    self.at_risk = np.full(max_depth + 1, prior_rounds)
    self.reached = np.full(max_depth + 1, prior_rounds * prior_hazard)
    weights = prior_rank_decay ** np.arange(ranks)
    weights[-1] = prior_rank_decay ** (ranks - 1) / (1 - prior_rank_decay)  # the tail bucket
    self.rank_counts = np.tile(prior_rounds * weights / weights.sum(), (max_depth + 1, 1))
    self.rounds = 0

  def _d(self, depth: np.ndarray | int):
    return np.minimum(depth, self.max_depth)

  def by_depth(self, depth: int | None = None) -> np.ndarray:
    """a(d) for d = 1..depth (default max_depth): P(the accepted path reaches depth d)."""
    hazard = self.reached[1:] / self.at_risk[1:]
    depth = self.max_depth if depth is None else depth
    hazard = np.concatenate([hazard, np.full(max(depth - self.max_depth, 0), hazard[-1])])
    return np.cumprod(hazard[:depth])

  def node_values(self, parents: Sequence[int] | np.ndarray) -> np.ndarray:
    """p_i for every node of a tree (the root's 0): P(node i is on the accepted path)."""
    depth, rank = depths_and_ranks(parents)
    if depth.size <= 1:
      return np.zeros(depth.size)
    reach = np.concatenate([[1.0], self.by_depth(int(depth.max()))])
    rho = self.rank_counts / self.rank_counts.sum(axis=1, keepdims=True)
    bucket = np.minimum(rank, self.ranks - 1)
    share = rho[self._d(depth), bucket]
    # The tail bucket holds every rank >= ranks - 1: halve it per rank, so its nodes sum to it.
    tail = rank >= self.ranks - 1
    share = np.where(tail, share * 0.5 ** (rank - (self.ranks - 1) + 1), share)
    values = reach[depth] * share
    values[0] = 0.0
    return values

  def observe(self, tokens: Sequence[int] | np.ndarray, parents: Sequence[int] | np.ndarray,
              kept: int, accepted: Sequence[int], bonus: int) -> None:
    """Counts one round: the FULL tree (tokens, parents), the `kept` nodes that were verified,
    and the verifier's answer (accepted tokens below the root, bonus token)."""
    tokens, parents = np.asarray(tokens), np.asarray(parents)
    depth, rank = depths_and_ranks(parents)
    node = 0
    for token in accepted:
      children = np.flatnonzero((parents[:kept] == node) & (tokens[:kept] == token))
      if children.size != 1:
        return  # not a path of this tree: count nothing rather than something wrong
      node = int(children[0])
      self._count(depth[node], rank[node], reached=True)
    children = np.flatnonzero(parents == node)
    if children.size:  # the tree went on below the path's end: did the full path?
      deeper = children[(children >= kept) & (tokens[children] == bonus)]
      if deeper.size:  # a dropped child the full tree would have accepted; below it: unknown
        self._count(depth[deeper[0]], rank[deeper[0]], reached=True)
      else:
        self._count(depth[node] + 1, 0, reached=False)
    self.rounds += 1

  def _count(self, depth: int, rank: int, *, reached: bool) -> None:
    d = int(self._d(depth))
    self.at_risk[d] += 1
    if reached:
      self.reached[d] += 1
      self.rank_counts[d, min(int(rank), self.ranks - 1)] += 1


def round_deadline(arrival_s: float, *, itl_slo_s: float, expected_emitted: float,
                   edge_time_s: float, max_queue_s: float) -> float:
  """When the verifier must answer a round for its session to keep its ITL SLO.

  A round that emits m tokens may take m * SLO end to end; the edge's part of it (drafting and
  the network: the time from the verifier's last answer to this request) is not the verifier's
  to spend. A session without an SLO (0) gets the starvation bound as its deadline. A budget
  that the edge alone already overspends leaves the deadline at the arrival: the round is
  *lost* (`Candidate.lost`), so `start_time` waits for no one on its account, and `plan_batch`
  admits it behind every round that can still make its deadline."""
  if itl_slo_s <= 0:
    return arrival_s + max_queue_s
  return arrival_s + max(itl_slo_s * expected_emitted - edge_time_s, 0.0)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A pending verify as the scheduler sees it."""

  key: Hashable  # the caller's handle for it
  arrival_s: float
  deadline_s: float
  # p_i of the tree's nodes in wire order, the root's (0) first: len = tree nodes.
  node_values: tuple[float, ...]
  context_len: int  # committed prefix rows of its session

  @property
  def tree_nodes(self) -> int:
    return len(self.node_values)

  @property
  def lost(self) -> bool:
    """Its deadline passed as it arrived (`round_deadline`): no batch can make it."""
    return self.deadline_s <= self.arrival_s


@dataclasses.dataclass(frozen=True)
class Selection:
  key: Hashable
  keep_nodes: int  # a prefix of the tree, root included (1: the root alone)
  tree_nodes: int
  expected_accepted: float  # sum of the kept nodes' values
  overdue: bool  # admitted by the starvation bound
  # Cut because its next nodes were not worth the forward time they add (rule 4), not because
  # of a deadline: the speculation controller follows these cuts, a deadline's are per batch.
  cut_for_worth: bool = False


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  selections: tuple[Selection, ...]  # in admission order
  estimated_s: float  # the estimator's forward time of the batch as cut
  budget_s: float  # the time the earliest binding deadline leaves (inf: none binds)

  @property
  def truncated_nodes(self) -> int:
    return sum(s.tree_nodes - s.keep_nodes for s in self.selections)


def _shape(chosen: Sequence[Candidate], sizes: Sequence[int]) -> BatchShape:
  return BatchShape.of(list(sizes), [c.context_len for c in chosen])


def _hull_segments(values: Sequence[float]) -> list[tuple[int, float]]:
  """The upper concave hull of a tree's cumulative value over its prefix cuts, as (nodes
  added, value per node) segments from the root alone to the whole tree, densities falling."""
  cumulative = np.concatenate([[0.0], np.cumsum(values[1:])])  # value of keeping 1 + j nodes
  segments: list[tuple[int, float]] = []
  start = 0
  while start < len(cumulative) - 1:
    gains = (cumulative[start + 1:] - cumulative[start]) / np.arange(1, len(cumulative) - start)
    best = int(np.flatnonzero(gains >= gains.max() - 1e-15)[-1])  # ties: the longest run
    segments.append((best + 1, float(gains[best])))
    start += best + 1
  return segments


def _fill_by_value(chosen: Sequence[Candidate], estimator: VerifyTimeModel, *, budget_s: float,
                   efficient: bool) -> tuple[list[int], list[bool]]:
  """Each tree's kept prefix, from the roots up: hull segments in order of value per node, each
  taken whole, else as much of it as fits `budget_s` (inf: no time bound). With `efficient`, a
  segment is taken only if it brings at least the batch's current expected tokens per estimated
  second for the time it adds (tokens: each lane's bonus plus the kept nodes' values). Also
  returns which trees that test stopped (`Selection.cut_for_worth`)."""
  sizes = [1] * len(chosen)
  worth_cut = [False] * len(chosen)
  segments = [_hull_segments(c.node_values) for c in chosen]
  next_segment = [0] * len(chosen)
  tokens = float(len(chosen))  # the bonus tokens: every lane emits one
  seconds = estimator.predict_s(_shape(chosen, sizes))
  heap = [(-segments[j][0][1], j) for j in range(len(chosen)) if segments[j]]
  heapq.heapify(heap)
  while heap:
    _, j = heapq.heappop(heap)
    length, density = segments[j][next_segment[j]]
    fits, fits_seconds = 0, seconds
    for extra in range(length, 0, -1):  # the whole segment, else as much of it as fits
      trial = list(sizes)
      trial[j] += extra
      trial_seconds = estimator.predict_s(_shape(chosen, trial))
      if trial_seconds > budget_s:
        continue
      # Value per second at least the batch's rate (seconds > 0 or the estimate is free).
      if efficient and density * extra * seconds < tokens * (trial_seconds - seconds):
        worth_cut[j] = True
        break  # densities only fall from here and the rate only rises: this tree is done
      fits, fits_seconds = extra, trial_seconds
      break
    sizes[j] += fits
    tokens += density * fits
    seconds = fits_seconds
    next_segment[j] += 1
    if fits == length and next_segment[j] < len(segments[j]):
      heapq.heappush(heap, (-segments[j][next_segment[j]][1], j))
  return sizes, worth_cut


def plan_batch(now: float, candidates: Sequence[Candidate], estimator: VerifyTimeModel, *,
               max_batch_size: int, max_queue_s: float, margin_s: float = 0.0) -> BatchPlan:
  """The next batch: who is in it and how many nodes of each tree it keeps (module docstring).
  Deterministic: ties go to the earlier arrival, then to the caller's order."""
  if max_batch_size < 1:
    raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
  order = range(len(candidates))
  overdue = sorted((i for i in order if now - candidates[i].arrival_s >= max_queue_s),
                   key=lambda i: (candidates[i].arrival_s, i))
  is_overdue = set(overdue)
  # EDF, lost rounds last: running one first cannot save it, and would spend the batch that
  # rounds which can still make their deadlines need (EDF's collapse under overload).
  rest = sorted((i for i in order if i not in is_overdue),
                key=lambda i: (candidates[i].lost, candidates[i].deadline_s,
                               candidates[i].arrival_s, i))
  admitted = overdue[:max_batch_size]

  def binding(indices: Sequence[int]) -> list[int]:
    """The admitted requests that still meet their deadline with every tree at its root."""
    finish = now + estimator.predict_s(_shape([candidates[i] for i in indices],
                                              [1] * len(indices))) + margin_s
    return [i for i in indices if finish <= candidates[i].deadline_s]

  for i in rest:
    if len(admitted) >= max_batch_size:
      break
    before = binding(admitted)
    after = set(binding(admitted + [i]))
    if all(j in after for j in before):
      admitted.append(i)

  chosen = [candidates[i] for i in admitted]
  hopeful = binding(admitted)
  budget = (min(candidates[i].deadline_s for i in hopeful) - now - margin_s if hopeful
            else math.inf)
  # Someone waits for a later batch: the server is the bottleneck, so a node must pay for the
  # forward time it adds to everyone (rule 4 of the module docstring).
  backlog = len(admitted) < len(candidates)
  if math.isinf(budget) and not backlog:
    sizes, worth_cut = [c.tree_nodes for c in chosen], [False] * len(chosen)
  else:
    sizes, worth_cut = _fill_by_value(chosen, estimator, budget_s=budget, efficient=backlog)
  selections = tuple(
      Selection(key=c.key, keep_nodes=size, tree_nodes=c.tree_nodes,
                expected_accepted=float(sum(c.node_values[1:size])),
                overdue=i in is_overdue, cut_for_worth=cut and size < c.tree_nodes)
      for i, c, size, cut in zip(admitted, chosen, sizes, worth_cut))
  return BatchPlan(selections=selections,
                   estimated_s=estimator.predict_s(_shape(chosen, sizes)) if chosen else 0.0,
                   budget_s=budget)


def start_time(now: float, candidates: Sequence[Candidate], estimator: VerifyTimeModel, *,
               max_batch_size: int, max_queue_s: float, margin_s: float = 0.0,
               expected_arrivals: Sequence[float] = ()) -> float:
  """When the pending batch should run (<= now: at once; inf: nothing pending). See the module
  docstring; `expected_arrivals` are the absent sessions' expected request times."""
  if not candidates:
    return math.inf
  if len(candidates) >= max_batch_size:
    return now
  oldest = min(c.arrival_s for c in candidates)
  whole = _shape(candidates, [c.tree_nodes for c in candidates])
  forward_s = estimator.predict_s(whole)
  latest = min(min(c.deadline_s for c in candidates) - margin_s - forward_s,
               oldest + max_queue_s, now + forward_s)
  joiners = [t for t in expected_arrivals if t <= latest]
  if latest <= now or not joiners:
    return now
  return min(latest, max(joiners) + margin_s)
