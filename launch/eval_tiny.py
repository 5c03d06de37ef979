"""Measures a target/draft pair: held-out loss and perplexity, and draft-vs-target agreement.

  python launch/eval_tiny.py --output=/tmp/eval_tiny.json

Loss is measured on the validation split of the training sources (same fraction and seed as
`launch/train_tiny.py`) and on c4 text; agreement on the held-out c4 and mtbench prompts.
"""

import os

from absl import app, flags

from specedge_jax.data.assets import DEFAULT_DRAFT_DIR, DEFAULT_TARGET_DIR
from specedge_jax.training import evaluation as tiny_eval

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TARGET = flags.DEFINE_string("target", DEFAULT_TARGET_DIR, "HF folder of the target.")
_DRAFT = flags.DEFINE_string("draft", DEFAULT_DRAFT_DIR, "HF folder of the draft.")
_DATASET_DIR = flags.DEFINE_string("dataset_dir", os.path.join(_REPO, "..", "shared", "datasets"),
                                   "Folder with the benchmark prompt sets.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 384, "Window length for the loss.")
_NUM_NEW_TOKENS = flags.DEFINE_integer("num_new_tokens", 64,
                                       "Greedy target tokens per prompt scored for agreement.")
_OUTPUT = flags.DEFINE_string("output", None, "Optional JSON file for the figures.")


def main(argv):
  del argv
  report = tiny_eval.evaluate_pair(_TARGET.value, _DRAFT.value, _DATASET_DIR.value,
                                   seq_len=_SEQ_LEN.value, num_new_tokens=_NUM_NEW_TOKENS.value)
  if _OUTPUT.value:
    tiny_eval.write_report(report, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)
