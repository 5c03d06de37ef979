"""The sharded verifier (issue 13): tensor parallelism over heads and the MLP, the KV cache over
kv heads, a data axis over slots, on the 4 host devices tests/conftest.py asks XLA for.

Checked against the same engine on one device: logits within float tolerance, greedy tokens
equal, speculative output equal to target-only output, donation kept, and the cache's placement
unchanged across calls (so no recompilation).
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from specedge_jax import api
from specedge_jax import engine as E
from specedge_jax.models import model_config as config_lib
from specedge_jax.models import sharding
from specedge_jax.models import transformer as model_lib
from specedge_jax.spec import verify as verify_lib
from specedge_jax.testing import tiny_models

VOCAB = 64
MESHES = {"model4": {"data": 1, "model": 2 * 2}, "data2_model2": {"data": 2, "model": 2}}

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")


def pair_with_four_kv_heads():
  """A tiny pair whose head counts the model axis (4) divides."""
  config = config_lib.tiny_config("qwen3", vocab_size=VOCAB, num_heads=8, num_kv_heads=4,
                                  head_dim=8, intermediate_size=64)
  target = model_lib.Transformer(config, rngs=__import__("flax").nnx.Rngs(0))
  target.lm_head.kernel[...] = target.lm_head.kernel[...] * 20.0
  _, draft = tiny_models.make_pair(VOCAB)  # any draft: only speed depends on it
  return config, target, draft


@pytest.fixture(scope="module")
def models():
  return pair_with_four_kv_heads()


def make_engine(target, mesh=None, **kwargs):
  kwargs = dict(dict(num_slots=4, max_len=64, max_tree_nodes=9, max_batch_size=4,
                     attention_min_rows=64), **kwargs)  # one bucket: fewer compiles
  return E.TargetEngine(target, mesh=mesh, **kwargs)


def test_parse_mesh_shape_and_errors():
  assert sharding.parse_mesh_shape("") == {"data": 1, "model": 1}
  assert sharding.parse_mesh_shape("model=4") == {"data": 1, "model": 4}
  assert sharding.parse_mesh_shape("data=2, model=2") == {"data": 2, "model": 2}
  for bad, word in (("tensor=2", "AXIS=SIZE"), ("model=0", ">= 1"), ("model", "AXIS=SIZE")):
    with pytest.raises(ValueError, match=word):
      sharding.parse_mesh_shape(bad)
  with pytest.raises(ValueError, match="needs 8 devices, but 4"):
    sharding.make_mesh({"data": 2, "model": 4})


def test_indivisible_configs_are_refused_naming_the_dimension(models):
  config, target, _ = models
  with pytest.raises(ValueError, match="num_key_value_heads 2 is not a multiple"):
    sharding.check_config(config_lib.tiny_config(), {"data": 1, "model": 4})
  with pytest.raises(ValueError, match="num_slots 3 is not a multiple of the data axis 2"):
    make_engine(target, sharding.make_mesh(MESHES["data2_model2"]), num_slots=3)


def test_weights_and_cache_are_placed_as_specified(models):
  config, target, _ = models
  engine = make_engine(target, sharding.make_mesh(MESHES["model4"]))
  layer0 = engine.state.layers[0]
  assert layer0["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "model")
  assert layer0["attn"]["o_proj"]["kernel"].sharding.spec == P("model", None)
  assert layer0["mlp"]["down_proj"]["kernel"].sharding.spec == P("model", None)
  # Each device holds a quarter of the q projection (2 of 8 heads) and one of 4 kv heads.
  assert layer0["attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape == (32, 16)
  assert engine.cache.k.addressable_shards[0].data.shape[3] == config.num_kv_heads // 4
  assert engine.cache.k.sharding.spec == sharding.CACHE_SPEC


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_logits_match_one_device(models, mesh_name):
  config, target, _ = models
  mesh = sharding.make_mesh(MESHES[mesh_name])
  graphdef, state = model_lib.split_model(target, layerwise=True)
  shardings = sharding.state_shardings(state, config, mesh)
  sharded_state = jax.device_put(state, shardings)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  mask = model_lib.causal_mask(jnp.array([12, 7]), 12)

  @jax.jit
  def logits(state):
    return model_lib.bind(graphdef, state)(tokens, positions, mask)[0]

  expected = logits(state)
  with jax.set_mesh(mesh):
    got = logits(sharded_state)
  q_kernel = sharded_state.layers[0]["attn"]["q_proj"]["kernel"]
  assert q_kernel.sharding.spec == P(None, "model"), "the test would compare replicas"
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_engine_greedy_equals_one_device_and_keeps_donation(models, mesh_name):
  _, target, _ = models
  prompts = tiny_models.prompts(4, VOCAB, seed=3, min_len=5, max_len=30)
  reference = E.generate(make_engine(target), prompts, max_new_tokens=12).tokens
  engine = make_engine(target, sharding.make_mesh(MESHES[mesh_name]))
  assert E.generate(engine, prompts, max_new_tokens=12).tokens == reference

  before_prefill = engine.cache.k
  slot, _, _ = engine.open(prompts[0], api.GREEDY, 0, 12)
  assert before_prefill.is_deleted(), "prefill copied the cache instead of donating it"
  before, placement = engine.cache.k, engine.cache.k.sharding
  compiled = verify_lib.verify._cache_size()
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message=".*donated.*")  # "donated buffers were not usable"
    engine.decode([slot])
    engine.decode([slot])
  # generate() compiled decode at batch 4 only; this batch-1 decode compiled once, then reused.
  compiled += 1
  assert before.is_deleted(), "the cache was copied, not donated, under sharding"
  assert engine.cache.k.sharding.is_equivalent_to(placement, engine.cache.k.ndim)
  assert verify_lib.verify._cache_size() == compiled, "steady-state decode recompiled"


def test_sharded_speculative_greedy_equals_target_only(models):
  _, target, draft = models
  prompts = tiny_models.prompts(3, VOCAB, seed=5, min_len=3, max_len=20)
  reference = E.generate(make_engine(target), prompts, max_new_tokens=12).tokens
  engine = make_engine(target, sharding.make_mesh(MESHES["model4"]))
  drafter = E.DraftEngine(draft, num_slots=4, max_len=64,
                          tree=E.TreeParams(max_n_beams=4, max_beam_len=3, max_branch_width=2,
                                            max_budget=8))
  out = E.generate(engine, prompts, draft=drafter, max_new_tokens=12)
  assert out.tokens == reference


def test_tensor_parallel_verify_sends_two_all_reduces_per_layer_and_no_cache(models):
  """Megatron's pattern: one all-reduce of the [B, T, D] activations after attention and one
  after the MLP, per layer; no key or value crosses devices. The rest is sampling over the
  vocabulary-sharded logits (this pair's LM head is untied): at most logits-sized. With a data
  axis the lanes' rows are also gathered across it (an all-reduce of [B, S, K/m, H] per layer:
  the known cost of that axis, WORKSPACE_NOTES.md)."""
  from specedge_jax.bench import core as core_bench
  from specedge_jax.models import hlo

  config, target, _ = models
  batch, nodes = 4, 9
  args = core_bench.verify_inputs(np.random.default_rng(0), VOCAB, batch, nodes, 8)
  found = {}
  for name in ("model4", "data2_model2"):
    engine = make_engine(target, sharding.make_mesh(MESHES[name]))
    with jax.set_mesh(engine.mesh):
      found[name] = hlo.collectives(hlo.compiled_text(
          verify_lib.verify, engine.graphdef, engine.state, engine.cache, *args))
  activations = f"f32[{batch},{nodes},{config.hidden_size}]"
  for name in found:
    assert found[name].count(("all-reduce", activations)) == 2 * config.num_layers, name
  logits_size = batch * nodes * VOCAB
  others = [c for c in found["model4"] if c != ("all-reduce", activations)]
  sizes = [int(np.prod([int(d) for d in re.findall(r"\[([\d,]*)\]", shape)[0].split(",")]))
           for _, shape in others]
  assert others and max(sizes) <= logits_size, others
