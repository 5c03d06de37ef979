"""Measurements behind `launch/bench_convert.py`: conversion peak memory and forward latency.

- `write_random_hf_checkpoint` writes a Qwen3-shaped HF folder of random weights, one tensor at
  a time (so generating a multi-GB checkpoint does not need that much memory).
- `peak_rss` runs a command in a subprocess and reports its peak resident set size, from
  `/usr/bin/time -v` when present and from psutil polling (every 10 ms) otherwise.
- `forward_latency` times the jitted, warm forward of a model for one decode token or a tree.

This module owns measurement only. It never changes how conversion or the model work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from flax import nnx

from specedge_jax.bench.backends import random_tree
from specedge_jax.checkpoints import hf, safetensors_io
from specedge_jax.models import kv_cache as kv
from specedge_jax.models.model_config import ModelConfig
from specedge_jax.models.transformer import Transformer


def qwen3_hf_config(*, hidden_size: int, num_layers: int, intermediate_size: int,
                    vocab_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    tie: bool) -> dict[str, Any]:
  """An HF config.json dict of a Qwen3-family model of the given size."""
  return {
      "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
      "hidden_size": hidden_size, "num_hidden_layers": num_layers,
      "intermediate_size": intermediate_size, "vocab_size": vocab_size,
      "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
      "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
      "tie_word_embeddings": tie, "attention_bias": False, "max_position_embeddings": 40960,
      "torch_dtype": "bfloat16",
  }


def write_random_hf_checkpoint(folder: str, hf_config: dict[str, Any], dtype: str = "bf16",
                               seed: int = 0) -> int:
  """Writes config.json + model.safetensors of random weights; returns the weight bytes."""
  os.makedirs(folder, exist_ok=True)
  config = ModelConfig.from_hf_dict(hf_config)
  np_dtype = np.dtype(hf.DTYPES[dtype])
  shapes = jax.tree.map(lambda a: tuple(a.shape), hf.abstract_params(config))
  specs = [(name, tuple(value.shape), np_dtype)
           for name, value in hf.hf_shapes(config, shapes)]
  rng = np.random.default_rng(seed)

  def tensors():
    for name, shape, _ in specs:
      yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

  path = os.path.join(folder, "model.safetensors")
  safetensors_io.write_safetensors(path, specs, tensors(), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  return sum(int(np.prod(s)) * np_dtype.itemsize for _, s, _ in specs)


@dataclasses.dataclass(frozen=True)
class PeakMemory:
  peak_rss_bytes: int
  wall_s: float
  method: str  # "/usr/bin/time -v" or "psutil polling"


def peak_rss(command: Sequence[str], cwd: str | None = None,
             env: dict[str, str] | None = None) -> PeakMemory:
  """Runs `command` to completion and returns its peak RSS. Raises if it fails."""
  time_bin = shutil.which("time", path="/usr/bin")
  start = time.perf_counter()
  if time_bin:
    result = subprocess.run([time_bin, "-v", *command], cwd=cwd, env=env, capture_output=True,
                            text=True)
    wall = time.perf_counter() - start
    if result.returncode:
      raise RuntimeError(f"{command} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if not match:
      raise RuntimeError(f"no peak RSS in /usr/bin/time output:\n{result.stderr[-2000:]}")
    return PeakMemory(int(match.group(1)) * 1024, wall, "/usr/bin/time -v")
  process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  watched = psutil.Process(process.pid)
  peak = 0
  while process.poll() is None:
    try:
      peak = max(peak, watched.memory_info().rss)
    except psutil.NoSuchProcess:
      break
    time.sleep(0.01)
  wall = time.perf_counter() - start
  if process.returncode:
    raise RuntimeError(f"{command} failed ({process.returncode}):\n{process.stderr.read()[-4000:]}")
  return PeakMemory(peak, wall, "psutil polling")


@dataclasses.dataclass(frozen=True)
class Latency:
  median_ms: float
  p10_ms: float
  p90_ms: float
  runs: int


def random_tree_mask(num_nodes: int, prefix_len: int, max_len: int, seed: int = 0):
  """(depth [N], mask [N, S]) of a random tree whose node i has a parent < i (see shapes.py)."""
  depth, ancestors = random_tree(np.random.default_rng(seed), num_nodes)
  mask = np.zeros((num_nodes, max_len), bool)
  mask[:, :prefix_len] = True
  mask[:, prefix_len:prefix_len + num_nodes] = ancestors
  return depth, mask


def forward_latency(config: ModelConfig, num_tokens: int, *, prefix_len: int = 256,
                    max_len: int = 512, runs: int = 50, warmup: int = 3,
                    dtype=jnp.float32) -> Latency:
  """Median wall time of one jitted forward of `num_tokens` tokens over a cached prefix.

  `num_tokens == 1` is a decode step; more is a random tree (ancestor mask, depth positions).
  The cache is donated and threaded through, as in serving.
  """
  model = Transformer(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  # Split outside jit, merge inside: the state is a traced argument, not a baked-in constant.
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnames=("cache",))
  def step(state, cache, tokens, positions, mask, slots, rows):
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, mask, cache, slots, rows)
    return logits, cache

  cache = kv.KVCache.init(config, num_slots=1, max_len=max_len, dtype=dtype)
  depth, mask = random_tree_mask(num_tokens, prefix_len, max_len)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, num_tokens)),
                       jnp.int32)
  positions = jnp.asarray(prefix_len + depth[None], jnp.int32)
  rows = jnp.asarray(prefix_len + np.arange(num_tokens)[None], jnp.int32)
  mask = jnp.asarray(mask[None])
  slots = jnp.zeros((1,), jnp.int32)
  times = []
  for i in range(warmup + runs):
    start = time.perf_counter()
    logits, cache = step(state, cache, tokens, positions, mask, slots, rows)
    logits.block_until_ready()
    if i >= warmup:
      times.append((time.perf_counter() - start) * 1e3)
  deciles = statistics.quantiles(times, n=10)
  return Latency(statistics.median(times), deciles[0], deciles[-1], runs)
