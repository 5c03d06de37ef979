"""Measurements behind `launch/bench_convert.py`: conversion peak memory and forward latency.

- `write_random_hf_checkpoint` writes a Qwen3-shaped HF folder of random weights, one tensor at
  a time (so generating a multi-GB checkpoint does not need that much memory).
- `peak_rss` runs a command in a subprocess and reports its peak resident set size, from
  `/usr/bin/time -v` when present and from psutil polling (every 10 ms) otherwise.
- `forward_latency` times the jitted, warm forward of a model for one decode token or a tree.
- `run` is the launcher's whole run: `run_memory` (the four measured processes of
  `memory_commands`, printed by `memory_table`) and `run_latency` (`latency_table`).

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
import sys
import tempfile
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
from specedge_jax.models.model_config import ModelConfig, tiny_config
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


# ----------------------------------------------------------------------------------------------
# The launcher's run and its tables.

GB = 1e9
# Interpreter teardown after jax arrays existed raises peak RSS on the CPU backend (not a copy of
# the model, and after loading is done; figures: docs/notes/foundation.md). Exiting without
# teardown keeps the figure about loading.
SKIP_TEARDOWN = "; import os; os._exit(0)"


class CheckpointTooSmall(ValueError):
  """The generated checkpoint is below `min_mb`: too small for a meaningful peak-memory ratio."""


def memory_commands(python: str, hf_dir: str, out_dir: str, *, src_dtype: str,
                    dtype: str) -> list[tuple[str, str, list[str]]]:
  """(row name, status line, command) of each measured process; the first is the baseline (a
  process that only imports the same modules). Run from the repository root."""
  return [
      ("imports only (baseline)", "measuring: imports only",
       [python, "-c", ("import jax.numpy as jnp; from launch import convert; "
                       "from specedge_jax.checkpoints import orbax_io; "
                       "jnp.zeros(1).block_until_ready()")]),
      (f"launch.convert {src_dtype} -> {dtype}", "measuring: python -m launch.convert",
       [python, "-m", "launch.convert", f"--hf_dir={hf_dir}", f"--out_dir={out_dir}",
        f"--dtype={dtype}"]),
      ("orbax_io.load_model(orbax dir)", "measuring: orbax_io.load_model",
       [python, "-c", (f"from specedge_jax.checkpoints import orbax_io; "
                       f"orbax_io.load_model({out_dir!r})" + SKIP_TEARDOWN)]),
      (f"orbax_io.load_model(HF folder, {dtype})", "measuring: load_model from the HF folder",
       [python, "-c", (f"from specedge_jax.checkpoints import orbax_io; "
                       f"orbax_io.load_model({hf_dir!r}, dtype={dtype!r})" + SKIP_TEARDOWN)]),
  ]


def memory_table(rows: Sequence[tuple[str, PeakMemory]], *, size_bytes: int, num_layers: int,
                 src_dtype: str):
  """A rich table of peak RSS per process against the checkpoint size; rows[0] is the baseline."""
  from rich.table import Table

  baseline = rows[0][1]
  table = Table(title=f"Peak RSS: {num_layers}-layer Qwen3-shaped checkpoint, "
                f"{size_bytes / GB:.3f} GB of {src_dtype} weights ({baseline.method})")
  for column in ("process", "peak RSS GB", "peak / ckpt", "(peak - baseline) / ckpt", "wall s"):
    table.add_column(column, justify="left" if column == "process" else "right")
  for name, measured in rows:
    table.add_row(name, f"{measured.peak_rss_bytes / GB:.3f}",
                  f"{measured.peak_rss_bytes / size_bytes:.2f}x",
                  f"{(measured.peak_rss_bytes - baseline.peak_rss_bytes) / size_bytes:.2f}x",
                  f"{measured.wall_s:.1f}")
  return table


def run_memory(console, work_dir: str, *, repo_root: str, hidden_size: int, num_layers: int,
               intermediate_size: int, vocab_size: int, tie: bool, src_dtype: str, dtype: str,
               min_mb: int) -> list[tuple[str, PeakMemory]]:
  """Writes a random checkpoint under `work_dir`, measures every `memory_commands` process (with
  `repo_root` as the working directory) and prints `memory_table`. Raises CheckpointTooSmall
  (before measuring) when the checkpoint is under `min_mb` MB."""
  hf_dir, out_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, "orbax")
  hf_config = qwen3_hf_config(
      hidden_size=hidden_size, num_layers=num_layers, intermediate_size=intermediate_size,
      vocab_size=vocab_size, num_heads=16, num_kv_heads=8, head_dim=128, tie=tie)
  with console.status(f"writing a random {src_dtype} checkpoint to {hf_dir}"):
    size = write_random_hf_checkpoint(hf_dir, hf_config, src_dtype)
  if size < min_mb * 1e6:
    raise CheckpointTooSmall(f"generated checkpoint is {size / 1e6:.0f} MB < --min_mb="
                             f"{min_mb}; add layers")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  rows = []
  for name, status, command in memory_commands(sys.executable, hf_dir, out_dir,
                                               src_dtype=src_dtype, dtype=dtype):
    with console.status(status):
      rows.append((name, peak_rss(command, cwd=repo_root, env=env)))
  console.print(memory_table(rows, size_bytes=size, num_layers=num_layers, src_dtype=src_dtype))
  return rows


def latency_presets() -> dict[str, ModelConfig]:
  """The small models whose forward `run_latency` times, by table label."""
  return {
      "tiny (tests' tiny_config)": tiny_config("qwen3"),
      "small (d=256, 4 layers, V=4096)": tiny_config(
          "qwen3", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
          num_heads=4, num_kv_heads=2, head_dim=64),
  }


def latency_table(rows: Sequence[tuple[str, int, Latency, Latency]], *, runs: int,
                  tree_tokens: int, backend: str):
  """A rich table of (model name, parameters, decode latency, tree latency) rows."""
  from rich.table import Table

  table = Table(title=f"Forward latency, jitted and warm, fp32, backend={backend}, "
                f"median of {runs} (p10-p90), 256-row cached prefix, cache 512 rows")
  for column in ("model", "params", "decode T=1 ms", f"tree T={tree_tokens} ms"):
    table.add_column(column, justify="left" if column == "model" else "right")
  for name, params, decode, tree in rows:
    table.add_row(name, f"{params:,}",
                  f"{decode.median_ms:.3f} ({decode.p10_ms:.3f}-{decode.p90_ms:.3f})",
                  f"{tree.median_ms:.3f} ({tree.p10_ms:.3f}-{tree.p90_ms:.3f})")
  return table


def run_latency(console, *, runs: int, tree_tokens: int
                ) -> list[tuple[str, int, Latency, Latency]]:
  """Times every `latency_presets` model (decode and a `tree_tokens` tree); prints the table."""
  rows = []
  for name, config in latency_presets().items():
    with console.status(f"timing {name}"):
      params = sum(int(x.size) for x in jax.tree.leaves(hf.abstract_params(config)))
      decode = forward_latency(config, 1, runs=runs)
      tree = forward_latency(config, tree_tokens, runs=runs)
    rows.append((name, params, decode, tree))
  console.print(latency_table(rows, runs=runs, tree_tokens=tree_tokens,
                              backend=jax.default_backend()))
  return rows


def run(*, repo_root: str, work_dir: str | None = None, skip_memory: bool = False,
        skip_latency: bool = False, hidden_size: int = 1024, num_layers: int = 28,
        intermediate_size: int = 3072, vocab_size: int = 151936, tie: bool = True,
        src_dtype: str = "bf16", dtype: str = "bf16", min_mb: int = 500, runs: int = 50,
        tree_tokens: int = 32, console=None) -> None:
  """What `launch/bench_convert.py` does: the memory table (in `work_dir`, or a temp dir deleted
  afterwards), then the latency table, either skippable."""
  from rich.console import Console

  console = console or Console(width=None if sys.stdout.isatty() else 120)
  if not skip_memory:
    scratch = work_dir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
      run_memory(console, scratch, repo_root=repo_root, hidden_size=hidden_size,
                 num_layers=num_layers, intermediate_size=intermediate_size,
                 vocab_size=vocab_size, tie=tie, src_dtype=src_dtype, dtype=dtype,
                 min_mb=min_mb)
    finally:
      if not work_dir:
        shutil.rmtree(scratch, ignore_errors=True)
  if not skip_latency:
    run_latency(console, runs=runs, tree_tokens=tree_tokens)
