"""bf16 greedy agreement of the embedded pair: speculative vs target-only, bf16 vs fp32.

  python -m launch.bench_bf16                                  # 16 prompts x 64 tokens
  python -m launch.bench_bf16 --num_prompts=2 --max_new_tokens=16 --out_json=/tmp/bf16.json

Runs target-only and speculative greedy decoding with weights and KV caches in bf16, and
target-only in fp32 for reference, and prints the token agreement rate, the exact-match rate and
the first divergence (with the target's top-2 logit margin there) of each comparison. Checks
that fp32 speculative output equals fp32 target-only output (exits with an error otherwise).
See `specedge_jax/bench/bf16_agreement.py`.
"""

from absl import app, flags

from specedge_jax.data import assets

_TARGET = flags.DEFINE_string("target", assets.DEFAULT_TARGET_DIR, "HF folder or orbax dir.")
_DRAFT = flags.DEFINE_string("draft", assets.DEFAULT_DRAFT_DIR, "HF folder or orbax dir.")
_PROMPTS = flags.DEFINE_string("prompts", assets.DEFAULT_PROMPTS, "Prompt records (JSON).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Embedded prompts to use.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
_TREE = flags.DEFINE_string("tree", "32:4:16:32", "SpecExec tree as beams:depth:branch:budget.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Requests decoded together.")
_OUT_JSON = flags.DEFINE_string("out_json", "results/bf16/bf16_agreement.json",
                                "Write the report here (empty: do not write).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from specedge_jax.bench import bf16_agreement

  bf16_agreement.run(_TARGET.value, _DRAFT.value, num_prompts=_NUM_PROMPTS.value,
                     max_new_tokens=_MAX_NEW.value, tree_spec=_TREE.value,
                     batch_size=_BATCH.value, prompts_path=_PROMPTS.value,
                     out_json=_OUT_JSON.value or None)


if __name__ == "__main__":
  app.run(main)
