"""Sampling parameters and the target-side token sampler.

`SamplingParams` (defined in `specedge_jax.api`) is what a user asks for. `sample_tokens` draws
one token per position from temperature / top-k / top-p processed logits, with each batch lane
carrying its own parameters as arrays, so one compiled function serves greedy and sampled requests mixed in a batch.

Temperature 0 means greedy (argmax). Top-k 0 and top-p 1 mean "off".

Shapes: see specedge_jax/shapes.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from specedge_jax.api import SamplingParams


def stack_params(params: list[SamplingParams]) -> dict[str, np.ndarray]:
  """Per-lane parameter arrays: temperature [B] f32, top_p [B] f32, top_k [B] i32."""
  return {
      "temperature": np.array([p.temperature for p in params], np.float32),
      "top_p": np.array([p.top_p for p in params], np.float32),
      "top_k": np.array([p.top_k for p in params], np.int32),
  }


def processed_log_probs(logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                        top_k: jax.Array) -> jax.Array:
  """Log-probabilities after temperature, top-k and top-p, as used for sampling.

  logits: [B, T, V]; temperature, top_p: [B] float; top_k: [B] int (0 = off).
  Lanes with temperature 0 are returned at temperature 1 (they are sampled by argmax anyway).
  Masked-out tokens get -inf.
  """
  vocab = logits.shape[-1]
  temp = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
  scaled = logits.astype(jnp.float32) / temp
  sorted_logits = jnp.sort(scaled, axis=-1)[..., ::-1]  # descending
  # Top-k: keep tokens at or above the k-th largest logit.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None, None]
  kth = jnp.take_along_axis(sorted_logits, k - 1, axis=-1)
  keep = scaled >= kth
  # Top-p (nucleus) on the top-k-filtered distribution: keep the smallest prefix of the sorted
  # tokens whose mass reaches top_p (the token that crosses the threshold is kept).
  sorted_masked = jnp.where(jnp.arange(vocab) < k, sorted_logits, -jnp.inf)
  sorted_probs = jax.nn.softmax(sorted_masked, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  in_nucleus = mass_before < top_p[:, None, None]
  # The smallest logit still in the nucleus is the threshold.
  threshold = jnp.min(jnp.where(in_nucleus, sorted_masked, jnp.inf), axis=-1, keepdims=True)
  keep = keep & (scaled >= threshold)
  return jax.nn.log_softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)


@jax.jit
def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array) -> jax.Array:
  """One token per position: [B, T] int32.

  keys: [B] PRNG keys, one per lane; each position of a lane gets an independent draw.

  The vocabulary sort behind top-k/top-p costs more than a small model's forward on CPU, so it
  runs only when some lane asks for it, and nothing but the argmax runs when every lane is
  greedy (`lax.cond` picks at run time; both branches are compiled once). It is jitted itself
  because the engine also calls it outside jit (the first token after prefill), where a
  `lax.cond` over fresh closures would otherwise be retraced and recompiled on every call.
  """
  seq = logits.shape[1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw_all(log_probs):
    def draw(key, lane_log_probs):
      return jax.random.categorical(key, lane_log_probs, axis=-1, shape=(seq,))
    return jax.vmap(draw)(keys, log_probs).astype(jnp.int32)

  def sampled():
    needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
    temp = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    log_probs = jax.lax.cond(
        needs_filter,
        lambda: processed_log_probs(logits, temperature, top_p, top_k),
        lambda: jax.nn.log_softmax(logits.astype(jnp.float32) / temp, axis=-1))
    return jnp.where((temperature > 0)[:, None], draw_all(log_probs), greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
