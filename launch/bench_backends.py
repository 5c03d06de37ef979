"""XLA vs PyTorch on one checkpoint: the tree-verification forward and the decode step.

  python -m launch.bench_backends                         # random tiny Qwen3 (embedded shape)
  python -m launch.bench_backends --hf_dir=PATH --threads=1 --out_json=bench.json \
      --plot=bench.png
  python -m launch.bench_backends --threads=1 --repeats=200 --gemm_shapes=32x256x768,512x512x512

What each side computes, and how it is timed: `specedge_jax/bench/backends.py`.
"""

import os

from absl import app, flags

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "HF checkpoint folder (config.json + safetensors); unset: a random Qwen3 of "
    "the embedded target's shape (hidden 256, 4 layers, vocab 4096), saved with transformers.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4", "8"], "Lanes B per forward.")
_TREE_SIZES = flags.DEFINE_list("tree_sizes", ["1", "16", "32", "64"], "Tree tokens T per lane.")
_DECODE = flags.DEFINE_bool("decode", True, "Also time the autoregressive decode step.")
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", 128, "Prefix tokens P already in the cache.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per variant and case.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after the compiling first call.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["jax", "torch-eager-dynamic", "torch-eager-static", "torch-compile"],
    "Which implementations to time; also 'jax-unstacked' (our model with per-layer weight "
    "arrays instead of the stacked layer scan, a diagnostic).")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "Compute threads for both sides; 0 keeps each library's default (all cores). "
    "1 pins the process to one core, sets torch.set_num_threads(1) and XLA's "
    "single-threaded CPU mode.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random checkpoint and inputs.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write the results here.")
_GEMM_SHAPES = flags.DEFINE_list(
    "gemm_shapes", None, "Instead of the model cases, time single fp32 GEMMs MxKxN (XLA dot vs "
    "torch matmul), e.g. 32x256x768,32x256x4096: the ceiling of a GEMM-bound forward.")
_PLOT = flags.DEFINE_string("plot", None, "Also draw ms per call and jax's speed-ups (PNG) here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _THREADS.value == 1:
    # Pin the process to one core, so that both libraries size their thread pools to it (XLA
    # reads the affinity mask when its CPU backend starts, which has not happened yet here).
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
  elif _THREADS.value > 1:
    raise app.UsageError("--threads supports 0 (library defaults) or 1")

  from specedge_jax.bench import backends as backend_bench

  if _GEMM_SHAPES.value:
    try:
      shapes = [backend_bench.parse_gemm_shape(text) for text in _GEMM_SHAPES.value]
    except ValueError as e:
      raise app.UsageError(f"--gemm_shapes: {e}") from e
    backend_bench.run_gemms(shapes, repeats=_REPEATS.value, seed=_SEED.value,
                            torch_threads=_THREADS.value or None, out_json=_OUT_JSON.value)
    return

  config = backend_bench.BenchConfig(
      batch_sizes=tuple(int(b) for b in _BATCH_SIZES.value),
      tree_sizes=tuple(int(t) for t in _TREE_SIZES.value),
      decode=_DECODE.value, prefix_len=_PREFIX_LEN.value, repeats=_REPEATS.value,
      warmup=_WARMUP.value, variants=tuple(_VARIANTS.value),
      torch_threads=_THREADS.value or None, seed=_SEED.value)
  backend_bench.run(_HF_DIR.value, config, out_json=_OUT_JSON.value, plot=_PLOT.value)


if __name__ == "__main__":
  app.run(main)
