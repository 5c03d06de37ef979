"""Defects of the reference implementation (kaist-ina/specedge) that this project avoids, each
pinned where a test makes sense (docs/reference_parity.md lists them all).

* Its `util.sampler_from_logits(top_p=0.8)` sorts descending and drops the tokens whose
  cumulative probability is <= 1 - top_p: the head of the distribution, the likeliest tokens.
  Ours keeps the smallest head whose mass reaches top_p and drops the tail.
* Draft KV rows after a proactive hit: held by
  tests/engine/test_speculative.py::test_a_tree_after_a_proactive_hit_fills_the_main_budget
  (outputs exact after every hit, trees full-size).
"""

import jax.numpy as jnp
import numpy as np

from specedge_jax.spec import sampling


def test_top_p_keeps_the_head_of_the_distribution_and_drops_the_tail():
  probs = np.array([0.18, 0.16, 0.14, 0.12, 0.11, 0.10, 0.08, 0.06, 0.03, 0.02], np.float32)
  logits = jnp.log(jnp.asarray(probs))[None, None, :]
  kept = np.exp(np.asarray(sampling.processed_log_probs(
      logits, jnp.array([1.0]), jnp.array([0.8]), jnp.array([0]))))[0, 0]
  # Ours: the likeliest 6 tokens reach 0.81 >= 0.8 and stay, renormalized; the tail goes.
  np.testing.assert_allclose(kept[:6], probs[:6] / probs[:6].sum(), rtol=1e-5)
  assert not kept[6:].any()
  # The reference's filter (descending sort, drop cumulative <= 1 - top_p) drops the likeliest
  # token instead and keeps the tail: a different distribution from the target's nucleus.
  reference_keeps = np.cumsum(probs) > 1 - 0.8
  assert not reference_keeps[0] and reference_keeps[8] and reference_keeps[9]


def test_top_p_one_keeps_everything_and_a_tiny_top_p_keeps_the_argmax():
  probs = np.array([0.1, 0.6, 0.3], np.float32)
  logits = jnp.log(jnp.asarray(probs))[None, None, :]
  full = np.exp(np.asarray(sampling.processed_log_probs(
      logits, jnp.array([1.0]), jnp.array([1.0]), jnp.array([0]))))[0, 0]
  np.testing.assert_allclose(full, probs, atol=1e-6)
  tiny = np.exp(np.asarray(sampling.processed_log_probs(
      logits, jnp.array([1.0]), jnp.array([1e-6]), jnp.array([0]))))[0, 0]
  np.testing.assert_allclose(tiny, [0.0, 1.0, 0.0], atol=1e-6)
