"""Benchmark of the speculative core, in process, on CPU or GPU.

  python -m launch.bench_core                      # embedded target/draft pair and prompts
  python -m launch.bench_core --num_prompts=8 --out_json=core.json --plot=verify_curve.png

Prints three tables (see `specedge_jax/bench/core.py` for what each measures): the verify
step time against tree tokens T and batch B, host overhead, and speculative against
target-only tokens/s on the same prompts.
"""

import dataclasses
import json
import sys

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
_GEN_REPEATS = flags.DEFINE_integer(
    "gen_repeats", 2, "Timed generation passes per method (alternating); each keeps its best.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write all results here.")
_PLOT = flags.DEFINE_string("plot", None, "Write the verify curve as a PNG here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rich.console import Console
  from rich.table import Table
  from transformers import AutoTokenizer

  from specedge_jax.bench import core as core_bench
  from specedge_jax.checkpoints import orbax_io
  from specedge_jax.data import prompts
  from specedge_jax.engine import ProactiveParams, TreeParams

  # Piped output (logs, notes) gets tables wide enough not to cut their columns.
  console = Console(width=None if sys.stdout.isatty() else 160)
  target = orbax_io.load_model(_TARGET.value)
  draft = orbax_io.load_model(_DRAFT.value)
  tokenizer = AutoTokenizer.from_pretrained(_TARGET.value)
  prompt_ids = prompts.encode_all(tokenizer, prompts.load_records(_PROMPTS.value))
  prompt_ids = prompt_ids[:_NUM_PROMPTS.value]

  table = Table(title="verify step (forward + sampling + acceptance + compaction)")
  for column in ("B", "T", "median ms", "x of T=1", "ms per tree token"):
    table.add_column(column, justify="right")
  with console.status("timing verify ..."):
    points = core_bench.verify_curve(
        target, [int(b) for b in _BATCH_SIZES.value], [int(t) for t in _TREE_SIZES.value],
        prefix_len=_PREFIX_LEN.value, repeats=_REPEATS.value)
  for p in points:
    table.add_row(str(p.batch_size), str(p.tree_tokens), f"{p.median_ms:.2f}",
                  f"{p.ratio_to_t1:.2f}", f"{p.median_ms / (p.batch_size * p.tree_tokens):.3f}")
  console.print(table)

  tree = TreeParams(_N_BEAMS.value, _BEAM_LEN.value, _BRANCH.value, _BUDGET.value)
  comparisons = []
  table = Table(title=f"greedy generation, {len(prompt_ids)} prompts x {_MAX_NEW.value} tokens, "
                f"tree {dataclasses.astuple(tree)}")
  for column in ("B", "proactive", "target-only tok/s", "speculative tok/s", "speedup",
                 "accepted/step", "hit rate", "after a hit: steps, tree, tok/step",
                 "fresh: tree, tok/step", "host overhead", "identical", "compiles"):
    table.add_column(column, justify="right")
  for batch in (int(b) for b in _GEN_BATCH_SIZES.value):
    for mode in _PROACTIVE.value:
      with console.status(f"generating: B={batch}, proactive={mode} ..."):
        c = core_bench.compare_generation(
            target, draft, prompt_ids, batch_size=batch, tree=tree,
            proactive=ProactiveParams(mode=mode), max_new_tokens=_MAX_NEW.value,
            eos_token_ids=target.config.eos_token_ids, repeats=_GEN_REPEATS.value)
      comparisons.append(c)
      table.add_row(str(batch), mode, f"{c.ar_tokens_per_s:.1f}", f"{c.spec_tokens_per_s:.1f}",
                    f"{c.speedup:.2f}x", f"{c.mean_accepted:.2f}",
                    "-" if c.proactive_hit_rate is None else f"{c.proactive_hit_rate:.0%}",
                    "-" if not c.after_hit[0] else
                    f"{c.after_hit[0]}, {c.after_hit[1]:.1f}, {c.after_hit[2]:.2f}",
                    "-" if not c.fresh[0] else f"{c.fresh[1]:.1f}, {c.fresh[2]:.2f}",
                    f"{c.host_overhead:.1%}", "yes" if c.identical_outputs else "NO",
                    str(c.compiles_in_timed_runs))
  console.print(table)

  if _PLOT.value:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({p.batch_size for p in points}):
      series = [p for p in points if p.batch_size == batch]
      ax.plot([p.tree_tokens for p in series], [p.median_ms for p in series], marker="o",
              label=f"B={batch}")
    ax.set_xlabel("tree tokens per request (T)")
    ax.set_ylabel("verify step, median ms")
    ax.set_title("Verify step time vs tree size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(_PLOT.value, dpi=120)
    console.print(f"plot: {_PLOT.value}")
  if _OUT_JSON.value:
    with open(_OUT_JSON.value, "w") as f:
      json.dump({"verify_curve": [dataclasses.asdict(p) for p in points],
                 "generation": [dict(dataclasses.asdict(c), speedup=c.speedup,
                                     ar_tokens_per_s=c.ar_tokens_per_s,
                                     spec_tokens_per_s=c.spec_tokens_per_s)
                                for c in comparisons]}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
