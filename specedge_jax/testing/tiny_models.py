"""Tiny target/draft pairs for the speculative-core tests.

The target's head is sharpened so next-token distributions are peaked, as a trained model's
are; the draft is the target with noise added to every parameter, so it agrees often but not
always and accepted lengths vary from step to step.
"""

import jax
import numpy as np
from flax import nnx

from specedge_jax.models import model_config as config_lib
from specedge_jax.models import transformer as model_lib


def make_pair(vocab_size: int = 64, *, sharpen: float = 20.0, noise: float = 0.02,
              seed: int = 0, num_layers: int = 2):
  config = config_lib.tiny_config("qwen3", vocab_size=vocab_size, num_layers=num_layers)
  target = model_lib.Transformer(config, rngs=nnx.Rngs(seed))
  target.lm_head.kernel[...] = target.lm_head.kernel[...] * sharpen
  draft = nnx.clone(target)
  key = jax.random.PRNGKey(seed + 1)
  state = nnx.state(draft, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  noisy = [leaf + noise * jax.random.normal(k, leaf.shape) * (sharpen if leaf.ndim == 2 and
                                                              leaf.shape[-1] == vocab_size else 1)
           for leaf, k in zip(leaves, keys)]
  nnx.update(draft, jax.tree.unflatten(treedef, noisy))
  return target, draft


def prompts(count: int, vocab_size: int, seed: int = 0, min_len: int = 1, max_len: int = 24):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(0, vocab_size, rng.integers(min_len, max_len + 1))]
          for _ in range(count)]
