"""Mean accepted tokens per verification (bonus included) of a target/draft pair, greedy.

  python -m launch.measure_acceptance                 # embedded pair, 16 prompts x 64 tokens

Also checks that speculative output equals target-only output. Timing-free: the figure depends
on the models and the tree, not on the machine.
"""

from absl import app, flags

from specedge_jax.data import assets

_TARGET = flags.DEFINE_string("target", assets.DEFAULT_TARGET_DIR, "HF folder or orbax dir.")
_DRAFT = flags.DEFINE_string("draft", assets.DEFAULT_DRAFT_DIR, "HF folder or orbax dir.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Embedded prompts to use.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
_TREES = flags.DEFINE_list("trees", ["32:4:16:32", "4:4:2:8"],
                           "Trees as beams:depth:branch:budget.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from specedge_jax.bench import core as core_bench

  core_bench.run_acceptance(_TARGET.value, _DRAFT.value, num_prompts=_NUM_PROMPTS.value,
                            max_new_tokens=_MAX_NEW.value, tree_specs=_TREES.value)


if __name__ == "__main__":
  app.run(main)
