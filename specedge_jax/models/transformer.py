"""The decoder: a Flax NNX transformer for the Qwen3, Qwen2 and Llama families.

The model is pure with respect to masking and positions: callers pass token ids, RoPE positions,
the cache rows to write, and a boolean attention mask over the cache, and get `(logits, cache)`
back. Prefill, decode, tree drafting and tree verification differ only in what they pass; the
model never builds a causal mask itself.

Shapes: see specedge_jax/shapes.py (comments and einsum strings use its letters; here B, T,
S, M, O, D, V, L, Q, K, G with Q = K * G, and H).

Layers are stacked (every layer parameter has a leading [L] axis, built with `nnx.vmap`) and run
with `jax.lax.scan`, so compile time does not grow with depth. The stacked cache rides in the scan
carry, which XLA updates in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from specedge_jax.models import kv_cache as kv
from specedge_jax.models.model_config import ModelConfig

_INIT = nnx.initializers.normal(stddev=0.02)


class RMSNorm(nnx.Module):
  """RMSNorm as in HF: normalize in float32, cast back, then scale."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def _linear(fan_in, fan_out, use_bias, dtype, param_dtype, rngs):
  return nnx.Linear(fan_in, fan_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_INIT, bias_init=nnx.initializers.zeros, rngs=rngs)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, half-split convention (HF `rotate_half`).

  x: [B, T, Q or K, H]; positions: [B, T]; inv_freq: [H / 2].
  """
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H / 2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    self.config = c
    bias = c.attention_bias
    self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, bias, dtype, param_dtype, rngs)
    self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias, dtype, param_dtype,
                          rngs)
    self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias, dtype, param_dtype,
                          rngs)
    self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, False, dtype, param_dtype, rngs)
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=param_dtype)
      self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=param_dtype)

  def __call__(self, x, positions, inv_freq, mask, cache_k, cache_v, layer, slots, write_rows):
    """One attention layer.

    x: [B, T, D]; positions: [B, T]; mask: [B, T, S] (S = cache rows, or T without a cache).
    cache_k, cache_v: the stacked caches [L, M, S, K, H], or None for a cache-less forward.
    Returns (output [B, T, D], cache_k, cache_v).
    """
    c = self.config
    batch, seq = x.shape[:2]
    q = self.q_proj(x).reshape(batch, seq, c.num_heads, c.head_dim)  # [B, T, Q, H]
    k = self.k_proj(x).reshape(batch, seq, c.num_kv_heads, c.head_dim)  # [B, T, K, H]
    v = self.v_proj(x).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)

    if cache_k is not None:
      # Write first, then attend: the mask alone decides what is visible, including the new
      # tokens themselves (causal or tree structure). Only the first `mask.shape[-1]` rows are
      # read: callers bound that by the live prefix (see `attend_rows`), so a step's KV traffic
      # follows the context, not the cache's max_len.
      cache_k = kv.write_layer(cache_k, layer, slots, write_rows, k)
      cache_v = kv.write_layer(cache_v, layer, slots, write_rows, v)
      rows = mask.shape[-1]
      keys = cache_k[layer, slots, :rows].astype(x.dtype)  # [B, S, K, H]
      values = cache_v[layer, slots, :rows].astype(x.dtype)
    else:
      keys, values = k, v

    # Grouped-query attention with an arbitrary boolean mask (causal, tree or padding): XLA's
    # implementation everywhere, cuDNN's where JAX selects it on GPU. Scores are float32.
    out = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None, :, :],
                                       scale=c.head_dim**-0.5)  # [B, T, Q, H]
    out = out.reshape(batch, seq, c.num_heads * c.head_dim)
    return self.o_proj(out), cache_k, cache_v


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, f, False, dtype, param_dtype, rngs)
    self.up_proj = _linear(d, f, False, dtype, param_dtype, rngs)
    self.down_proj = _linear(f, d, False, dtype, param_dtype, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                  param_dtype=param_dtype)
    self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, inv_freq, mask, cache_k, cache_v, layer, slots, write_rows):
    attn_out, cache_k, cache_v = self.attn(self.input_norm(x), positions, inv_freq, mask, cache_k,
                                           cache_v, layer, slots, write_rows)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return x, cache_k, cache_v


class Transformer(nnx.Module):
  """Decoder-only LM. `__call__` is the one entry point for every kind of forward."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                           param_dtype=param_dtype, embedding_init=_INIT, rngs=rngs)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(layer_rngs):
      return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=layer_rngs)

    self.layers = make_layers(rngs)  # every parameter has a leading [L] axis
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, param_dtype,
                             rngs)

  def __call__(
      self,
      tokens: jax.Array,  # [B, T] int32
      positions: jax.Array,  # [B, T] int32, RoPE positions
      attention_mask: jax.Array,  # [B, T, S] bool, S = cache rows (or T when cache is None)
      cache: kv.KVCache | None = None,
      slots: jax.Array | None = None,  # [B] int32, the cache slot of each lane
      write_rows: jax.Array | None = None,  # [B, T] int32, cache row of each token; DROP_ROW skips
      logits_at: jax.Array | None = None,  # [B, O] int32: compute logits only at these tokens
      layer_states: list[nnx.State] | None = None,  # per-layer weights, see `unstack_layers`
  ) -> tuple[jax.Array, kv.KVCache | None]:
    """Runs the decoder.

    With a cache, each token's key/value is written to row `write_rows[b, t]` of slot `slots[b]`
    before attention, and token t of lane b attends to the cache rows where
    `attention_mask[b, t]` is true. Without a cache, the mask is over the T tokens themselves.

    By default the stacked layers run in a `lax.scan`. With `layer_states` (one state per layer,
    from `unstack_layers`, made outside jit) they run in a Python loop over separate arrays
    instead: XLA:CPU copies each layer's weight slice out of the stacked arrays inside the scan,
    a cost that matters when the step itself is small (single lane, single token), while the
    loop's program grows with depth (figures: docs/notes/measurement.md). The result is the
    same either way, up to float rounding.

    Returns:
      logits [B, T, V] (or [B, O, V] with `logits_at`), float32; and the updated cache (None
      without one).
    """
    x = self.embed(tokens)
    # A trace-time constant: RoPE frequencies depend only on the config.
    inv_freq = jnp.asarray(self.config.rope_inverse_frequencies(), jnp.float32)
    if cache is not None:
      cache_k, cache_v = cache.k, cache.v
    else:
      cache_k = cache_v = None

    if layer_states is None:
      x, cache_k, cache_v = scan_layers(self.layers, x, positions, inv_freq, attention_mask,
                                        cache_k, cache_v, slots, write_rows)
    else:
      if len(layer_states) != self.config.num_layers:
        raise ValueError(f"{len(layer_states)} layer states for {self.config.num_layers} layers")
      body = _layer_body(nnx.graphdef(self.layers), positions, inv_freq, attention_mask, slots,
                         write_rows)
      carry = (x, cache_k, cache_v, jnp.int32(0))
      for layer_params in layer_states:
        carry, _ = body(carry, layer_params)
      x, cache_k, cache_v, _ = carry

    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = self.final_norm(x)
    if self.config.tie_word_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    new_cache = kv.KVCache(k=cache_k, v=cache_v) if cache is not None else None
    return logits.astype(jnp.float32), new_cache


def _layer_body(graphdef, positions, inv_freq, mask, slots, write_rows):
  """The scan body over stacked decoder layers: merges one layer's parameters and runs it; the
  carry is (hidden, cache k, cache v, layer index)."""

  def body(carry, layer_params):
    h, ck, cv, layer = carry
    h, ck, cv = nnx.merge(graphdef, layer_params)(h, positions, inv_freq, mask, ck, cv, layer,
                                                 slots, write_rows)
    return (h, ck, cv, layer + 1), None

  return body


def scan_layers(layers: nnx.Module, x, positions, inv_freq, mask, cache_k, cache_v, slots,
                write_rows):
  """Runs stacked decoder `layers` (leading axis: layer) over x in one `lax.scan`; layer i
  reads and writes layer i of the cache. Returns (x, cache_k, cache_v).

  The layers are split outside the scan and merged inside: the body then sees plain arrays
  (one layer's slice), which keeps the traced program to a single layer whatever the depth.
  Used by the whole model and by its layer-split parts (`layer_split.py`)."""
  graphdef, layer_state = nnx.split(layers)
  body = _layer_body(graphdef, positions, inv_freq, mask, slots, write_rows)
  (x, cache_k, cache_v, _), _ = jax.lax.scan(body, (x, cache_k, cache_v, jnp.int32(0)),
                                             layer_state)
  return x, cache_k, cache_v


class StaticGraph:
  """An `nnx.GraphDef` as a cheap static jit argument.

  jit hashes static arguments on every call, and hashing a GraphDef walks the whole module
  graph, which costs more than a tiny model's forward. This wrapper hashes once and compares
  by identity first, so an engine that keeps one wrapper pays nothing per call, while equal
  graphs from different engines still share compiled code.
  """

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, StaticGraph) and (self.graphdef is other.graphdef
                                               or self.graphdef == other.graphdef)


def unstack_layers(model: "Transformer") -> list[nnx.State]:
  """Each layer's parameters as arrays of their own (copies, made once, outside jit): the
  `layer_states` argument of `Transformer.__call__`."""
  _, stacked = nnx.split(model.layers)
  return [jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
          for i in range(model.config.num_layers)]


@struct.dataclass
class LayerwiseState:
  """A model's weights with every decoder layer in arrays of its own.

  `shell` is the model's state with each stacked [L, ...] layer leaf replaced by a zero-size
  placeholder (the graph still needs a leaf there, and the weights are then held once, in
  `layers`). `bind` runs such a state with the layers looped in Python inside jit, so each layer's
  dot reads its own weight buffer: no per-step slice of a stacked array (models/hlo.py).
  """
  shell: nnx.State
  layers: tuple[nnx.State, ...]


def split_model(model: "Transformer", *, layerwise: bool = False,
                consume: bool = False) -> tuple[StaticGraph, nnx.State | LayerwiseState]:
  """(static graph, state) for passing a model into the project's jitted functions.

  With `layerwise`, the state is a `LayerwiseState`: the engines use it so that compiled verify,
  decode and prefill copy no weight per layer (the notes' "layer scan's weight copies"), at the
  cost of a program that grows with depth. Its layer weights are new arrays (slices of the
  stacked ones). With `consume`, each stacked array is deleted as soon as it is sliced, so the
  peak is the weights plus one stacked leaf instead of twice the weights (a 14B target: 30 GB,
  not 59); the model is unusable afterwards.
  """
  graphdef, state = nnx.split(model)
  if not layerwise:
    return StaticGraph(graphdef), state
  _, stacked = nnx.split(model.layers)
  leaves, treedef = jax.tree.flatten(stacked)
  num_layers = model.config.num_layers
  per_layer: list[list[jax.Array]] = [[] for _ in range(num_layers)]
  for leaf in leaves:
    for i in range(num_layers):
      per_layer[i].append(leaf[i])
    if consume:
      jax.block_until_ready(per_layer[-1][-1])
      leaf.delete()
  layers = tuple(jax.tree.unflatten(treedef, arrays) for arrays in per_layer)
  shell = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.zeros((0,), leaf.dtype) if _is_layer_path(path) else leaf, state)
  return StaticGraph(graphdef), LayerwiseState(shell=shell, layers=layers)


def _is_layer_path(path) -> bool:
  return bool(path) and getattr(path[0], "key", None) == "layers"


def bind(graphdef: StaticGraph, model_state: nnx.State | LayerwiseState):
  """The callable model for a `split_model` state, inside jit: `bind(g, s)(tokens, ...)`."""
  if isinstance(model_state, LayerwiseState):
    model = nnx.merge(graphdef.graphdef, model_state.shell)
    return functools.partial(model, layer_states=list(model_state.layers))
  return nnx.merge(graphdef.graphdef, model_state)


def causal_mask(lengths: jax.Array, seq_len: int) -> jax.Array:
  """[B, T, T] causal mask with right padding: token t sees tokens <= t inside its length."""
  idx = jnp.arange(seq_len)
  causal = idx[None, :, None] >= idx[None, None, :]
  valid = idx[None, None, :] < lengths[:, None, None]
  return causal & valid


def count_parameters(model_or_state) -> int:
  """Parameters of a model, of a parameter state, or of a `ModelConfig`'s model (counted from
  its shapes, without allocating it)."""
  if isinstance(model_or_state, ModelConfig):
    config = model_or_state
    model_or_state = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
