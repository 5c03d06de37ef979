"""The layer-split baseline's engines and its hidden-state wire format.

The reference's layer-split baseline runs the target's first L layers on the edge and sends the
hidden state of every token to the server, which runs the rest and answers with the next token.
This module owns the host side of both halves (the model split and its jitted functions are
`models/layer_split.py`):

* `HeadEngine` (edge): slots of the head's KV cache (layers [0, L)); prefills a prompt chunk by
  chunk, returning each chunk's hidden states, and runs one batched decode step (a token per
  slot in, the hidden state of that position out).
* `TailEngine` (server): slots of the tail's KV cache (layers [L, N)); prefills a prompt's hidden
  states (in any number of pieces, as they arrive), samples the first token, and runs one
  batched decode step across sessions (a hidden state per session in, its next token out). It
  samples as `TargetEngine` does (`spec/sampling.py`, the key `fold_in(PRNGKey(seed), step)`
  with step 0 for the first token, then 1, 2, ...), inside the same jit as the tail forward,
  and enforces EOS and `max_new_tokens`. With an fp32 wire, greedy output equals target-only
  greedy output, and sampled output equals the target's for the same seeds.
* `HiddenStates`, the wire format: shape, dtype ('bf16' | 'fp16' | 'fp32') and raw
  little-endian row-major bytes, with the conversions both ways and their validation.
* `generate`, the in-process loop over both engines (tests, and the agreement of a rounding
  wire dtype with target-only output, `greedy_agreement`).

Shapes are fixed: batch sizes are padded to power-of-two buckets up to `max_batch_size`,
prompt pieces to the two prefill chunk sizes; `warmup()` compiles every variant. Neither engine
is thread-safe: one owner thread each. Shapes: see specedge_jax/shapes.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Iterator, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from specedge_jax import api
from specedge_jax.api import SamplingParams, VerifyResult
from specedge_jax.engine import prefill as prefill_lib
from specedge_jax.models import layer_split as split_lib
from specedge_jax.models.transformer import StaticGraph
from specedge_jax.spec import sampling as sampling_lib
from specedge_jax.spec import verify as verify_lib

# ------------------------------------------------------------------------------------------------
# The wire format.

WIRE_DTYPES: dict[str, np.dtype] = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
}
# The unsigned integer of each width: bytes are written and read through it as little-endian,
# so the wire does not depend on the host's byte order (and bf16 has no byte-order variant).
_UINT_OF_SIZE: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclasses.dataclass(frozen=True)
class HiddenStates:
  """Hidden states on the wire: `shape` [T, D], `dtype` one of WIRE_DTYPES, `data` the values,
  row-major, little-endian (T * D * itemsize bytes). Construction validates all three."""

  shape: tuple[int, ...]
  dtype: str
  data: bytes = dataclasses.field(repr=False)

  def __post_init__(self):
    if self.dtype not in WIRE_DTYPES:
      raise ValueError(f"hidden-state dtype must be one of {sorted(WIRE_DTYPES)}, got "
                       f"{self.dtype!r}")
    shape = tuple(self.shape)
    if len(shape) != 2 or any(not isinstance(n, (int, np.integer)) or n < 1 for n in shape):
      raise ValueError(f"hidden-state shape must be [rows, hidden_size] with both >= 1, got "
                       f"{list(shape)}")
    object.__setattr__(self, "shape", tuple(int(n) for n in shape))
    if len(self.data) != self.expected_nbytes:
      raise ValueError(f"hidden states of shape {list(self.shape)} in {self.dtype} need "
                       f"{self.expected_nbytes} bytes, got {len(self.data)}")

  @property
  def rows(self) -> int:
    return self.shape[0]

  @property
  def expected_nbytes(self) -> int:
    return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize

  @classmethod
  def from_array(cls, array, dtype: str) -> "HiddenStates":
    """Encodes [T, D] (or [D], as one row) float values, rounded to `dtype` (nearest even)."""
    if dtype not in WIRE_DTYPES:
      raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    values = np.asarray(array)
    if values.ndim == 1:
      values = values[None]
    wire = WIRE_DTYPES[dtype]
    as_uint = values.astype(wire).view(_UINT_OF_SIZE[wire.itemsize].newbyteorder("="))
    return cls(shape=values.shape, dtype=dtype,
               data=as_uint.astype(_UINT_OF_SIZE[wire.itemsize]).tobytes())

  def to_array(self, dtype=np.float32, *, check_finite: bool = True) -> np.ndarray:
    """The values as a [T, D] array of `dtype`; ValueError on NaN or infinity (a tail fed one
    would emit garbage for the rest of the request)."""
    wire = WIRE_DTYPES[self.dtype]
    raw = np.frombuffer(self.data, _UINT_OF_SIZE[wire.itemsize]).reshape(self.shape)
    values = raw.astype(_UINT_OF_SIZE[wire.itemsize].newbyteorder("=")).view(wire)
    if check_finite and not np.isfinite(values).all():
      row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
      raise ValueError(f"hidden states hold a non-finite value (row {row})")
    return values.astype(dtype)


# ------------------------------------------------------------------------------------------------
# Shared host-side helpers.


def _chunk_plan(total: int, chunk_sizes: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
  """(offset, chunk, count) of each fixed-size chunk covering `total` rows: the full chunk size
  while more remain, then the smallest size that holds the rest (as `engine/prefill.py`)."""
  offset = 0
  while offset < total:
    remaining = total - offset
    chunk = next((c for c in chunk_sizes if c >= remaining), chunk_sizes[-1])
    count = min(chunk, remaining)
    yield offset, chunk, count
    offset += count


def _take_slot(free: list[int], num_slots: int) -> int:
  if not free:
    raise api.SlotsExhausted(f"all {num_slots} slots are busy")
  return free.pop(0)


def _give_back(free: list[int], slot: int) -> None:
  free.append(slot)
  free.sort()


# ------------------------------------------------------------------------------------------------
# The edge's engine.


@dataclasses.dataclass
class _HeadSession:
  prompt: np.ndarray  # int32 prompt ids
  length: int = 0  # cache rows written: prompt rows, then one per decoded token


class HeadEngine:
  """The edge's half: embedding + layers [0, split_layer). Not thread-safe: one owner thread."""

  def __init__(self, model, split_layer: int, *, num_slots: int, max_len: int,
               max_batch_size: int = 1, prefill_chunk: int = 64, cache_dtype=None):
    if num_slots < 1 or max_batch_size < 1 or max_len < 2:
      raise ValueError("num_slots and max_batch_size must be >= 1, max_len >= 2")
    self.config = model.config
    self.split_layer = split_layer
    self.head = split_lib.Head(model, split_layer)
    graphdef, self.state = nnx.split(self.head)
    self.graphdef = StaticGraph(graphdef)
    self.cache = split_lib.init_cache(self.head, num_slots, max_len, cache_dtype)
    self.num_slots, self.max_len, self.max_batch_size = num_slots, max_len, max_batch_size
    self.chunk_sizes = prefill_lib.chunk_sizes(prefill_chunk)
    self._free = list(range(num_slots))
    self._sessions: dict[int, _HeadSession] = {}
    self.last_forward_s = 0.0

  @property
  def num_free_slots(self) -> int:
    return len(self._free)

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def _session(self, slot: int) -> _HeadSession:
    if slot not in self._sessions:
      raise KeyError(f"no open head session in slot {slot}")
    return self._sessions[slot]

  def open(self, prompt_ids: Sequence[int], max_new_tokens: int) -> int:
    """Takes a slot for a prompt (nothing runs yet: `prefill_chunk` does). Returns the slot."""
    prompt = np.asarray(prompt_ids, np.int64)
    if prompt.ndim != 1 or prompt.size == 0:
      raise ValueError("prompt must be a non-empty list of token ids")
    if np.any((prompt < 0) | (prompt >= self.config.vocab_size)):
      raise ValueError(f"prompt tokens must be in the vocabulary [0, {self.config.vocab_size})")
    # Rows: the prompt and every generated token but the last (which is never fed back).
    api.check_cache_room(int(prompt.size), max_new_tokens, max_tree_nodes=0, max_len=self.max_len)
    slot = _take_slot(self._free, self.num_slots)
    self._sessions[slot] = _HeadSession(prompt=prompt.astype(np.int32))
    return slot

  def pending_prompt_tokens(self, slot: int) -> int:
    """Prompt tokens not yet run through the head."""
    session = self._session(slot)
    return max(0, int(session.prompt.size) - session.length)

  def prefill_chunk(self, slot: int) -> np.ndarray:
    """Runs the next chunk of the slot's prompt; returns its hidden states [T, D] (T rows of the
    prompt, in the model's compute dtype). ValueError when the prompt is already all in."""
    session = self._session(slot)
    remaining = self.pending_prompt_tokens(slot)
    if not remaining:
      raise ValueError(f"the prompt of slot {slot} is already prefilled")
    _, chunk, count = next(_chunk_plan(remaining, self.chunk_sizes))
    buffer = np.zeros(chunk, np.int32)
    buffer[:count] = session.prompt[session.length:session.length + count]
    start = time.perf_counter()
    self.cache, hidden = split_lib.head_prefill_chunk(
        self.graphdef, self.state, self.cache, np.int32(slot), buffer, np.int32(session.length),
        np.int32(count))
    hidden = np.asarray(jax.device_get(hidden))[:count]
    self.last_forward_s = time.perf_counter() - start
    session.length += count
    return hidden

  def prefill(self, slot: int) -> np.ndarray:
    """All of the slot's remaining prompt: hidden states [P, D]."""
    pieces = []
    while self.pending_prompt_tokens(slot):
      pieces.append(self.prefill_chunk(slot))
    return np.concatenate(pieces)

  def decode(self, requests: Sequence[tuple[int, int]]) -> np.ndarray:
    """Runs one token per (slot, token) at the slot's next row in one batched forward; returns
    their hidden states [B, D] in request order."""
    if not requests:
      return np.zeros((0, self.hidden_size), np.float32)
    if len(requests) > self.max_batch_size:
      raise ValueError(f"batch of {len(requests)} exceeds max_batch_size {self.max_batch_size}")
    if len({slot for slot, _ in requests}) != len(requests):
      raise ValueError("a slot appears twice in one decode batch")
    batch = prefill_lib.bucket(len(requests), self.max_batch_size)
    slots, tokens, positions = (np.zeros(batch, np.int32) for _ in range(3))
    live = np.zeros(batch, bool)
    sessions = []
    for lane, (slot, token) in enumerate(requests):
      session = self._session(slot)
      if self.pending_prompt_tokens(slot):
        raise ValueError(f"slot {slot} decodes before its prompt is prefilled")
      if session.length >= self.max_len:
        raise ValueError(f"slot {slot} has no cache row left (max_len {self.max_len})")
      if not 0 <= int(token) < self.config.vocab_size:
        raise ValueError(f"token {int(token)} is outside the vocabulary")
      slots[lane], tokens[lane], positions[lane], live[lane] = slot, token, session.length, True
      sessions.append(session)
    start = time.perf_counter()
    self.cache, hidden = split_lib.head_decode(self.graphdef, self.state, self.cache, slots,
                                               tokens, positions, live)
    hidden = np.asarray(jax.device_get(hidden))[:len(requests)]
    self.last_forward_s = time.perf_counter() - start
    for session in sessions:
      session.length += 1
    return hidden

  def close(self, slot: int) -> None:
    self._session(slot)
    del self._sessions[slot]
    _give_back(self._free, slot)

  def warmup(self) -> None:
    """Compiles both prefill chunk sizes and every decode batch bucket. Chunks of count 0 and
    lanes that are not live write nothing, so no slot is touched."""
    for chunk in self.chunk_sizes:
      self.cache, _ = split_lib.head_prefill_chunk(
          self.graphdef, self.state, self.cache, np.int32(0), np.zeros(chunk, np.int32),
          np.int32(0), np.int32(0))
    for size in sorted({prefill_lib.bucket(b, self.max_batch_size)
                        for b in range(1, self.max_batch_size + 1)}):
      zeros = np.zeros(size, np.int32)
      self.cache, _ = split_lib.head_decode(self.graphdef, self.state, self.cache, zeros, zeros,
                                            zeros, np.zeros(size, bool))
    jax.block_until_ready(self.cache)


# ------------------------------------------------------------------------------------------------
# The server's engine.


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _tail_step(graphdef, tail_state, cache, slots, hidden, positions, live, temperature, top_p,
               top_k, seeds, steps):
  """The tail's decode forward and the sampling of its next tokens, in one jit (the cache is
  donated; the jitted callees are inlined). Returns (cache, tokens [B])."""
  cache, logits = split_lib.tail_decode(graphdef, tail_state, cache, slots, hidden, positions,
                                        live)
  keys = verify_lib.request_keys(seeds, steps)
  tokens = sampling_lib.sample_tokens(logits[:, None], keys, temperature, top_p, top_k)
  return cache, tokens[:, 0]


@dataclasses.dataclass
class _TailSession:
  prompt_tokens: int  # prompt rows the open announced
  sampling: SamplingParams
  seed: int  # uint32: the PRNG stream is fold_in(PRNGKey(seed), step)
  max_new_tokens: int
  length: int = 0  # cache rows written
  step: int = 0  # 0 until the first token is sampled, then the next decode's step
  generated: int = 0
  finished: bool = False
  last_logits: jax.Array | None = None  # [V], after the last prompt row written so far


class TailEngine:
  """The server's half: layers [split_layer, N), final norm, LM head. Not thread-safe: one
  owner thread."""

  def __init__(self, model, split_layer: int, *, num_slots: int, max_len: int,
               max_batch_size: int, prefill_chunk: int = 64, eos_token_ids: Sequence[int] = (),
               cache_dtype=None):
    if num_slots < 1 or max_batch_size < 1 or max_len < 2:
      raise ValueError("num_slots and max_batch_size must be >= 1, max_len >= 2")
    self.config = model.config
    self.split_layer = split_layer
    self.tail = split_lib.Tail(model, split_layer)
    graphdef, self.state = nnx.split(self.tail)
    self.graphdef = StaticGraph(graphdef)
    self.cache = split_lib.init_cache(self.tail, num_slots, max_len, cache_dtype)
    self.num_slots, self.max_len, self.max_batch_size = num_slots, max_len, max_batch_size
    self.chunk_sizes = prefill_lib.chunk_sizes(prefill_chunk)
    self.eos_token_ids = frozenset(int(t) for t in (eos_token_ids or self.config.eos_token_ids))
    self._free = list(range(num_slots))
    self._sessions: dict[int, _TailSession] = {}
    self.last_forward_s = 0.0

  @property
  def num_free_slots(self) -> int:
    return len(self._free)

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def session(self, slot: int) -> _TailSession:
    if slot not in self._sessions:
      raise KeyError(f"no open session in slot {slot}")
    return self._sessions[slot]

  def begin(self, prompt_tokens: int, sampling: SamplingParams, seed: int,
            max_new_tokens: int) -> int:
    """Takes a slot for a prompt of `prompt_tokens` rows, to be filled by `extend` and closed
    by `finish_prefill`. Raises SlotsExhausted or ValueError (the prompt does not fit)."""
    if prompt_tokens < 1:
      raise ValueError(f"a prompt has at least 1 token, got {prompt_tokens}")
    api.check_cache_room(int(prompt_tokens), max_new_tokens, max_tree_nodes=0,
                         max_len=self.max_len)
    slot = _take_slot(self._free, self.num_slots)
    self._sessions[slot] = _TailSession(prompt_tokens=int(prompt_tokens), sampling=sampling,
                                        seed=int(seed) & 0xFFFFFFFF,
                                        max_new_tokens=int(max_new_tokens))
    return slot

  def _checked_rows(self, hidden, what: str) -> np.ndarray:
    values = np.asarray(hidden)
    if values.ndim == 1:
      values = values[None]
    if values.ndim != 2 or values.shape[1] != self.hidden_size or not values.shape[0]:
      raise ValueError(f"{what} must be [rows >= 1, {self.hidden_size}], got "
                       f"{list(values.shape)}")
    return values

  def extend(self, slot: int, hidden) -> None:
    """Writes the next rows of the slot's prompt hidden states [T, D] (any T up to what the
    prompt has left), in fixed-size chunks."""
    session = self.session(slot)
    if session.step:
      raise ValueError(f"slot {slot} has finished its prefill")
    values = self._checked_rows(hidden, "prompt hidden states")
    if session.length + values.shape[0] > session.prompt_tokens:
      raise ValueError(f"{session.length + values.shape[0]} prompt rows for a prompt of "
                       f"{session.prompt_tokens} tokens")
    start = time.perf_counter()
    for offset, chunk, count in _chunk_plan(values.shape[0], self.chunk_sizes):
      buffer = np.zeros((chunk, self.hidden_size), np.float32)
      buffer[:count] = values[offset:offset + count]
      self.cache, session.last_logits = split_lib.tail_prefill_chunk(
          self.graphdef, self.state, self.cache, np.int32(slot), buffer,
          np.int32(session.length), np.int32(count))
      session.length += count
    jax.block_until_ready(session.last_logits)
    self.last_forward_s = time.perf_counter() - start

  def finish_prefill(self, slot: int) -> tuple[int, bool]:
    """Samples the first token after a complete prompt. Returns (token, finished)."""
    session = self.session(slot)
    if session.step:
      raise ValueError(f"slot {slot} has finished its prefill")
    if session.length != session.prompt_tokens or session.last_logits is None:
      raise ValueError(f"the prompt of slot {slot} has {session.length} of "
                       f"{session.prompt_tokens} rows")
    params = sampling_lib.stack_params([session.sampling])
    keys = verify_lib.request_keys(np.array([session.seed], np.uint32), np.array([0], np.int32))
    # Exactly TargetEngine's first-token draw (step 0), so sampled outputs agree with it.
    first = int(sampling_lib.sample_tokens(session.last_logits[None, None], keys,
                                           params["temperature"], params["top_p"],
                                           params["top_k"])[0, 0])
    session.last_logits = None
    session.step, session.generated = 1, 1
    session.finished = first in self.eos_token_ids or session.max_new_tokens == 1
    return first, session.finished

  def open(self, prompt_hidden, sampling: SamplingParams, seed: int,
           max_new_tokens: int) -> tuple[int, int, bool]:
    """`begin` + `extend` + `finish_prefill` for a whole prompt's hidden states [P, D]:
    returns (slot, first_token, finished). The slot goes back if any part fails."""
    values = self._checked_rows(prompt_hidden, "prompt hidden states")
    slot = self.begin(values.shape[0], sampling, seed, max_new_tokens)
    try:
      self.extend(slot, values)
      first, finished = self.finish_prefill(slot)
    except BaseException:
      self.close(slot)
      raise
    return slot, first, finished

  def decode(self, requests: Sequence[tuple[int, np.ndarray]]) -> list[VerifyResult]:
    """One step for each (slot, hidden state [D] of the session's last token) in one batched
    forward: each result's `emitted` is its next token (`bonus` the same), `finished` at EOS or
    max_new_tokens."""
    if not requests:
      return []
    if len(requests) > self.max_batch_size:
      raise ValueError(f"batch of {len(requests)} exceeds max_batch_size {self.max_batch_size}")
    if len({slot for slot, _ in requests}) != len(requests):
      raise ValueError("a slot appears twice in one decode batch")
    batch = prefill_lib.bucket(len(requests), self.max_batch_size)
    slots, positions, steps = (np.zeros(batch, np.int32) for _ in range(3))
    seeds = np.zeros(batch, np.uint32)
    live = np.zeros(batch, bool)
    hidden = np.zeros((batch, self.hidden_size), np.float32)
    sessions, params = [], []
    for lane, (slot, values) in enumerate(requests):
      session = self.session(slot)
      if not session.step:
        raise ValueError(f"slot {slot} decodes before its prefill finished")
      if session.finished:
        raise ValueError(f"session in slot {slot} has finished")
      row = self._checked_rows(values, "a decode hidden state")
      if row.shape[0] != 1:
        raise ValueError(f"a decode step takes one hidden state, got {row.shape[0]} rows")
      slots[lane], positions[lane], live[lane] = slot, session.length, True
      seeds[lane], steps[lane] = session.seed, session.step
      hidden[lane] = row[0]
      sessions.append(session)
      params.append(session.sampling)
    stacked = sampling_lib.stack_params(params + [api.GREEDY] * (batch - len(requests)))
    start = time.perf_counter()
    self.cache, tokens = _tail_step(self.graphdef, self.state, self.cache, slots, hidden,
                                    positions, live, stacked["temperature"], stacked["top_p"],
                                    stacked["top_k"], seeds, steps)
    tokens = np.asarray(jax.device_get(tokens))
    self.last_forward_s = time.perf_counter() - start
    results = []
    for lane, session in enumerate(sessions):
      token = int(tokens[lane])
      session.length += 1
      session.step += 1
      session.generated += 1
      session.finished = (token in self.eos_token_ids
                          or session.generated >= session.max_new_tokens)
      results.append(VerifyResult(accepted=[], bonus=token, emitted=[token],
                                  finished=session.finished))
    return results

  def close(self, slot: int) -> None:
    self.session(slot)
    del self._sessions[slot]
    _give_back(self._free, slot)

  def warmup(self) -> None:
    """Compiles both prefill chunk sizes, every decode batch bucket and first-token sampling.
    Chunks of count 0 and lanes that are not live write nothing."""
    for chunk in self.chunk_sizes:
      self.cache, _ = split_lib.tail_prefill_chunk(
          self.graphdef, self.state, self.cache, np.int32(0),
          np.zeros((chunk, self.hidden_size), np.float32), np.int32(0), np.int32(0))
    for size in sorted({prefill_lib.bucket(b, self.max_batch_size)
                        for b in range(1, self.max_batch_size + 1)}):
      zeros = np.zeros(size, np.int32)
      self.cache, _ = _tail_step(self.graphdef, self.state, self.cache, zeros,
                                 np.zeros((size, self.hidden_size), np.float32), zeros,
                                 np.zeros(size, bool), np.zeros(size, np.float32),
                                 np.ones(size, np.float32), zeros, np.zeros(size, np.uint32),
                                 zeros)
    slot, _, _ = self.open(np.zeros((1, self.hidden_size), np.float32), api.GREEDY, 0, 1)
    self.close(slot)


# ------------------------------------------------------------------------------------------------
# In process: both halves in one loop.


def generate(head: HeadEngine, tail: TailEngine, prompts: Sequence[Sequence[int]], *,
             wire_dtype: str = "fp32", sampling: SamplingParams = api.GREEDY,
             max_new_tokens: int = 32, seed: int = 0) -> list[list[int]]:
  """Generates for every prompt through head -> wire -> tail, batched; returns the tokens of
  each prompt (the first included). Hidden states go through `HiddenStates` in `wire_dtype`, as
  over the network. Request i samples with seed + i, as `engine.generate` does, so the two
  loops are comparable token for token."""
  if head.split_layer != tail.split_layer:
    raise ValueError(f"head split at {head.split_layer}, tail at {tail.split_layer}")
  outputs: list[list[int]] = [[] for _ in prompts]
  wave = min(head.max_batch_size, tail.max_batch_size, head.num_free_slots, tail.num_free_slots)
  if wave < 1:
    raise ValueError("no free slot to generate in")

  def over_wire(values) -> np.ndarray:
    return HiddenStates.from_array(values, wire_dtype).to_array()

  for first in range(0, len(prompts), wave):
    live: dict[int, tuple[int, int]] = {}  # prompt index -> (head slot, tail slot)
    for i in range(first, min(first + wave, len(prompts))):
      head_slot = head.open(prompts[i], max_new_tokens)
      tail_slot, token, finished = tail.open(over_wire(head.prefill(head_slot)), sampling,
                                             seed + i, max_new_tokens)
      outputs[i].append(token)
      if finished:
        head.close(head_slot)
        tail.close(tail_slot)
      else:
        live[i] = (head_slot, tail_slot)
    while live:
      order = sorted(live)
      hidden = head.decode([(live[i][0], outputs[i][-1]) for i in order])
      results = tail.decode([(live[i][1], over_wire(row)) for i, row in zip(order, hidden)])
      for i, result in zip(order, results):
        outputs[i].extend(result.emitted)
        if result.finished:
          head_slot, tail_slot = live.pop(i)
          head.close(head_slot)
          tail.close(tail_slot)
  return outputs


@dataclasses.dataclass(frozen=True)
class Agreement:
  """How far outputs follow reference outputs of the same requests (e.g. target-only greedy)."""

  requests: int
  identical_requests: int  # outputs equal token for token, length included
  reference_tokens: int
  tokens_before_divergence: int  # summed over requests: the common prefix of each pair
  matching_positions: int  # positions < both lengths where the tokens agree

  @property
  def identical_fraction(self) -> float:
    return self.identical_requests / self.requests if self.requests else 1.0

  @property
  def prefix_fraction(self) -> float:
    """The share of reference tokens emitted before the first divergence."""
    return self.tokens_before_divergence / self.reference_tokens if self.reference_tokens else 1.0


def greedy_agreement(reference: Sequence[Sequence[int]],
                     outputs: Sequence[Sequence[int]]) -> Agreement:
  """Compares outputs with reference outputs, request by request."""
  if len(reference) != len(outputs):
    raise ValueError(f"{len(reference)} reference outputs for {len(outputs)} outputs")
  identical = before = matching = 0
  for ref, out in zip(reference, outputs):
    ref, out = list(ref), list(out)
    identical += ref == out
    prefix = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
    before += prefix
    matching += sum(a == b for a, b in zip(ref, out))
  return Agreement(requests=len(reference), identical_requests=identical,
                   reference_tokens=sum(len(r) for r in reference),
                   tokens_before_divergence=before, matching_positions=matching)
