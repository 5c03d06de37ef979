"""`models/layer_split.py`: the head then the tail is the model, for every split layer.

The reference for every check is the model's own uncached forward over the whole sequence. The
split runs as it serves: the jitted prefill chunks (ragged prompts, two slots, a chunk smaller
than the prompt) and then batched decode steps with a padded lane, each part on its own cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from specedge_jax.models import kv_cache as kv
from specedge_jax.models import layer_split as ls
from specedge_jax.models.model_config import tiny_config
from specedge_jax.models.transformer import Transformer, causal_mask, count_parameters, split_model

NUM_LAYERS = 4
ATOL = 1e-5  # fp32; the split runs the model's own ops, so the observed difference is ~0


def make_model(family: str = "qwen3", tie: bool = False) -> Transformer:
  config = tiny_config(family, num_layers=NUM_LAYERS, tie_word_embeddings=tie)
  return Transformer(config, rngs=nnx.Rngs(3))


def full_logits(model: Transformer, sequence: np.ndarray) -> np.ndarray:
  """The model's uncached forward over one sequence: [T, V]."""
  n = len(sequence)
  logits, _ = model(jnp.asarray(sequence[None], jnp.int32), jnp.arange(n)[None],
                    causal_mask(jnp.array([n]), n))
  return np.asarray(logits[0])


@pytest.mark.parametrize("family,tie,split_layer",
                         [("qwen3", False, layer) for layer in range(NUM_LAYERS + 1)]
                         + [("qwen3", True, 2), ("llama", False, 2)])
def test_uncached_head_then_tail_equals_the_model(family, tie, split_layer):
  model = make_model(family, tie)
  rng = np.random.default_rng(split_layer)
  lengths = [9, 4]
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (2, 9)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mask = causal_mask(jnp.asarray(lengths), 9)
  want, _ = model(tokens, positions, mask)
  head, tail = ls.split(model, split_layer)
  hidden, _ = head(tokens, positions, mask)
  assert hidden.shape == (2, 9, model.config.hidden_size)
  got, _ = tail(hidden, positions, mask)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(got[b, :n]), np.asarray(want[b, :n]), atol=ATOL)


# Every split layer once; the tied LM head (the tail keeps the embedding) at two of them.
@pytest.mark.parametrize("split_layer,tie", [
    (0, False), (1, False), (2, True),
    # The edges (nothing on the tail's side but the head) in the full suite only.
    pytest.param(3, False, marks=pytest.mark.slow), pytest.param(4, True, marks=pytest.mark.slow)])
def test_cached_prefill_and_decode_equal_the_model(tie, split_layer):
  model = make_model("qwen3", tie)
  vocab, max_len, chunk = model.config.vocab_size, 32, 4
  head, tail = ls.split(model, split_layer)
  head_graph, head_state = split_model(head)
  tail_graph, tail_state = split_model(tail)
  head_cache = ls.init_cache(head, num_slots=3, max_len=max_len)
  tail_cache = ls.init_cache(tail, num_slots=3, max_len=max_len)
  assert head_cache.k.shape[0] == split_layer
  assert tail_cache.k.shape[0] == NUM_LAYERS - split_layer

  rng = np.random.default_rng(10 + split_layer)
  prompt_lens = {1: 7, 2: 3}  # slot -> prompt length; slot 0 stays empty
  sequences = {slot: rng.integers(0, vocab, n + 5).astype(np.int32)
               for slot, n in prompt_lens.items()}
  references = {slot: full_logits(model, seq) for slot, seq in sequences.items()}

  for slot, n in prompt_lens.items():
    for start in range(0, n, chunk):  # chunks of 4: the last one is padded
      count = min(chunk, n - start)
      buffer = np.zeros(chunk, np.int32)
      buffer[:count] = sequences[slot][start:start + count]
      head_cache, hidden = ls.head_prefill_chunk(head_graph, head_state, head_cache,
                                                 np.int32(slot), buffer, np.int32(start),
                                                 np.int32(count))
      tail_cache, logits = ls.tail_prefill_chunk(tail_graph, tail_state, tail_cache,
                                                 np.int32(slot), hidden, np.int32(start),
                                                 np.int32(count))
      np.testing.assert_allclose(np.asarray(logits), references[slot][start + count - 1],
                                 atol=ATOL)

  empty_slot = (np.asarray(head_cache.k)[:, 0].copy(), np.asarray(tail_cache.k)[:, 0].copy())
  # Decode both slots in one batch of 4 lanes: lanes 2 and 3 are padding aimed at slot 0.
  for step in range(5):
    slots = np.array([1, 2, 0, 0], np.int32)
    positions = np.array([prompt_lens[1] + step, prompt_lens[2] + step, 0, 0], np.int32)
    tokens = np.array([sequences[1][positions[0]], sequences[2][positions[1]], 5, 6], np.int32)
    live = np.array([True, True, False, False])
    head_cache, hidden = ls.head_decode(head_graph, head_state, head_cache, slots, tokens,
                                        positions, live)
    tail_cache, logits = ls.tail_decode(tail_graph, tail_state, tail_cache, slots, hidden,
                                        positions, live)
    for lane, slot in enumerate((1, 2)):
      np.testing.assert_allclose(np.asarray(logits[lane]), references[slot][positions[lane]],
                                 atol=ATOL)
  # Padded lanes wrote nothing.
  np.testing.assert_array_equal(np.asarray(head_cache.k)[:, 0], empty_slot[0])
  np.testing.assert_array_equal(np.asarray(tail_cache.k)[:, 0], empty_slot[1])


def test_parts_hold_only_their_own_layers_and_share_the_rest():
  model = make_model("qwen3", tie=False)
  head, tail = ls.split(model, 1)
  assert jax.tree.leaves(nnx.state(head.layers))[0].shape[0] == 1
  assert jax.tree.leaves(nnx.state(tail.layers))[0].shape[0] == NUM_LAYERS - 1
  # Untied: every parameter lives in exactly one part.
  assert count_parameters(head) + count_parameters(tail) == count_parameters(model)
  assert head.embed is model.embed and tail.lm_head is model.lm_head  # shared, not copied
  tied = make_model("qwen3", tie=True)
  tied_head, tied_tail = ls.split(tied, 2)
  embedding = tied.config.vocab_size * tied.config.hidden_size
  assert count_parameters(tied_head) + count_parameters(tied_tail) == (
      count_parameters(tied) + embedding)  # both ends need the tied embedding


@pytest.mark.parametrize("split_layer", [-1, NUM_LAYERS + 1])
def test_split_layer_out_of_range_is_refused(split_layer):
  with pytest.raises(ValueError, match=r"split_layer must be in \[0, 4\]"):
    ls.split(make_model(), split_layer)


def test_part_cache_has_the_model_cache_layout():
  model = make_model()
  head, tail = ls.split(model, 3)
  full = kv.KVCache.init(model.config, 2, 16)
  for part, layers in ((head, 3), (tail, 1)):
    cache = ls.init_cache(part, 2, 16)
    assert cache.k.shape == (layers, *full.k.shape[1:]) and cache.k.dtype == full.k.dtype
