"""Runs SpecEdge and the server-only baselines over a grid; writes report.json, PNGs, a table.

  python -m launch.sweep --clients=1,2,4 --batch_sizes=4 --budgets=8 --rtt_ms=14 \
      --num_prompts=8 --max_new_tokens=32 --out_dir=runs/sweep
  python -m launch.sweep --systems=specedge,server_only_ar --config.edge.requests_per_drafter=1
  python -m launch.sweep --clients=1,2,4 --proactive_modes=disabled,excluded
  python -m launch.sweep --replot=runs/sweep    # plots and report again from the logs, no runs

The base config is `--config` (default configs/embedded.py, overridable field by field); the grid
flags replace its num_drafters, max_batch_size, tree budget, simulated RTT and proactive mode per
point. See specedge_jax/bench/sweep.py for what a grid point means for each system.
"""

import os
import time

from absl import app, flags
from rich.console import Console

from launch import serving_flags
from specedge_jax.bench import sweep
from specedge_jax.serving import local, processes

_CLIENTS = flags.DEFINE_list("clients", ["1", "2", "4"], "Drafters (edges) per grid point.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None,
                                 "server.max_batch_size values; default: the config's.")
_BUDGETS = flags.DEFINE_list("budgets", None, "tree.max_budget values; default: the config's.")
_RTT_MS = flags.DEFINE_list("rtt_ms", None,
                            "edge.simulated_rtt_ms values; default: the config's.")
_PROACTIVE_MODES = flags.DEFINE_list(
    "proactive_modes", None, "proactive.mode values for SpecEdge (disabled, excluded, included); "
    "default: the config's. The baselines never draft proactively.")
_SYSTEMS = flags.DEFINE_list("systems", list(sweep.SYSTEMS), "Systems to run at every point.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None,
                                    "Requests per run; default: workload.num_requests.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None,
                                       "Tokens per request; default: workload.max_new_tokens.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Results folder; default runs/sweep-<time>.")
_VERIFIER_CPUS = flags.DEFINE_string("verifier_cpus", "", "Pin the verifier and baselines.")
_DRAFTER_CPUS = flags.DEFINE_string("drafter_cpus", "", "Pin the drafters.")
_REPLOT = flags.DEFINE_string(
    "replot", None, "Run nothing: rebuild report.json, the table and the plots of this finished "
    "sweep folder from its event logs (after a change to a metric or a plot).")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", local.LocalOptions.compilation_cache_dir,
    "JAX persistent compilation cache shared by the children; '' disables it.")


def _numbers(flag, convert, default):
  values = flag.value if flag.value is not None else [default]
  try:
    return tuple(convert(v) for v in values)
  except ValueError as e:
    raise app.UsageError(f"--{flag.name}: {e}") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console = Console()
  if _REPLOT.value:
    try:
      result = sweep.replot(_REPLOT.value, console)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    console.print(sweep.sweep_table(result.rows))
    return
  base = serving_flags.serving_config()
  try:
    options = sweep.SweepOptions(
        out_dir=_OUT_DIR.value or os.path.join("runs", time.strftime("sweep-%Y%m%d-%H%M%S")),
        clients=_numbers(_CLIENTS, int, None),
        batch_sizes=_numbers(_BATCH_SIZES, int, base.server.max_batch_size),
        budgets=_numbers(_BUDGETS, int, base.tree.max_budget),
        rtt_ms=_numbers(_RTT_MS, float, base.edge.simulated_rtt_ms),
        proactive_modes=tuple(_PROACTIVE_MODES.value or [base.proactive.mode]),
        systems=tuple(_SYSTEMS.value), num_prompts=_NUM_PROMPTS.value,
        max_new_tokens=_MAX_NEW_TOKENS.value,
        verifier_cpus=processes.parse_cpus(_VERIFIER_CPUS.value),
        drafter_cpus=processes.parse_cpus(_DRAFTER_CPUS.value),
        compilation_cache_dir=_COMPILATION_CACHE_DIR.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  result = sweep.run_sweep(base, options, console)
  console.print(sweep.sweep_table(result.rows))
  console.print(f"wrote {len(result.written)} files and the event logs to {result.out_dir}")


if __name__ == "__main__":
  app.run(main)
