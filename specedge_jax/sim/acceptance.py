"""How many tree tokens a simulated round accepts, for the configured tree and for smaller or cut
ones.

What this module owns: the simulator's trees (`TreeFamily`: a score-sorted canonical tree for
each (budget, depth) within the configured caps, so that a smaller tree, and any cut of one, is a
prefix, as with the real drafter's trees, see `serving/slo_scheduler.py`), the accepted path of a
round (`PathModel`), and the measured inputs it is fitted to: acceptance by depth from a sweep's
report.json (`hazards_from_report`) or from its event logs, and the per-request traces of a run
(`read_traces`: prompt length, output length and each round's accepted depth) for replay. Pure:
numpy and json.

The model
---------
A node's children are ranked by draft score; child rank j of a node has draft probability
pi_j ~ decay^j over the branch width (decay 0.5 by default: the prior `slo_scheduler` itself
assumes for ranks). A tree of budget b and depth D is the best-scored b nodes with depth <= D
(scores are sums of log pi along the path; a node expands only if it is among the best `n_beams`
of its depth, as the drafter's beams do). Its nodes are in score order, parents first.

The target's path: from the root, at depth d the target's token is among the node's draft
children with probability alpha_d, as rank j with probability pi_j; the path goes on iff that child
is in the tree. alpha_d is fitted so that the configured (reference) tree accepts exactly the
measured acceptance by depth (the hazard h_d = P(reach d | reached d - 1), `measure/metrics.py`):
alpha_d = h_d / c_d, with c_d the in-tree share of the children's probability along the path on
that tree (`_coverage`). Smaller trees (the speculation controller's limits) and cut trees (the
SLO scheduler's truncation) then accept less because they hold fewer of the path's candidates,
by the same rank model. That rank model is an assumption: the traces record accepted depths,
not the ranks of accepted nodes.

Replay (`PathModel.sample(..., depth=d)`): a recorded round's accepted depth is forced on the
full tree (the path's nodes drawn among the in-tree children by pi), so the cut of that round
keeps the prefix of it below the cut.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import heapq
import json
import os
from typing import Mapping, Sequence

import numpy as np

from specedge_jax.api import TreeParams


@dataclasses.dataclass(frozen=True)
class SimTree:
  """A tree as the simulator sends it: nodes in score order, the root first."""

  parents: np.ndarray  # [N] int, parents[0] = -1
  depths: np.ndarray  # [N] int, root 0
  children: Mapping[tuple[int, int], int]  # (parent node, child rank) -> node
  keys: tuple[tuple[int, ...], ...]  # each node's path of child ranks from the root

  @property
  def size(self) -> int:
    return int(self.parents.size)

  @property
  def max_depth(self) -> int:
    return int(self.depths.max()) if self.depths.size else 0

  @property
  def tokens(self) -> np.ndarray:
    """Synthetic token ids, distinct per node (siblings must differ): the node's index."""
    return np.arange(self.size)


class TreeFamily:
  """The canonical trees within the configured caps (module docstring)."""

  def __init__(self, caps: TreeParams, decay: float = 0.5):
    if not 0 < decay < 1:
      raise ValueError(f"decay must be in (0, 1), got {decay}")
    self.caps, self.decay = caps, decay
    weights = decay ** np.arange(caps.max_branch_width)
    self.child_probs = weights / weights.sum()  # pi_j
    self._order = self._best_first()
    self._trees: dict[tuple[int, int], SimTree] = {}

  def _best_first(self) -> list[tuple[int, ...]]:
    """Every node of the depth-capped, width-capped tree, best score first, as rank paths."""
    caps, log_pi = self.caps, np.log(self.child_probs)
    by_depth = collections.Counter()  # nodes taken per depth, for the beam rule
    order: list[tuple[int, ...]] = [()]
    heap = [(-log_pi[j], 0, (j,)) for j in range(caps.max_branch_width)]
    counter = len(heap)
    # Far more than any budget needs: the caps' full tree is at most this large.
    limit = caps.max_budget * caps.max_beam_len + 1
    while heap and len(order) < limit + 1:
      neg, _, key = heapq.heappop(heap)
      order.append(key)
      depth = len(key)
      rank_in_depth = by_depth[depth]
      by_depth[depth] += 1
      if depth < caps.max_beam_len and rank_in_depth < caps.max_n_beams:
        for j in range(caps.max_branch_width):
          counter += 1
          heapq.heappush(heap, (neg - log_pi[j], counter, key + (j,)))
    return order

  def tree(self, budget: int | None = None, depth: int | None = None) -> SimTree:
    """The best `budget` nodes below the root with depth <= `depth` (defaults: the caps)."""
    budget = min(budget or self.caps.max_budget, self.caps.max_budget)
    depth = min(depth or self.caps.max_beam_len, self.caps.max_beam_len)
    cached = self._trees.get((budget, depth))
    if cached is not None:
      return cached
    keys = [()] + [k for k in self._order[1:] if len(k) <= depth][:budget]
    index = {key: i for i, key in enumerate(keys)}
    parents = np.array([-1] + [index[k[:-1]] for k in keys[1:]], np.int64)
    depths = np.array([len(k) for k in keys], np.int64)
    children = {(index[k[:-1]], k[-1]): i for i, k in enumerate(keys) if k}
    tree = SimTree(parents=parents, depths=depths, children=children, keys=tuple(keys))
    self._trees[(budget, depth)] = tree
    return tree


def _coverage(tree: SimTree, child_probs: np.ndarray) -> list[float]:
  """c_d, d = 1..max depth: given the path reached depth d - 1 and the target's token is among
  the node's draft children, the probability that the chosen child is in the tree (with the
  path's node at d - 1 distributed as the model makes it)."""
  at = {0: 1.0}  # path node at the current depth -> probability, given the path got there
  coverage = []
  for _ in range(tree.max_depth):
    nxt: dict[int, float] = {}
    for node, p in at.items():
      for j, q in enumerate(child_probs):
        child = tree.children.get((node, j))
        if child is not None:
          nxt[child] = nxt.get(child, 0.0) + p * q
    total = sum(nxt.values())
    coverage.append(total)
    if total <= 0:
      break
    at = {k: v / total for k, v in nxt.items()}
  return coverage


class PathModel:
  """The target's accepted path on a `TreeFamily` tree, fitted to measured hazards (module
  docstring). `hazards[d - 1]` = P(the path reaches depth d | it reached d - 1) on the family's
  full tree."""

  def __init__(self, family: TreeFamily, hazards: Sequence[float]):
    self.family = family
    self.hazards = tuple(float(h) for h in hazards)
    if not self.hazards or any(not 0 <= h <= 1 for h in self.hazards):
      raise ValueError(f"hazards must be probabilities, got {hazards}")
    reference = family.tree()
    coverage = _coverage(reference, family.child_probs)
    self.agreement = []  # alpha_d
    self.clipped = []  # depths whose measured hazard the rank model cannot reach (alpha > 1)
    for d in range(1, family.caps.max_beam_len + 1):
      h = self.hazards[min(d, len(self.hazards)) - 1]
      c = coverage[d - 1] if d - 1 < len(coverage) else 0.0
      alpha = h / c if c > 0 else 0.0
      if alpha > 1.0:
        self.clipped.append(d)
        alpha = 1.0
      self.agreement.append(alpha)
    self._cum = np.cumsum(family.child_probs)

  def expected_accepted(self, tree: SimTree) -> float:
    """E[accepted depth] on `tree` (exact, by the same recursion as `_coverage`)."""
    coverage = _coverage(tree, self.family.child_probs)
    reach, total = 1.0, 0.0
    for d, c in enumerate(coverage, start=1):
      reach *= self.agreement[d - 1] * c
      total += reach
    return total

  def sample(self, rng: np.random.Generator, tree: SimTree,
             depth: int | None = None) -> list[int]:
    """The accepted path's nodes (below the root, in order). With `depth`, a recorded round's
    depth is forced (capped at the tree's), the nodes drawn among in-tree children."""
    path, node = [], 0
    limit = tree.max_depth if depth is None else min(depth, tree.max_depth)
    for d in range(1, limit + 1):
      if depth is None:
        if rng.random() >= self.agreement[d - 1]:
          break
        j = int(np.searchsorted(self._cum, rng.random() * self._cum[-1], side="right"))
        child = tree.children.get((node, min(j, len(self._cum) - 1)))
        if child is None:
          break
      else:
        options = [(tree.children[(node, j)], q) for j, q in enumerate(self.family.child_probs)
                   if (node, j) in tree.children]
        if not options:
          break
        weights = np.array([q for _, q in options])
        child = options[int(rng.choice(len(options), p=weights / weights.sum()))][0]
      path.append(child)
      node = child
    return path


def accepted_within(path: Sequence[int], keep_nodes: int) -> list[int]:
  """The accepted path of a tree cut to its first `keep_nodes` nodes: the longest prefix of the
  full tree's path whose nodes were kept (indices grow along a path)."""
  kept = []
  for node in path:
    if node >= keep_nodes:
      break
    kept.append(node)
  return kept


# ----------------------------------------------------------------------------------------------
# Measured inputs


def hazards_from_histogram(histogram: Mapping[int, int]) -> list[float]:
  """h_d = #(depth >= d) / #(depth >= d - 1), as `metrics.request_metrics` defines it."""
  counts = {int(k): int(v) for k, v in histogram.items()}
  deepest = max(counts)
  hazards = []
  for d in range(1, deepest + 1):
    at_least = sum(v for k, v in counts.items() if k >= d)
    before = sum(v for k, v in counts.items() if k >= d - 1)
    hazards.append(at_least / before if before else 0.0)
  return hazards


def hazards_from_report(path: str, run: str | None = None) -> list[float]:
  """Acceptance by depth of a run of a sweep's report.json (default: its first SpecEdge run)."""
  with open(path) as f:
    report = json.load(f)
  runs = report["runs"]
  name = run or next(n for n, r in runs.items() if r["system"] == "specedge")
  by_depth = runs[name]["summary"]["requests"]["acceptance_by_depth"]
  return [float(by_depth[str(d)]) for d in range(1, len(by_depth) + 1)]


@dataclasses.dataclass(frozen=True)
class RequestTrace:
  """One request of a real run: what the simulator replays of it."""

  request_id: str
  client: str  # the drafter that served it
  prompt_tokens: int
  output_tokens: int  # generated, the first token included
  accepted_depths: tuple[int, ...]  # per verify round, in order
  round_tokens: tuple[int, ...]  # tokens emitted per verify round (bonus, EOS and length caps)


def read_traces(folder: str, pattern: str = "drafter*.jsonl") -> list[RequestTrace]:
  """The requests of a run folder's edge event logs (`request_start` / `request_step` /
  `request_end`), in the order they started on each drafter."""
  starts: dict[str, dict] = {}
  steps: dict[str, list[dict]] = collections.defaultdict(list)
  ends: dict[str, dict] = {}
  order: list[str] = []
  paths = sorted(glob.glob(os.path.join(folder, pattern)))
  if not paths:
    raise ValueError(f"no event logs {pattern} in {folder}")
  for path in paths:
    with open(path) as f:
      for line in f:
        event = json.loads(line)
        kind = event.get("kind")
        if kind == "request_start":
          starts[event["request_id"]] = event
          order.append(event["request_id"])
        elif kind == "request_step":
          steps[event["request_id"]].append(event)
        elif kind == "request_end":
          ends[event["request_id"]] = event
  traces = []
  for request_id in order:
    rounds = sorted((s for s in steps[request_id] if s.get("accepted_depth") is not None),
                    key=lambda s: s["t"])
    traces.append(RequestTrace(
        request_id=request_id, client=str(starts[request_id].get("client_id", "")),
        prompt_tokens=int(starts[request_id].get("prompt_tokens") or 0),
        output_tokens=int(ends[request_id]["n_generated"]) if request_id in ends else
        sum(int(s["n_tokens"]) for s in steps[request_id]),
        accepted_depths=tuple(int(s["accepted_depth"]) for s in rounds),
        round_tokens=tuple(int(s["n_tokens"]) for s in rounds)))
  return traces


def expected_tokens_per_round(hazards: Sequence[float]) -> float:
  """1 (the bonus) + sum_d prod_{k <= d} h_k: tokens a full-tree round emits on average."""
  return 1.0 + float(np.sum(np.cumprod(hazards)))
