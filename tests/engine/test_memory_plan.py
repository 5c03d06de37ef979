"""The memory planner (issue 13): its weight and KV figures are the bytes of the arrays the
engine then allocates, per device, on one device and on meshes of the 4 host devices; its
activation estimate is within a factor of the compiled verify's own temp size; and a
configuration over the devices' memory is refused with advice that itself fits."""

import contextlib

import jax
import numpy as np
import pytest

from specedge_jax.bench import core as core_bench
from specedge_jax.engine import memory_plan as mp
from specedge_jax.engine.target import TargetEngine
from specedge_jax.models import model_config as config_lib
from specedge_jax.models import sharding
from specedge_jax.models import transformer as model_lib
from specedge_jax.spec import verify as verify_lib

CONFIG = config_lib.tiny_config("qwen3", vocab_size=128, num_heads=8, num_kv_heads=4, head_dim=8,
                                intermediate_size=64, tie_word_embeddings=False)
SIZES = dict(max_len=128, num_slots=4, max_batch_size=4, max_tree_nodes=9)


def engine_for(mesh_shape):
  from flax import nnx

  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh(mesh_shape) if mesh_shape["data"] * mesh_shape["model"] > 1 else None
  return TargetEngine(model, num_slots=SIZES["num_slots"], max_len=SIZES["max_len"],
                      max_tree_nodes=SIZES["max_tree_nodes"],
                      max_batch_size=SIZES["max_batch_size"], mesh=mesh)


def shard_bytes(array) -> int:
  return array.addressable_shards[0].data.nbytes


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "model": 1}, {"data": 1, "model": 4},
                                        {"data": 2, "model": 2}], ids=str)
def test_plan_matches_the_arrays_the_engine_allocates(mesh_shape):
  if mesh_shape["data"] * mesh_shape["model"] > len(jax.devices()):
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
  plan = mp.plan(CONFIG, mesh=mesh_shape, **SIZES)
  engine = engine_for(mesh_shape)
  # The layerwise state holds every weight once (its placeholders are empty).
  assert plan.weights_bytes == sum(shard_bytes(leaf) for leaf in jax.tree.leaves(engine.state))
  assert plan.kv_cache_bytes == shard_bytes(engine.cache.k) + shard_bytes(engine.cache.v)

  args = core_bench.verify_inputs(np.random.default_rng(0), CONFIG.vocab_size,
                                  SIZES["max_batch_size"], SIZES["max_tree_nodes"], 0)
  placement = jax.set_mesh(engine.mesh) if engine.mesh is not None else contextlib.nullcontext()
  with placement:
    compiled = verify_lib.verify.lower(engine.graphdef, engine.state, engine.cache,
                                       *args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert 0.4 * temp <= plan.activation_bytes <= 2.5 * temp, (plan.activation_bytes, temp)


def test_an_oversized_configuration_is_refused_with_advice_that_fits():
  budget = 4 * 1024**2  # a 4 MiB "device"
  plan = mp.plan(CONFIG, device_bytes=budget, device_label="test device",
                 **dict(SIZES, num_slots=64, max_len=512))
  assert not plan.fits
  with pytest.raises(mp.MemoryPlanError, match=r"at most (\d+) slots fit") as error:
    mp.check_fits(plan)
  assert "test device" in str(error.value) and "KV cache" in str(error.value)
  slots = plan.max_slots()
  assert 0 < slots < 64
  assert mp.plan(CONFIG, device_bytes=budget, **dict(SIZES, num_slots=slots, max_len=512)).fits
  assert not mp.plan(CONFIG, device_bytes=budget,
                     **dict(SIZES, num_slots=slots + 1, max_len=512)).fits


def test_weights_that_need_a_wider_model_axis_say_so():
  big = config_lib.tiny_config("qwen3", vocab_size=32000, hidden_size=512, num_heads=8,
                               num_kv_heads=4, head_dim=64, intermediate_size=2048,
                               num_layers=4, tie_word_embeddings=False)
  totals = {m: mp.plan(big, mesh={"data": 1, "model": m}, **SIZES).total_bytes
            for m in (1, 2, 4)}
  # A device between what a model axis of 2 and of 4 need: the advice must be 4.
  device = int((totals[2] + totals[4]) / 2 / mp.DEFAULT_HEADROOM)
  plan = mp.plan(big, device_bytes=device, **SIZES)
  with pytest.raises(mp.MemoryPlanError, match="model axis of 4") as error:
    mp.check_fits(plan)
  assert "no room for one slot" in str(error.value) and "bf16" in str(error.value)
  assert mp.plan(big, device_bytes=device, mesh={"data": 1, "model": 4}, **SIZES).fits


def test_table_names_every_part():
  text = mp.plan(CONFIG, device_bytes=1024**3, device_label="cpu", **SIZES).table()
  for word in ("weights", "KV cache", "activations", "total", "budget"):
    assert word in text


def test_serving_plan_reads_the_checkpoint_config_only():
  import dataclasses

  from specedge_jax.serving import runners
  from specedge_jax.testing.live_stack import embedded_config

  config = embedded_config()
  plan = runners.plan_target_memory(config)
  assert plan.fits and plan.weights_bytes > 0
  tight = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                 device_memory_gb=0.03))
  with pytest.raises(mp.MemoryPlanError, match=r"at most \d+ slots fit"):
    runners.plan_target_memory(tight)


@pytest.mark.slow  # a launcher subprocess (~10 s)
@pytest.mark.heavy
def test_the_verifier_launcher_refuses_an_oversized_config_before_loading():
  import subprocess
  import sys

  proc = subprocess.run(
      [sys.executable, "-m", "launch.verifier", "--allow_insecure",
       "--config.server.device_memory_gb=0.01"], capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "verifier: the verifier's configuration needs" in proc.stderr
  assert "Traceback" not in proc.stderr and "target model loaded" not in proc.stderr
