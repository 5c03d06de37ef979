"""Invariant 1: the Flax model's logits equal HF transformers' PyTorch logits (fp32).

Three forwards per family: ragged batched prefill, step-by-step cached decoding, and a
tree-masked forward whose every node must equal the sequential run of its root-to-node path.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from specedge_jax.checkpoints import hf
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.transformer import causal_mask
from specedge_jax.testing.configs import HF_FAMILIES

ATOL = 1e-4


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))[None]).logits[0].numpy()


@pytest.mark.parametrize("family", HF_FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_prefill_ragged_batch_matches_hf(hf_checkpoint_dir, family, tie):
  if tie and family != "qwen3":
    pytest.skip("tied embeddings checked on one family")
  folder, hf_model = hf_checkpoint_dir(family, tie)
  model = hf.load_hf_model(folder)
  rng = np.random.default_rng(0)
  lengths = [11, 4, 7]
  seq = max(lengths)
  tokens = np.zeros((3, seq), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(0, 97, n)
  positions = jnp.broadcast_to(jnp.arange(seq), (3, seq))
  logits, _ = model(jnp.asarray(tokens), positions, causal_mask(jnp.asarray(lengths), seq))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(logits[b, :n]), hf_logits(hf_model, tokens[b, :n]), atol=ATOL)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_cached_decode_matches_hf(hf_checkpoint_dir, family):
  folder, hf_model = hf_checkpoint_dir(family)
  model = hf.load_hf_model(folder)
  max_len = 32
  cache = kv.KVCache.init(model.config, num_slots=3, max_len=max_len)
  sequence = np.random.default_rng(1).integers(0, 97, 12).astype(np.int32)
  reference = hf_logits(hf_model, sequence)
  slot = jnp.array([1], jnp.int32)  # a middle slot: the others must stay untouched
  prompt = 5
  mask = (jnp.arange(max_len)[None, None, :] <= jnp.arange(prompt)[None, :, None])
  logits, cache = model(jnp.asarray(sequence[None, :prompt]), jnp.arange(prompt)[None], mask,
                        cache, slot, jnp.arange(prompt)[None])
  np.testing.assert_allclose(np.asarray(logits[0]), reference[:prompt], atol=ATOL)
  for t in range(prompt, len(sequence)):
    mask = jnp.arange(max_len)[None, None, :] <= t
    logits, cache = model(jnp.asarray(sequence[None, t:t + 1]), jnp.array([[t]]), mask, cache,
                          slot, jnp.array([[t]]))
    np.testing.assert_allclose(np.asarray(logits[0, 0]), reference[t], atol=ATOL)
  assert not np.asarray(cache.k[:, 0]).any() and not np.asarray(cache.k[:, 2]).any()


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_tree_masked_forward_matches_sequential_paths(hf_checkpoint_dir, family):
  """A prefix in the cache, then a whole tree in one call with the ancestor mask."""
  folder, hf_model = hf_checkpoint_dir(family)
  model = hf.load_hf_model(folder)
  rng = np.random.default_rng(2)
  prefix = rng.integers(0, 97, 6).astype(np.int32)
  # Node 0 is the root; parents[i] < i. Two branches off the root, one deeper chain.
  parents = np.array([-1, 0, 0, 1, 1, 3, 2, 6])
  tree_tokens = rng.integers(0, 97, len(parents)).astype(np.int32)
  depth = np.zeros(len(parents), np.int32)
  ancestors = np.eye(len(parents), dtype=bool)
  for i in range(1, len(parents)):
    depth[i] = depth[parents[i]] + 1
    ancestors[i] |= ancestors[parents[i]]
  max_len = 24
  p = len(prefix)
  cache = kv.KVCache.init(model.config, num_slots=1, max_len=max_len)
  slot = jnp.array([0], jnp.int32)
  mask = jnp.arange(max_len)[None, None, :] <= jnp.arange(p)[None, :, None]
  _, cache = model(jnp.asarray(prefix[None]), jnp.arange(p)[None], mask, cache, slot,
                   jnp.arange(p)[None])
  n = len(parents)
  tree_mask = np.zeros((1, n, max_len), bool)
  tree_mask[0, :, :p] = True
  tree_mask[0, :, p:p + n] = ancestors
  logits, _ = model(jnp.asarray(tree_tokens[None]), jnp.asarray(p + depth)[None],
                    jnp.asarray(tree_mask), cache, slot, jnp.asarray(p + np.arange(n))[None])
  for i in range(n):
    path = [i]
    while parents[path[-1]] >= 0:
      path.append(parents[path[-1]])
    sequence = np.concatenate([prefix, tree_tokens[path[::-1]]])
    np.testing.assert_allclose(np.asarray(logits[0, i]), hf_logits(hf_model, sequence)[-1], atol=ATOL)


@pytest.mark.slow
def test_unstacked_layers_give_the_same_logits_and_cache():
  """`layer_states` (per-layer weight arrays, looped in Python) computes what the stacked layer
  scan does: the same logits and cache rows, up to float32 rounding (the scan's body is compiled,
  the loop here runs op by op)."""
  import jax
  from flax import nnx

  from specedge_jax.models import model_config as config_lib
  from specedge_jax.models import transformer as model_lib

  model = model_lib.Transformer(config_lib.tiny_config("qwen3", num_layers=3),
                                rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 5)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
  mask = causal_mask(jnp.array([5, 3]), 5)
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 3)))  # 8 cache rows, 5 written
  slots = jnp.array([1, 0], jnp.int32)
  forward = lambda states: model(tokens, positions, mask, kv.KVCache.init(model.config, 2, 8),
                                 slots, positions, layer_states=states)
  stacked_logits, stacked_cache = forward(None)
  loop_logits, loop_cache = forward(model_lib.unstack_layers(model))
  np.testing.assert_allclose(np.asarray(loop_logits), np.asarray(stacked_logits), atol=1e-6)
  for a, b in zip(jax.tree.leaves(loop_cache), jax.tree.leaves(stacked_cache)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  with pytest.raises(ValueError, match="2 layer states for 3 layers"):
    forward(model_lib.unstack_layers(model)[:2])
