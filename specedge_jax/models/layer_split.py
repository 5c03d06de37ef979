"""A `Transformer` split at layer L: a head for the edge and a tail for the server.

The layer-split baseline of the reference (`layer_split_head.py` / `layer_split_tail.py`) runs
the first layers of the target on the edge and sends hidden states; the server runs the rest.
This module owns that split of the model and the pure jitted functions that run each part:

  head  the token embedding and layers [0, L): token ids in, hidden states [.., D] out;
  tail  layers [L, N), the final norm and the LM head (the embedding, when it is tied):
        hidden states in, logits out.

Both parts are NNX modules built from a loaded `Transformer` without copying its code: they hold
the model's own submodules (embedding, final norm, LM head; shared, not copied) and a slice of
its stacked layer parameters (`[L]`-leading arrays cut to the part's layers), and they run
`DecoderLayer.__call__` in the same split-outside / merge-inside `lax.scan` as the model. Each
part has its own slot KV cache holding only its layers (`init_cache`), so the edge keeps the
K/V of layers [0, L) and the server those of [L, N). Running the head and then the tail is the
model's forward up to float rounding (`tests/models/test_layer_split.py`).

The jitted functions (prefill chunk and batched decode step of each part) take fixed-shape
padded buffers and donate the cache, like `spec/prefill.py` and `spec/verify.py`; a padded token
or lane writes to `kv_cache.DROP_ROW` and touches no slot. Sampling is not here (it belongs to
`spec/`): `tail_decode` returns logits, and the engine samples them inside its own jit.

Shapes: see specedge_jax/shapes.py (B, T, S, M, D, V, L, O here).

This module never decides slots, lengths, EOS or what travels on the wire; the engines in
`engine/layer_split.py` do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from specedge_jax.models import kv_cache as kv
from specedge_jax.models.model_config import ModelConfig
from specedge_jax.models import transformer
from specedge_jax.models.transformer import Transformer


def check_split_layer(config: ModelConfig, split_layer: int) -> None:
  """Raises ValueError unless 0 <= split_layer <= num_layers.

  The ends are allowed: at 0 the head is the embedding alone, at N the tail is the final norm
  and LM head alone.
  """
  if not 0 <= split_layer <= config.num_layers:
    raise ValueError(f"split_layer must be in [0, {config.num_layers}] for a "
                     f"{config.num_layers}-layer model, got {split_layer}")


def _slice_layers(layers: nnx.Module, start: int, stop: int) -> nnx.Module:
  """The stacked layers [start, stop) as a stacked module of their own (arrays are slices of
  the model's `[L]`-leading parameters, so a part holds only its own layers' weights)."""
  graphdef, state = nnx.split(layers)
  return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[start:stop], state))


def _run_layers(layers: nnx.Module, num_layers: int, x, positions, inv_freq, mask,
                cache: kv.KVCache | None, slots, write_rows):
  """Runs a part's stacked layers over x [B, T, D]; layer i of the part uses layer i of `cache`.

  The model's own scan (`transformer.scan_layers`): one traced layer whatever the depth, the
  cache in the carry.
  """
  if num_layers == 0:  # a part without layers: an empty scan would still trace cache reads
    return x, cache
  cache_k, cache_v = (cache.k, cache.v) if cache is not None else (None, None)
  x, cache_k, cache_v = transformer.scan_layers(layers, x, positions, inv_freq, mask, cache_k,
                                                cache_v, slots, write_rows)
  return x, (kv.KVCache(k=cache_k, v=cache_v) if cache is not None else None)


class Head(nnx.Module):
  """The edge's part: embedding + layers [0, split_layer). Tokens in, hidden states out."""

  def __init__(self, model: Transformer, split_layer: int):
    check_split_layer(model.config, split_layer)
    self.config = model.config
    self.dtype = model.dtype
    self.num_layers = split_layer
    self.embed = model.embed
    self.layers = _slice_layers(model.layers, 0, split_layer)

  def __call__(
      self,
      tokens: jax.Array,  # [B, T] int32
      positions: jax.Array,  # [B, T] int32, RoPE positions
      attention_mask: jax.Array,  # [B, T, S] bool (S = T without a cache)
      cache: kv.KVCache | None = None,  # this part's layers only
      slots: jax.Array | None = None,  # [B] int32
      write_rows: jax.Array | None = None,  # [B, T] int32; DROP_ROW writes nothing
  ) -> tuple[jax.Array, kv.KVCache | None]:
    """Returns (hidden [B, T, D] in the model's compute dtype, cache); arguments as
    `Transformer.__call__`."""
    inv_freq = jnp.asarray(self.config.rope_inverse_frequencies(), jnp.float32)
    return _run_layers(self.layers, self.num_layers, self.embed(tokens), positions, inv_freq,
                       attention_mask, cache, slots, write_rows)


class Tail(nnx.Module):
  """The server's part: layers [split_layer, N), final norm, LM head. Hidden states in, logits
  out."""

  def __init__(self, model: Transformer, split_layer: int):
    check_split_layer(model.config, split_layer)
    self.config = model.config
    self.dtype = model.dtype
    self.num_layers = model.config.num_layers - split_layer
    self.layers = _slice_layers(model.layers, split_layer, model.config.num_layers)
    self.final_norm = model.final_norm
    if model.config.tie_word_embeddings:
      self.embed = model.embed  # the LM head is the embedding's transpose
    else:
      self.lm_head = model.lm_head

  def __call__(
      self,
      hidden: jax.Array,  # [B, T, D], the head's output (any float dtype)
      positions: jax.Array,  # [B, T] int32
      attention_mask: jax.Array,  # [B, T, S] bool
      cache: kv.KVCache | None = None,
      slots: jax.Array | None = None,
      write_rows: jax.Array | None = None,
      logits_at: jax.Array | None = None,  # [B, O] int32: logits only at these tokens
  ) -> tuple[jax.Array, kv.KVCache | None]:
    """Returns (logits [B, T, V] or [B, O, V], float32; cache)."""
    inv_freq = jnp.asarray(self.config.rope_inverse_frequencies(), jnp.float32)
    x, cache = _run_layers(self.layers, self.num_layers, hidden.astype(self.dtype), positions,
                           inv_freq, attention_mask, cache, slots, write_rows)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32), cache


def split(model: Transformer, split_layer: int) -> tuple[Head, Tail]:
  """(head, tail) of `model` at `split_layer`."""
  return Head(model, split_layer), Tail(model, split_layer)


def init_cache(part: Head | Tail, num_slots: int, max_len: int, dtype=None) -> kv.KVCache:
  """Zeros for a part's own layers: k, v [part layers, M, S, K, H]."""
  c = part.config
  shape = (part.num_layers, num_slots, max_len, c.num_kv_heads, c.head_dim)
  dtype = dtype or part.dtype
  return kv.KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def _chunk_inputs(max_len: int, chunk: int, start, count):
  """Positions [1, T], write rows [1, T] and the causal mask [1, T, S] of a prefill chunk
  whose first `count` tokens go to rows start.. (the rest are padding and write nothing)."""
  offset = jnp.arange(chunk, dtype=jnp.int32)
  positions = start + offset
  write_rows = jnp.where(offset < count, positions, kv.DROP_ROW)
  mask = jnp.arange(max_len)[None, :] <= positions[:, None]
  return positions[None], write_rows[None], mask[None]


def _decode_inputs(max_len: int, positions, live):
  """Positions [B, 1], write rows [B, 1] and mask [B, 1, S] of one token per lane at row
  `positions[b]` (the lane's committed length); a lane that is not live writes nothing."""
  write_rows = jnp.where(live, positions, kv.DROP_ROW)
  mask = jnp.arange(max_len)[None, :] <= positions[:, None]
  return positions[:, None], write_rows[:, None], mask[:, None, :]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def head_prefill_chunk(graphdef, head_state, cache: kv.KVCache, slot, tokens, start, count):
  """Runs `count` prompt tokens (of a fixed-size chunk) through the head at rows start.. of
  `slot`, causally after the rows already written.

  Args:
    graphdef, head_state: the head, from `transformer.split_model(head)`.
    cache: the head's cache; donated (do not use it after the call).
    slot: int32 scalar; tokens: [T] int32 (padded past count); start, count: int32 scalars.

  Returns:
    (cache, hidden [T, D]); rows past `count` are padding's and mean nothing.
  """
  head = nnx.merge(graphdef.graphdef, head_state)
  positions, write_rows, mask = _chunk_inputs(cache.max_len, tokens.shape[0], start, count)
  hidden, cache = head(tokens[None], positions, mask, cache, slot[None], write_rows)
  return cache, hidden[0]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def head_decode(graphdef, head_state, cache: kv.KVCache, slots, tokens, positions, live):
  """One token per lane through the head: token b goes to row `positions[b]` of `slots[b]`.

  Args:
    cache: the head's cache; donated.
    slots, tokens, positions: [B] int32; live: [B] bool (False: a padded lane, writes nothing).

  Returns:
    (cache, hidden [B, D]).
  """
  head = nnx.merge(graphdef.graphdef, head_state)
  positions, write_rows, mask = _decode_inputs(cache.max_len, positions, live)
  hidden, cache = head(tokens[:, None], positions, mask, cache, slots, write_rows)
  return cache, hidden[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def tail_prefill_chunk(graphdef, tail_state, cache: kv.KVCache, slot, hidden, start, count):
  """Runs `count` rows of prompt hidden states (of a fixed-size chunk) through the tail at rows
  start.. of `slot`, causally.

  Args:
    cache: the tail's cache; donated.
    slot: int32 scalar; hidden: [T, D] (padded past count); start, count: int32 scalars.

  Returns:
    (cache, logits [V] at the last valid row of the chunk).
  """
  tail = nnx.merge(graphdef.graphdef, tail_state)
  positions, write_rows, mask = _chunk_inputs(cache.max_len, hidden.shape[0], start, count)
  logits, cache = tail(hidden[None], positions, mask, cache, slot[None], write_rows,
                       logits_at=jnp.maximum(count - 1, 0)[None, None])
  return cache, logits[0, 0]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def tail_decode(graphdef, tail_state, cache: kv.KVCache, slots, hidden, positions, live):
  """One hidden state per lane through the tail, at row `positions[b]` of `slots[b]`.

  Args:
    cache: the tail's cache; donated.
    slots, positions: [B] int32; hidden: [B, D]; live: [B] bool (False writes nothing).

  Returns:
    (cache, logits [B, V] float32).
  """
  tail = nnx.merge(graphdef.graphdef, tail_state)
  positions, write_rows, mask = _decode_inputs(cache.max_len, positions, live)
  logits, cache = tail(hidden[:, None], positions, mask, cache, slots, write_rows)
  return cache, logits[:, 0]
