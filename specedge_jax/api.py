"""The engine contract: what the serving layer may call, and the types that cross it.

Serving (the gRPC verifier, the edge drafter, the server-only baselines) codes against the two
Protocols here, never against a concrete engine. `specedge_jax.engine` implements them on JAX;
`specedge_jax.testing.fakes` implements them with outputs that can be worked out by hand. A type
checker holds both to the contract (`tests/test_contract.py`).

What this module owns:
  * the request parameters a user or an edge chooses: `SamplingParams`, `TreeParams`,
    `ProactiveParams`;
  * the wire types: `DraftTree` (edge -> server) and `VerifyResult` (server -> edge), and the one
    validation of a wire tree (`validate_tree`) and of a session's cache room
    (`check_cache_room`), shared by the engines and the gRPC servicer;
  * the engine errors (`EngineError`, `SlotsExhausted`); bad arguments are `ValueError`s whose
    message names what is wrong;
  * `TargetEngineProtocol` (the verifier's engine) and `DraftEngineProtocol` (the edge's).

It imports no JAX (numpy only), so the servicer and every client can load it cheaply: a test pins
that in a fresh interpreter. Neither protocol is thread-safe: exactly one thread may call an
engine, and the serving layer gives each engine one owner thread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

# ------------------------------------------------------------------------------------------------
# Request parameters


# float32-representable, so the value a client sends as a proto float passes too.
MIN_TEMPERATURE = float(np.float32(1e-4))
MIN_TOP_P = float(np.finfo(np.float32).tiny)  # the smallest normal float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the target draws tokens. Temperature 0 is greedy; top_k 0 and top_p 1 are off."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
    # Degenerate values are refused rather than sampled: below MIN_TEMPERATURE, logits divided
    # by the temperature can overflow float32 (and NaNs pick an arbitrary token), and a top_p
    # below float32's smallest normal rounds to 0 or keeps no token at all.
    if 0.0 < self.temperature < MIN_TEMPERATURE:
      raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got "
                       f"{self.temperature}")
    if not MIN_TOP_P <= self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], at least {MIN_TOP_P:.3g}, got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingParams()

PROACTIVE_MODES = ("disabled", "excluded", "included")


def _check_positive(owner: str, params) -> None:
  for name in ("max_n_beams", "max_beam_len", "max_branch_width", "max_budget"):
    if getattr(params, name) < 1:
      raise ValueError(f"{owner}{name} must be >= 1, got {getattr(params, name)}")


@dataclasses.dataclass(frozen=True)
class TreeParams:
  """SpecExec tree shape. Defaults are the reference's."""

  max_n_beams: int = 32  # nodes forwarded per step
  max_beam_len: int = 4  # steps (depth)
  max_branch_width: int = 16  # children taken per forwarded node
  max_budget: int = 32  # nodes kept, root excluded

  def __post_init__(self):
    _check_positive("", self)


@dataclasses.dataclass(frozen=True)
class TreeLimits:
  """A per-round cap on a tree, within its `TreeParams` (the speculation controller's advice):
  at most `budget` nodes below the root and `depth` growth steps. Runtime values: no recompile."""

  budget: int
  depth: int

  def __post_init__(self):
    if self.budget < 1 or self.depth < 1:
      raise ValueError(f"tree limits must be >= 1, got budget {self.budget}, depth {self.depth}")

  def within(self, params: TreeParams) -> "TreeLimits":
    """These limits clipped to the configured caps (edges follow advice only within them)."""
    return TreeLimits(budget=min(self.budget, params.max_budget),
                      depth=min(self.depth, params.max_beam_len))


@dataclasses.dataclass(frozen=True)
class ProactiveParams:
  """Proactive drafting: grow a small tree from the most likely (leaf, bonus) while waiting."""

  mode: str = "disabled"  # 'disabled' | 'excluded' | 'included'
  max_n_beams: int = 8
  max_beam_len: int = 2
  # As wide as the main tree: a hit's re-rooted root keeps the children it got here (a node
  # is expanded once), so a narrower proactive tree would narrow the next tree's first level.
  max_branch_width: int = 16
  max_budget: int = 16

  def __post_init__(self):
    if self.mode not in PROACTIVE_MODES:
      raise ValueError(f"proactive mode must be one of {PROACTIVE_MODES}, got {self.mode!r}")
    _check_positive("proactive ", self)

  @property
  def enabled(self) -> bool:
    return self.mode != "disabled"


# ------------------------------------------------------------------------------------------------
# Wire types


@dataclasses.dataclass
class DraftTree:
  """A tree as it travels edge -> server."""

  tokens: np.ndarray  # int32 [N]; tokens[0] is the root (shapes: specedge_jax/shapes.py)
  parents: np.ndarray  # int32 [N]; parents[0] == -1, 0 <= parents[i] < i

  @classmethod
  def root_only(cls, token: int) -> "DraftTree":
    """The one-node tree of plain autoregressive decoding."""
    return cls(tokens=np.array([token], np.int32), parents=np.array([-1], np.int32))


@dataclasses.dataclass
class VerifyResult:
  """A verification answer as it travels server -> edge."""

  accepted: list[int]  # tree tokens accepted below the root, in order
  bonus: int  # the target's token after the accepted path: the next root
  emitted: list[int]  # tokens for the user: accepted + [bonus], cut at EOS / max_new_tokens
  finished: bool


def validate_tree(tokens, parents, *, max_nodes: int, vocab_size: int) -> None:
  """Raises ValueError, naming the problem, unless (tokens, parents) is a well-formed tree.

  Well-formed: 1..max_nodes nodes (root included), equal 1-D lengths, parents[0] == -1,
  0 <= parents[i] < i, tokens in [0, vocab_size), and no two siblings with the same token (so the
  accepted path is unique). Node indices in messages are tree indices (the root is node 0).
  """
  tokens = np.asarray(tokens)
  parents = np.asarray(parents)
  if tokens.ndim != 1 or parents.ndim != 1:
    raise ValueError("tree tokens and parents must be 1-D")
  n = tokens.shape[0]
  if n == 0:
    raise ValueError("tree is empty: it needs at least the root")
  if n > max_nodes:
    raise ValueError(f"tree has {n} nodes; this verifier accepts at most {max_nodes}")
  if parents.shape[0] != n:
    raise ValueError(f"tree has {n} tokens but {parents.shape[0]} parents")
  if parents[0] != -1:
    raise ValueError(f"root parent must be -1, got {int(parents[0])}")
  bad = np.nonzero((parents[1:] < 0) | (parents[1:] >= np.arange(1, n)))[0]
  if bad.size:
    i = int(bad[0]) + 1
    raise ValueError(f"node {i} has parent {int(parents[i])}; parents must precede their "
                     "children (0 <= parent < index)")
  bad = np.nonzero((tokens < 0) | (tokens >= vocab_size))[0]
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"node {i} has token {int(tokens[i])} outside the vocabulary "
                     f"[0, {vocab_size})")
  pairs = parents.astype(np.int64) * (vocab_size + 1) + tokens
  if np.unique(pairs[1:]).size != n - 1:
    raise ValueError("two sibling nodes carry the same token; siblings must be distinct")


def check_cache_room(prompt_len: int, max_new_tokens: int, *, max_tree_nodes: int,
                     max_len: int) -> None:
  """Raises ValueError unless a session fits its cache: the prompt, every generated token and
  one full tree (verification writes the tree's rows after the committed prefix)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  needed = prompt_len + max_new_tokens + max_tree_nodes
  if needed > max_len:
    raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + one "
                     f"tree ({max_tree_nodes}) needs {needed} cache rows; this server has "
                     f"max_len {max_len}")


# ------------------------------------------------------------------------------------------------
# Errors


class EngineError(RuntimeError):
  """An engine cannot serve a well-formed request now (as opposed to a ValueError: bad input)."""


class SlotsExhausted(EngineError):
  """No free KV slot for a new request."""


# ------------------------------------------------------------------------------------------------
# The contract


class PrefillSnapshot(Protocol):
  """A slot's prompt key/values, exported after a prefill to open a later session by copy."""

  @property
  def prompt_ids(self) -> tuple[int, ...]: ...

  def nbytes(self) -> int: ...


@runtime_checkable
class TargetEngineProtocol(Protocol):
  """The verifier's engine: the target model, its slot KV cache and per-session state.

  Sessions are KV slots. `open` prefills a prompt and samples the first token; `verify` checks
  one tree per session in one batched forward; `decode` is plain autoregressive decoding (a
  root-only tree per session). Every result already applies EOS and `max_new_tokens`.
  """

  # Read-only members, written as properties so that a plain attribute satisfies them too.
  @property
  def vocab_size(self) -> int: ...

  @property
  def num_slots(self) -> int: ...

  @property
  def max_len(self) -> int:
    """Cache rows per slot."""
    ...

  @property
  def max_tree_nodes(self) -> int:
    """The largest tree verified, root included."""
    ...

  @property
  def max_batch_size(self) -> int:
    """Sessions per verify call."""
    ...

  @property
  def eos_token_ids(self) -> frozenset[int]: ...

  @property
  def last_forward_s(self) -> float:
    """Wall time of the last device call (open, verify, decode)."""
    ...

  @property
  def num_free_slots(self) -> int: ...

  def open(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
           max_new_tokens: int) -> tuple[int, int, bool]:
    """Prefills a prompt into a free slot: (slot, first_token, finished).

    Raises SlotsExhausted, or ValueError naming what is wrong with the request."""
    ...

  def open_resumed(self, prompt_ids: Sequence[int], generated_ids: Sequence[int], rounds: int,
                   sampling: SamplingParams, seed: int, max_new_tokens: int) -> int:
    """Re-opens a request an earlier session served (`generated_ids` emitted in `rounds`
    verifications): prefills prompt + generated[:-1]; generated[-1] is the next root. Returns
    the slot. The request then continues exactly as the earlier session would have."""
    ...

  def open_speculative(self, prompt_ids: Sequence[int], sampling: SamplingParams, seed: int,
                       max_new_tokens: int) -> int:
    """Opens a request whose first round is speculative: prefills prompt[:-1]; prompt[-1] roots
    the first tree, and the first `verify` emits the first tokens. Returns the slot."""
    ...

  def close(self, slot: int) -> None:
    """Frees the slot; KeyError if no session is open there."""
    ...

  def verify(self, requests: Sequence[tuple[int, DraftTree]]) -> list[VerifyResult]:
    """Verifies (slot, tree) pairs, at most max_batch_size, in one batched forward. Trees must
    pass `validate_tree` (the caller validates: the servicer does, on the event loop)."""
    ...

  def decode(self, slots: Sequence[int]) -> list[VerifyResult]:
    """One autoregressive step for each slot."""
    ...

  def export_prefill(self, slot: int) -> PrefillSnapshot:
    """Snapshots the prompt rows of a slot just opened (before any verify)."""
    ...

  def open_from_prefill(self, snapshot: PrefillSnapshot, prompt_ids: Sequence[int],
                        sampling: SamplingParams, seed: int,
                        max_new_tokens: int) -> tuple[int, int, bool]:
    """Like `open`, but fills the prompt rows from a snapshot of the same prompt (one this
    engine exported; ValueError for any other)."""
    ...


@runtime_checkable
class DraftEngineProtocol(Protocol):
  """The edge's engine: the draft model, its cache and the speculation trees of its sessions."""

  @property
  def num_free_slots(self) -> int: ...

  def open(self, prompt_ids: Sequence[int], first_token: int) -> int:
    """Prefills a prompt whose first generated token is known; returns the draft slot."""
    ...

  def close(self, slot: int) -> None: ...

  def draft(self, slot: int, limits: TreeLimits | None = None) -> DraftTree:
    """Grows the slot's tree from its current root and returns it for verification; `limits`
    caps this round's tree below the configured shape."""
    ...

  def draft_proactive(self, slot: int) -> None:
    """While the tree is in flight, grows the tree for the most likely verification outcome.
    A no-op when proactive drafting is off."""
    ...

  def abandon_round(self, slot: int) -> None:
    """Drops the tree in flight (its verification failed and will not be answered): the next
    `draft` grows this round's tree again from the same root."""
    ...

  def commit(self, slot: int, result: VerifyResult) -> bool | None:
    """Applies a verification result; returns whether the proactive guess hit (None: off)."""
    ...
