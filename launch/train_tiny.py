"""Trains the embedded default models: tokenizer, tiny Qwen3 target, distilled draft.

The defaults reproduce `specedge_jax/data/assets/models/{target,draft}` (about 25 minutes on 2 CPU
cores). Run again with the same --work_dir to resume after a kill. Tiny sizes and step counts
make a seconds-long smoke run:

  python launch/train_tiny.py --work_dir=/tmp/tiny --target_out=/tmp/tiny/target \
      --draft_out=/tmp/tiny/draft --target_steps=4 --draft_steps=4 --seq_len=32 \
      --target_hidden=32 --draft_hidden=16 --vocab_size=300

A draft variant for the committed target (its tokenizer reused, no target phase), e.g. the
smaller embedded draft `specedge_jax/data/assets/models/draft_small`:

  python launch/train_tiny.py --teacher=specedge_jax/data/assets/models/target \
      --work_dir=/tmp/specedge_train_draft_small \
      --draft_out=specedge_jax/data/assets/models/draft_small --draft_hidden=80 --draft_layers=1
"""

import dataclasses
import os

from absl import app, flags, logging

from specedge_jax.data.assets import DEFAULT_DRAFT_DIR, DEFAULT_TARGET_DIR
from specedge_jax.training import recipe, trainer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DATASET_DIR = flags.DEFINE_string(
    "dataset_dir", os.path.join(_REPO, "..", "shared", "datasets"),
    "Folder with wikitext_prompts.json and oasst_prompts.json (c4/mtbench/specbench are never "
    "read: they are held out for evaluation).")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/specedge_train_tiny",
                                "Tokenizer, orbax checkpoints and logs; reused to resume.")
_TARGET_OUT = flags.DEFINE_string("target_out", DEFAULT_TARGET_DIR, "HF folder for the target.")
_DRAFT_OUT = flags.DEFINE_string("draft_out", DEFAULT_DRAFT_DIR, "HF folder for the draft.")
_USE_PYDOC = flags.DEFINE_bool("use_pydoc", True, "Also train on Python's bundled docs.")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.05,
                                          "Share of each source's documents held out.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 384, "Training context length.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_TARGET_STEPS = flags.DEFINE_integer("target_steps", 320, "Target training steps.")
_DRAFT_STEPS = flags.DEFINE_integer("draft_steps", 320, "Draft distillation steps.")
_TARGET_LR = flags.DEFINE_float("target_lr", 3e-3, "Target peak learning rate.")
_DRAFT_LR = flags.DEFINE_float("draft_lr", 3e-3, "Draft peak learning rate.")
_DISTILL_WEIGHT = flags.DEFINE_float("distill_weight", 0.9,
                                     "Draft loss = w * KL(target || draft) + (1 - w) * CE.")
_DISTILL_TEMPERATURE = flags.DEFINE_float("distill_temperature", 1.0, "Softening temperature.")
_TARGET_HIDDEN = flags.DEFINE_integer("target_hidden", 256, "Target hidden size.")
_TARGET_LAYERS = flags.DEFINE_integer("target_layers", 4, "Target layers.")
_TARGET_INTERMEDIATE = flags.DEFINE_integer("target_intermediate", 0,
                                            "Target MLP width (0: 3 x hidden).")
_DRAFT_HIDDEN = flags.DEFINE_integer("draft_hidden", 160, "Draft hidden size.")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 2, "Draft layers.")
_DRAFT_INTERMEDIATE = flags.DEFINE_integer("draft_intermediate", 0,
                                           "Draft MLP width (0: 3 x hidden).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 25, "Steps between checkpoints.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 150, "Steps between validation losses.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init, data order and the validation split.")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", "fp32", ["fp32", "bf16"],
                                  "Weight dtype of the exported safetensors.")
_STOP_AFTER_STEP = flags.DEFINE_integer(
    "stop_after_step", None, "Stop a phase after this step without exporting (tests resume).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a rich progress bar.")
_TEACHER = flags.DEFINE_string(
    "teacher", "", "Distil only a draft from this existing target (an HF folder), with its "
    "tokenizer: no tokenizer or target is trained and --target_out is not written.")


def _size(base: trainer.ModelSize, hidden: int, layers: int,
          intermediate: int) -> trainer.ModelSize:
  # Heads keep the preset's count; head_dim follows the width so small smoke sizes stay valid.
  return dataclasses.replace(base, hidden_size=hidden, num_layers=layers,
                             head_dim=max(2, hidden // base.num_heads),
                             intermediate_size=intermediate or 3 * hidden)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
  common = dict(batch_size=_BATCH_SIZE.value, seq_len=_SEQ_LEN.value, seed=_SEED.value,
                checkpoint_every=_CHECKPOINT_EVERY.value, eval_every=_EVAL_EVERY.value)
  recipe_config = recipe.RecipeConfig(
      dataset_dir=_DATASET_DIR.value,
      use_pydoc=_USE_PYDOC.value,
      validation_fraction=_VALIDATION_FRACTION.value,
      vocab_size=_VOCAB_SIZE.value,
      target_size=_size(trainer.TARGET_SIZE, _TARGET_HIDDEN.value, _TARGET_LAYERS.value,
                        _TARGET_INTERMEDIATE.value),
      draft_size=_size(trainer.DRAFT_SIZE, _DRAFT_HIDDEN.value, _DRAFT_LAYERS.value,
                       _DRAFT_INTERMEDIATE.value),
      target_train=trainer.TrainConfig(steps=_TARGET_STEPS.value,
                                       peak_learning_rate=_TARGET_LR.value, **common),
      draft_train=trainer.TrainConfig(steps=_DRAFT_STEPS.value,
                                      peak_learning_rate=_DRAFT_LR.value,
                                      distill_weight=_DISTILL_WEIGHT.value,
                                      distill_temperature=_DISTILL_TEMPERATURE.value, **common),
      export_dtype=_EXPORT_DTYPE.value,
      teacher_dir=_TEACHER.value,
  )
  summary = recipe.run_recipe(recipe_config, _WORK_DIR.value, _TARGET_OUT.value,
                              _DRAFT_OUT.value, progress=_PROGRESS.value,
                              stop_after_step=_STOP_AFTER_STEP.value)
  if summary["finished"]:
    exported = _DRAFT_OUT.value if _TEACHER.value else f"{_TARGET_OUT.value} and {_DRAFT_OUT.value}"
    print(f"exported {exported} in {summary['total_seconds']} s")


if __name__ == "__main__":
  app.run(main)
