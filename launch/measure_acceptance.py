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
  from transformers import AutoTokenizer

  from specedge_jax import engine as E
  from specedge_jax.checkpoints import orbax_io
  from specedge_jax.data import prompts

  target, draft = orbax_io.load_model(_TARGET.value), orbax_io.load_model(_DRAFT.value)
  tokenizer = AutoTokenizer.from_pretrained(_TARGET.value)
  ids = prompts.encode_all(tokenizer, prompts.load_records())[:_NUM_PROMPTS.value]
  max_len = max(len(p) for p in ids) + _MAX_NEW.value + 40
  target_engine = E.TargetEngine(target, num_slots=4, max_len=max_len, max_tree_nodes=33,
                                 max_batch_size=4, eos_token_ids=target.config.eos_token_ids)
  reference = E.generate(target_engine, ids, max_new_tokens=_MAX_NEW.value)
  for spec in _TREES.value:
    tree = E.TreeParams(*(int(x) for x in spec.split(":")))
    draft_engine = E.DraftEngine(draft, num_slots=4, max_len=max_len, tree=tree)
    out = E.generate(target_engine, ids, draft=draft_engine, max_new_tokens=_MAX_NEW.value)
    print(f"tree {spec}: mean accepted tokens/verification {out.mean_accepted:.3f} over "
          f"{len(out.steps)} steps; identical to target-only: {out.tokens == reference.tokens}")


if __name__ == "__main__":
  app.run(main)
