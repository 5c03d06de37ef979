"""Verify cost at a short context in a long cache, before and after live-prefix attention.

  python -m launch.bench_live_prefix            # embedded target, prefix 128, max_len 512 / 4096

Prints a table and writes JSON and a PNG (see specedge_jax/bench/live_prefix.py).
"""

import os

from absl import app, flags

from specedge_jax.data import assets

_TARGET = flags.DEFINE_string("target", assets.DEFAULT_TARGET_DIR, "HF folder or orbax dir.")
_MAX_LENS = flags.DEFINE_list("max_lens", ["512", "4096"], "Cache rows per slot.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4"], "Lanes per verify.")
_TREE_TOKENS = flags.DEFINE_integer("tree_tokens", 16, "Tree tokens per lane.")
_PREFIX_LEN = flags.DEFINE_integer("prefix_len", 128, "Committed rows per lane.")
_MIN_ROWS = flags.DEFINE_integer("attention_min_rows", 128, "Smallest attention bucket.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per point and variant.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/live_prefix", "JSON and PNG go here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from specedge_jax.bench import live_prefix
  from specedge_jax.checkpoints import orbax_io

  target = orbax_io.load_model(_TARGET.value)
  points = live_prefix.measure(
      target, max_lens=[int(m) for m in _MAX_LENS.value],
      batch_sizes=[int(b) for b in _BATCH_SIZES.value], tree_tokens=_TREE_TOKENS.value,
      prefix_len=_PREFIX_LEN.value, min_rows=_MIN_ROWS.value, repeats=_REPEATS.value)
  print(live_prefix.table(points))
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  live_prefix.write_json(points, os.path.join(_OUT_DIR.value, "live_prefix.json"),
                         target=_TARGET.value, device=jax.devices()[0].device_kind,
                         attention_min_rows=_MIN_ROWS.value)
  live_prefix.plot(points, os.path.join(_OUT_DIR.value, "live_prefix.png"))
  print(f"wrote {_OUT_DIR.value}/live_prefix.json and live_prefix.png")


if __name__ == "__main__":
  app.run(main)
