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

from absl import app, flags

from specedge_jax.bench import convert as convert_bench

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    convert_bench.run(
        repo_root=_REPO_ROOT, work_dir=_WORK_DIR.value, skip_memory=_SKIP_MEMORY.value,
        skip_latency=_SKIP_LATENCY.value, hidden_size=_HIDDEN.value, num_layers=_LAYERS.value,
        intermediate_size=_INTERMEDIATE.value, vocab_size=_VOCAB.value, tie=_TIE.value,
        src_dtype=_SRC_DTYPE.value, dtype=_DTYPE.value, min_mb=_MIN_MB.value, runs=_RUNS.value,
        tree_tokens=_TREE_TOKENS.value)
  except convert_bench.CheckpointTooSmall as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)
