"""Benchmark of the speculative core, in process, on CPU or GPU.

  python -m launch.bench_core                      # embedded target/draft pair and prompts
  python -m launch.bench_core --num_prompts=8 --out_json=core.json --plot=verify_curve.png
  python -m launch.bench_core --gen_batch_sizes= --layerwise --batch_sizes=1,2,4 \
      --tree_sizes=2,5,9 --out_json=curve.json     # the verify curve only, as the engines run

Prints three tables (see `specedge_jax/bench/core.py` for what each measures): the verify
step time against tree tokens T and batch B, host overhead, and speculative against
target-only tokens/s on the same prompts.
"""

from absl import app, flags

from specedge_jax.data import assets

_TARGET = flags.DEFINE_string("target", assets.DEFAULT_TARGET_DIR,
                              "Target model: HF folder or orbax checkpoint.")
_DRAFT = flags.DEFINE_string("draft", assets.DEFAULT_DRAFT_DIR,
                             "Draft model: HF folder or orbax checkpoint.")
_PROMPTS = flags.DEFINE_string("prompts", assets.DEFAULT_PROMPTS, "Prompt records (JSON).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Prompts used in the generation runs.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4", "8"], "B of the verify curve.")
_TREE_SIZES = flags.DEFINE_list("tree_sizes", ["1", "8", "16", "32", "64"],
                                "T of the verify curve.")
_GEN_BATCH_SIZES = flags.DEFINE_list("gen_batch_sizes", ["1", "4"],
                                     "Batch sizes of the generation comparison.")
_PROACTIVE = flags.DEFINE_list("proactive", ["disabled", "excluded"],
                               "Proactive modes of the generation comparison.")
_N_BEAMS = flags.DEFINE_integer("max_n_beams", 32, "SpecExec nodes forwarded per step.")
_BEAM_LEN = flags.DEFINE_integer("max_beam_len", 4, "SpecExec depth.")
_BRANCH = flags.DEFINE_integer("max_branch_width", 16, "SpecExec children per node.")
_BUDGET = flags.DEFINE_integer("max_budget", 32, "SpecExec tree size (root excluded).")
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", 128, "Cached prefix for the verify curve.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per verify-curve point.")
_LAYERWISE = flags.DEFINE_bool(
    "layerwise", False, "Verify curve with per-layer weight arrays, as the serving engines run "
    "the target (default: the stacked layer scan).")
_GEN_REPEATS = flags.DEFINE_integer(
    "gen_repeats", 2, "Timed generation passes per method (alternating); each keeps its best.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write all results here.")
_PLOT = flags.DEFINE_string("plot", None, "Write the verify curve as a PNG here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here, not at the top, so that --help stays fast.
  from specedge_jax.bench import core as core_bench
  from specedge_jax.engine import TreeParams

  core_bench.run(
      _TARGET.value, _DRAFT.value, _PROMPTS.value, num_prompts=_NUM_PROMPTS.value,
      max_new_tokens=_MAX_NEW.value, batch_sizes=[int(b) for b in _BATCH_SIZES.value],
      tree_sizes=[int(t) for t in _TREE_SIZES.value],
      gen_batch_sizes=[int(b) for b in _GEN_BATCH_SIZES.value],
      proactive_modes=_PROACTIVE.value,
      tree=TreeParams(_N_BEAMS.value, _BEAM_LEN.value, _BRANCH.value, _BUDGET.value),
      prefix_len=_PREFIX_LEN.value, repeats=_REPEATS.value, gen_repeats=_GEN_REPEATS.value,
      layerwise=_LAYERWISE.value, out_json=_OUT_JSON.value, plot=_PLOT.value)


if __name__ == "__main__":
  app.run(main)
