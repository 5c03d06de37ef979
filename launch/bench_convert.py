"""Benchmarks checkpoint conversion memory and tiny-model forward latency; prints rich tables.

  python -m launch.bench_convert                       # Qwen3-0.6B-shaped bf16 checkpoint
  python -m launch.bench_convert --src_dtype=fp32 --num_layers=12 --dtype=bf16

1. Writes a random Qwen3-shaped HF checkpoint (in a temp dir unless --work_dir), then runs
   `python -m launch.convert` on it in a subprocess and reports the peak resident memory against
   the checkpoint's size (target: under 1.5x), next to the peak of a process that only imports
   the same modules. Then loads the converted checkpoint with `orbax_io.load_model` the same way.
2. Times a jitted, warm forward of small models on this machine's default backend: one decode
   token (T=1) and a 32-token tree over a cached prefix.
"""

import os
import shutil
import sys
import tempfile

import jax
from absl import app, flags
from rich.console import Console
from rich.table import Table

from specedge_jax.bench import convert as convert_bench
from specedge_jax.checkpoints import hf
from specedge_jax.models.model_config import tiny_config

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where to write the checkpoints (default: a "
                                "fresh temp dir, deleted afterwards).")
_SRC_DTYPE = flags.DEFINE_enum("src_dtype", "bf16", ["fp32", "bf16", "fp16"],
                               "dtype of the generated HF checkpoint.")
_DTYPE = flags.DEFINE_enum("dtype", "bf16", ["fp32", "bf16", "fp16"], "Conversion target dtype.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 1024, "Generated model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 28, "Generated model depth.")
_INTERMEDIATE = flags.DEFINE_integer("intermediate_size", 3072, "Generated MLP width.")
_VOCAB = flags.DEFINE_integer("vocab_size", 151936, "Generated vocabulary.")
_TIE = flags.DEFINE_bool("tie", True, "Tied embeddings (as Qwen3-0.6B).")
_MIN_MB = flags.DEFINE_integer("min_mb", 500, "Refuse to measure a checkpoint smaller than this.")
_SKIP_MEMORY = flags.DEFINE_bool("skip_memory", False, "Only run the latency benchmark.")
_SKIP_LATENCY = flags.DEFINE_bool("skip_latency", False, "Only run the memory benchmark.")
_RUNS = flags.DEFINE_integer("runs", 50, "Timed forwards per latency figure (after warm-up).")
_TREE_TOKENS = flags.DEFINE_integer("tree_tokens", 32, "Tokens in the tree forward.")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GB = 1e9
# Interpreter teardown after jax arrays existed raises peak RSS by 0.3-0.6 GB on the CPU backend
# (measured; not a copy of the model, and after loading is done). Exiting without teardown keeps
# the figure about loading.
_SKIP_TEARDOWN = "; import os; os._exit(0)"


def memory_table(console: Console, work_dir: str) -> None:
  hf_dir, out_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, "orbax")
  hf_config = convert_bench.qwen3_hf_config(
      hidden_size=_HIDDEN.value, num_layers=_LAYERS.value,
      intermediate_size=_INTERMEDIATE.value, vocab_size=_VOCAB.value, num_heads=16,
      num_kv_heads=8, head_dim=128, tie=_TIE.value)
  with console.status(f"writing a random {_SRC_DTYPE.value} checkpoint to {hf_dir}"):
    size = convert_bench.write_random_hf_checkpoint(hf_dir, hf_config, _SRC_DTYPE.value)
  if size < _MIN_MB.value * 1e6:
    raise app.UsageError(f"generated checkpoint is {size / 1e6:.0f} MB < --min_mb="
                         f"{_MIN_MB.value}; add layers")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  python = sys.executable
  rows = []
  with console.status("measuring: imports only"):
    baseline = convert_bench.peak_rss(
        [python, "-c", "import jax.numpy as jnp; from launch import convert; "
         "from specedge_jax.checkpoints import orbax_io; jnp.zeros(1).block_until_ready()"],
        cwd=_REPO_ROOT, env=env)
    rows.append(("imports only (baseline)", baseline))
  with console.status("measuring: python -m launch.convert"):
    rows.append((f"launch.convert {_SRC_DTYPE.value} -> {_DTYPE.value}", convert_bench.peak_rss(
        [python, "-m", "launch.convert", f"--hf_dir={hf_dir}", f"--out_dir={out_dir}",
         f"--dtype={_DTYPE.value}"], cwd=_REPO_ROOT, env=env)))
  with console.status("measuring: orbax_io.load_model"):
    rows.append(("orbax_io.load_model(orbax dir)", convert_bench.peak_rss(
        [python, "-c", f"from specedge_jax.checkpoints import orbax_io; orbax_io.load_model({out_dir!r})"
         + _SKIP_TEARDOWN],
        cwd=_REPO_ROOT, env=env)))
  with console.status("measuring: load_model from the HF folder"):
    rows.append((f"orbax_io.load_model(HF folder, {_DTYPE.value})", convert_bench.peak_rss(
        [python, "-c", f"from specedge_jax.checkpoints import orbax_io; "
         f"orbax_io.load_model({hf_dir!r}, dtype={_DTYPE.value!r})" + _SKIP_TEARDOWN],
        cwd=_REPO_ROOT, env=env)))

  table = Table(title=f"Peak RSS: {_LAYERS.value}-layer Qwen3-shaped checkpoint, "
                f"{size / _GB:.3f} GB of {_SRC_DTYPE.value} weights "
                f"({rows[0][1].method})")
  for column in ("process", "peak RSS GB", "peak / ckpt", "(peak - baseline) / ckpt", "wall s"):
    table.add_column(column, justify="left" if column == "process" else "right")
  for name, measured in rows:
    table.add_row(name, f"{measured.peak_rss_bytes / _GB:.3f}",
                  f"{measured.peak_rss_bytes / size:.2f}x",
                  f"{(measured.peak_rss_bytes - baseline.peak_rss_bytes) / size:.2f}x",
                  f"{measured.wall_s:.1f}")
  console.print(table)


def latency_table(console: Console) -> None:
  presets = {
      "tiny (tests' tiny_config)": tiny_config("qwen3"),
      "small (d=256, 4 layers, V=4096)": tiny_config(
          "qwen3", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
          num_heads=4, num_kv_heads=2, head_dim=64),
  }
  table = Table(title=f"Forward latency, jitted and warm, fp32, backend={jax.default_backend()}, "
                f"median of {_RUNS.value} (p10-p90), 256-row cached prefix, cache 512 rows")
  for column in ("model", "params", "decode T=1 ms", f"tree T={_TREE_TOKENS.value} ms"):
    table.add_column(column, justify="left" if column == "model" else "right")
  for name, config in presets.items():
    with console.status(f"timing {name}"):
      params = sum(int(x.size) for x in jax.tree.leaves(hf.abstract_params(config)))
      decode = convert_bench.forward_latency(config, 1, runs=_RUNS.value)
      tree = convert_bench.forward_latency(config, _TREE_TOKENS.value, runs=_RUNS.value)
    table.add_row(name, f"{params:,}",
                  f"{decode.median_ms:.3f} ({decode.p10_ms:.3f}-{decode.p90_ms:.3f})",
                  f"{tree.median_ms:.3f} ({tree.p10_ms:.3f}-{tree.p90_ms:.3f})")
  console.print(table)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console = Console(width=None if sys.stdout.isatty() else 120)
  if not _SKIP_MEMORY.value:
    work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="bench_convert_")
    try:
      memory_table(console, work_dir)
    finally:
      if not _WORK_DIR.value:
        shutil.rmtree(work_dir, ignore_errors=True)
  if not _SKIP_LATENCY.value:
    latency_table(console)


if __name__ == "__main__":
  app.run(main)
