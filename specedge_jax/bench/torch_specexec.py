"""A plain PyTorch SpecExec speculative decoder: the baseline a researcher would write.

Same algorithm as our JAX engine (`engine.generate` with a draft, proactive drafting off), on HF
transformers' PyTorch models loaded from the same HF folders, batch size 1, greedy:

  Draft (grow a SpecExec tree): the tree starts as its root, the last emitted token. Each step
  forwards the `max_n_beams` best not-yet-forwarded nodes in one draft call, takes each one's
  top `max_branch_width` next tokens as children scored `parent_score + log(0.9) + log p`, and
  keeps the global top `max_budget` nodes (root excluded). At most `max_beam_len` steps; growth
  stops early when no new child makes the budget. Nodes are forwarded over the draft's
  `DynamicCache`: the committed sequence is the cache's first rows, every forwarded node
  appends one row, and the node sees the committed rows plus its ancestors' rows (itself
  included) through a 4D additive attention mask `[1, 1, T, S]`; RoPE positions are
  `committed + depth`, passed as `position_ids`.

  Verify (target, one forward): all tree nodes over the target's `DynamicCache` (the committed
  prefix), each seeing the prefix plus its ancestors, at positions `prefix + depth`. The
  target's argmax at every node gives the walk: from the root, move to the child whose token
  equals the target's argmax at the current node, while one exists. The argmax at the last
  accepted node is the bonus token. Emitted: accepted tokens + bonus, cut at EOS and at
  `max_new_tokens`, exactly as `engine.TargetEngine` does.

  Caches after a round: both keep the committed rows plus the rows of the accepted path (an
  `index_select` along the sequence axis of every layer's keys and values; the rest of the tree
  is dropped). The draft may not have forwarded the last accepted node (an unexpanded leaf); it
  is forwarded then, as one causal token. KV caches are kept across rounds: nothing is
  recomputed from the start.

The tree is host-side Python lists (at most `max_budget + 1` nodes and `n_beams *
branch_width` candidates per step); the models run under `torch.inference_mode`. Ties in
scores are broken by sort stability, so tree shapes may differ from the JAX engine's on exact
ties; the emitted tokens cannot (each one is the target's argmax).

PyTorch is an optional extra (`pip install -e '.[torch]'`): it is imported when a function
first needs it, so this module imports without it. Shapes: see specedge_jax/shapes.py.

This module owns the PyTorch baseline. It never touches the JAX engine, its caches or its
models; `TreeParams` is imported only so both sides take the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import TYPE_CHECKING, Sequence

from specedge_jax.engine import TreeParams

if TYPE_CHECKING:
  import torch

LEVEL_DECAY = math.log(0.9)


def _torch():
  """The torch module, imported on first use; ImportError naming the extra without it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top (an optional extra)
  except ImportError as e:
    raise ImportError("specedge_jax.bench.torch_specexec needs PyTorch, an optional extra: "
                      "pip install -e '.[torch]'") from e
  return torch


def _inference_mode(method):
  """`@torch.inference_mode()` with torch imported at call time, not at import time."""

  @functools.wraps(method)
  def wrapper(*args, **kwargs):
    with _torch().inference_mode():
      return method(*args, **kwargs)

  return wrapper


@dataclasses.dataclass
class ReferenceOutput:
  """One prompt's generation."""

  tokens: list[int]  # generated tokens, the first (prefill) token included
  emitted_per_round: list[int]  # tokens emitted per verification round (bonus included)
  draft_forwards: int  # draft model calls (prefill included)
  target_forwards: int  # target model calls (prefill included)
  wall_s: float

  @property
  def mean_accepted(self) -> float:
    counts = self.emitted_per_round
    return sum(counts) / len(counts) if counts else 0.0


@dataclasses.dataclass
class _Tree:
  """A SpecExec tree in topological order (parents precede children); node 0 is the root."""

  tokens: list[int]
  parents: list[int]
  depth: list[int]
  score: list[float]
  cache_row: list[int]  # draft cache row of a forwarded node, -1 if not forwarded

  def __len__(self) -> int:
    return len(self.tokens)

  def ancestors(self, node: int) -> list[int]:
    """`node` and its ancestors."""
    chain = [node]
    while self.parents[chain[-1]] >= 0:
      chain.append(self.parents[chain[-1]])
    return chain


def _additive_mask(visible: torch.Tensor) -> torch.Tensor:
  """[T, S] bool -> [1, 1, T, S] float32: 0 where visible, float32 min where hidden."""
  torch = _torch()
  mask = torch.zeros(visible.shape, dtype=torch.float32)
  mask.masked_fill_(~visible, torch.finfo(torch.float32).min)
  return mask[None, None]


def _keep_rows(cache, rows: torch.Tensor) -> None:
  """Keeps only sequence rows `rows` (in that order) of every layer of a DynamicCache."""
  for layer in cache.layers:
    layer.keys = layer.keys.index_select(2, rows)
    layer.values = layer.values.index_select(2, rows)


class TorchSpecExec:
  """SpecExec greedy speculative decoding with HF PyTorch target and draft, batch size 1."""

  def __init__(self, target, draft, tree: TreeParams = TreeParams(),
               eos_token_ids: Sequence[int] = ()):
    """`target`, `draft`: HF `*ForCausalLM` models (eval mode) with the same vocabulary."""
    if target.config.vocab_size != draft.config.vocab_size:
      raise ValueError(f"target vocabulary ({target.config.vocab_size}) and draft vocabulary "
                       f"({draft.config.vocab_size}) differ")
    if tree.max_branch_width > draft.config.vocab_size:
      raise ValueError(f"max_branch_width {tree.max_branch_width} exceeds the vocabulary size "
                       f"{draft.config.vocab_size}")
    self.target, self.draft, self.tree_params = target, draft, tree
    self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)

  def _forward(self, model, cache, tokens: Sequence[int], positions: Sequence[int],
               visible: torch.Tensor | None) -> torch.Tensor:
    """Logits [T, V] of `tokens` appended to `cache`; a causal view when `visible` is None."""
    torch = _torch()
    kwargs = dict(input_ids=torch.tensor([list(tokens)]),
                  position_ids=torch.tensor([list(positions)]),
                  past_key_values=cache, use_cache=True)
    if visible is not None:
      kwargs["attention_mask"] = _additive_mask(visible)
    return model(**kwargs).logits[0].float()

  def _grow(self, cache, root: int, committed: int) -> tuple[_Tree, int]:
    """Grows a tree from `root` on the draft; the draft cache holds `committed` rows."""
    torch = _torch()
    params = self.tree_params
    tree = _Tree(tokens=[root], parents=[-1], depth=[0], score=[0.0], cache_row=[-1])
    forwards = 0
    for _ in range(params.max_beam_len):
      unexpanded = [i for i in range(len(tree)) if tree.cache_row[i] < 0]
      if not unexpanded:
        break
      beams = sorted(unexpanded, key=lambda i: -tree.score[i])[:params.max_n_beams]
      rows = cache.get_seq_length()
      # A beam sees the committed rows, its ancestors' rows and its own (new) row.
      visible = torch.zeros(len(beams), rows + len(beams), dtype=torch.bool)
      visible[:, :committed] = True
      for j, beam in enumerate(beams):
        for node in tree.ancestors(beam)[1:]:
          visible[j, tree.cache_row[node]] = True
        visible[j, rows + j] = True
      logits = self._forward(self.draft, cache, [tree.tokens[b] for b in beams],
                             [committed + tree.depth[b] for b in beams], visible)
      forwards += 1
      for j, beam in enumerate(beams):
        tree.cache_row[beam] = rows + j
      top_logp, top_tokens = torch.log_softmax(logits, dim=-1).topk(params.max_branch_width)
      top_logp, top_tokens = top_logp.tolist(), top_tokens.tolist()
      # Pool = the tree's non-root nodes + every new child; keep the global top budget. A child
      # scores strictly below its parent, so the kept set is closed under ancestors.
      pool = [(tree.score[i], "node", i) for i in range(1, len(tree))]
      for j, beam in enumerate(beams):
        for logp, token in zip(top_logp[j], top_tokens[j]):
          pool.append((tree.score[beam] + LEVEL_DECAY + logp, "child", (beam, token)))
      kept = sorted(pool, key=lambda entry: -entry[0])[:params.max_budget]
      if not any(kind == "child" for _, kind, _ in kept):
        break  # no new child made the budget: the tree cannot change any more
      tree = self._rebuild(tree, kept)
    return tree, forwards

  @staticmethod
  def _rebuild(tree: _Tree, kept) -> _Tree:
    """The tree holding the root plus `kept` (old nodes keep their order, children follow)."""
    old_kept = sorted([0] + [i for _, kind, i in kept if kind == "node"])
    new_index = {old: new for new, old in enumerate(old_kept)}
    out = _Tree(tokens=[tree.tokens[i] for i in old_kept],
                parents=[new_index[tree.parents[i]] if i else -1 for i in old_kept],
                depth=[tree.depth[i] for i in old_kept], score=[tree.score[i] for i in old_kept],
                cache_row=[tree.cache_row[i] for i in old_kept])
    for score, kind, item in kept:
      if kind == "child":
        parent, token = item
        out.tokens.append(token)
        out.parents.append(new_index[parent])
        out.depth.append(tree.depth[parent] + 1)
        out.score.append(score)
        out.cache_row.append(-1)
    return out

  def _verify(self, cache, tree: _Tree, prefix_len: int) -> tuple[list[int], int]:
    """One target forward over the tree; returns (accepted path node indices, bonus)."""
    torch = _torch()
    n = len(tree)
    visible = torch.zeros(n, prefix_len + n, dtype=torch.bool)
    visible[:, :prefix_len] = True
    for i in range(n):
      for node in tree.ancestors(i):
        visible[i, prefix_len + node] = True
    logits = self._forward(self.target, cache, tree.tokens,
                           [prefix_len + d for d in tree.depth], visible)
    target_tokens = logits.argmax(dim=-1).tolist()
    children: dict[int, list[int]] = {}
    for i in range(1, n):
      children.setdefault(tree.parents[i], []).append(i)
    path = [0]
    while True:
      match = [c for c in children.get(path[-1], []) if tree.tokens[c] == target_tokens[path[-1]]]
      if not match:
        break
      path.append(match[0])
    return path, target_tokens[path[-1]]

  @_inference_mode
  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> ReferenceOutput:
    """Greedy speculative generation for one prompt; equals the target's greedy tokens."""
    torch = _torch()
    from transformers import DynamicCache

    if len(prompt_ids) == 0:
      raise ValueError("prompt must be a non-empty list of token ids")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    start = time.perf_counter()
    target_cache = DynamicCache(config=self.target.config)
    draft_cache = DynamicCache(config=self.draft.config)
    positions = range(len(prompt_ids))
    first = int(self._forward(self.target, target_cache, prompt_ids, positions, None)[-1].argmax())
    self._forward(self.draft, draft_cache, prompt_ids, positions, None)
    draft_forwards, target_forwards = 1, 1
    # Both caches hold the committed sequence minus the root (the last emitted token).
    committed = len(prompt_ids)
    output, emitted_per_round = [first], []
    root = first
    finished = first in self.eos_token_ids or max_new_tokens == 1
    while not finished:
      tree, forwards = self._grow(draft_cache, root, committed)
      draft_forwards += forwards
      path, bonus = self._verify(target_cache, tree, committed)
      target_forwards += 1
      # Keep the committed rows plus the accepted path's rows; drop the rest of the tree.
      path_rows = torch.tensor(path) + committed
      _keep_rows(target_cache, torch.cat([torch.arange(committed), path_rows]))
      draft_rows = [tree.cache_row[i] for i in path if tree.cache_row[i] >= 0]
      _keep_rows(draft_cache, torch.cat([torch.arange(committed), torch.tensor(draft_rows,
                                                                               dtype=torch.long)]))
      if len(draft_rows) < len(path):  # the last accepted node was a leaf never forwarded
        self._forward(self.draft, draft_cache, [tree.tokens[path[-1]]],
                      [committed + len(path) - 1], None)
        draft_forwards += 1
      committed += len(path)
      emitted = [tree.tokens[i] for i in path[1:]] + [bonus]
      emitted_per_round.append(len(emitted))
      for i, token in enumerate(emitted):
        if token in self.eos_token_ids:
          emitted, finished = emitted[:i + 1], True
          break
      remaining = max_new_tokens - len(output)
      if len(emitted) >= remaining:
        emitted, finished = emitted[:remaining], True
      output.extend(emitted)
      root = bonus
    return ReferenceOutput(tokens=output, emitted_per_round=emitted_per_round,
                           draft_forwards=draft_forwards, target_forwards=target_forwards,
                           wall_s=time.perf_counter() - start)
