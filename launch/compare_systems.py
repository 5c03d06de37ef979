"""Systems side by side on one workload, reported under our and the reference's definitions.

    python -m launch.compare_systems --out_dir=results/first_round \\
        --systems=specedge,specedge_first_round
    python -m launch.compare_systems --out_dir=results/reference_mode/c4 \\
        --systems=specedge,autoregressive,speculative,layer_split \\
        --config.workload.source=c4 --config.workload.mode=reference \\
        --config.edge.requests_per_drafter=1 --config.workload.num_requests=8

Systems: specedge_jax/bench/compare.py. Runs one after another, then prints the report table
(both definitions, the legend under it) and whether each run's outputs equal the first run's.
Writes report.json and the plots into --out_dir.
"""

import sys

from absl import app, flags
from rich.console import Console

from launch import serving_flags
from specedge_jax.bench import compare
from specedge_jax.serving import local, processes

_OUT_DIR = flags.DEFINE_string("out_dir", "results/compare", "Where runs and the report go.")
_SYSTEMS = flags.DEFINE_list("systems", list(compare.CompareOptions.systems),
                             f"Systems to run, in order: {', '.join(compare.SYSTEMS)}.")
_VERIFIER_CPUS = flags.DEFINE_string("verifier_cpus", "", "Pin the server side.")
_DRAFTER_CPUS = flags.DEFINE_string("drafter_cpus", "", "Pin the edges.")
_SPLIT_LAYER = flags.DEFINE_integer("split_layer", 1, "layer_split: layers on the edge.")
_WIRE_DTYPE = flags.DEFINE_enum("wire_dtype", "bf16", ["bf16", "fp16", "fp32"],
                                "layer_split: dtype of the hidden states on the wire.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    options = compare.CompareOptions(
        out_dir=_OUT_DIR.value, systems=tuple(_SYSTEMS.value),
        verifier_cpus=processes.parse_cpus(_VERIFIER_CPUS.value),
        drafter_cpus=processes.parse_cpus(_DRAFTER_CPUS.value), split_layer=_SPLIT_LAYER.value,
        wire_dtype=_WIRE_DTYPE.value)
    config = serving_flags.serving_config()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  console = Console()
  try:
    result = compare.compare(config, options, console,
                             on_run=lambda system: console.rule(f"[bold]{system}"))
  except local.ChildFailed as e:
    console.print(str(e), style="red", markup=False, highlight=False)
    sys.exit(1)
  for table in result.report.tables:
    console.print(table)
  for line in result.report.legend:
    console.print(line, markup=False, highlight=False)
  first = options.systems[0]
  agreement = compare.exact_against(result.outputs, first)
  console.print("outputs equal to " + first + "'s: " + ", ".join(
      f"{run} {share:.0%}" for run, share in agreement.items()))
  console.print(f"report.json and plots in {options.out_dir}")


if __name__ == "__main__":
  app.run(main)
