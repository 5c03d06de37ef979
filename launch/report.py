"""Reports a run from its JSONL event logs: rich tables on stdout, report.json + PNGs in --out_dir.

  python -m launch.report --events 'runs/exp1/*.jsonl' --out_dir runs/exp1/report --itl_slo_ms 50
  python -m launch.report --events 'runs/exp1/*.jsonl' --definitions=both --plain > runs.tsv

Our figures are defined in `specedge_jax/measure/metrics.py`, the reference's (kaist-ina/specedge
src/metric/*.py, per system kind) in `specedge_jax/measure/reference_metrics.py`; both are
tabulated in docs/metric_definitions.md. With --plain, stdout is the TSV alone (a header and a
line per run); the legend and the list of files written go to stderr.
"""

import sys

from absl import app, flags
from rich.console import Console

from specedge_jax.measure import metrics, report

_EVENTS = flags.DEFINE_multi_string(
    "events", None, "Glob of JSONL event logs (repeatable); events group into runs by run_id, "
    "else by system.")
_OUT_DIR = flags.DEFINE_string("out_dir", "report", "Folder for report.json and the PNGs.")
_ITL_SLO_MS = flags.DEFINE_float("itl_slo_ms", None,
                                 "Inter-token latency SLO in ms for goodput; unset: no goodput.")
_SERVER_GPU = flags.DEFINE_string("server_gpu", "A100-80GB", "Price-table name of the server GPU.")
_EDGE_GPU = flags.DEFINE_string("edge_gpu", "RTX 4090", "Price-table name of the edge GPUs.")
_GPU_PRICES = flags.DEFINE_multi_string(
    "gpu_price", [], "NAME=DOLLARS_PER_HOUR, added to or overriding the defaults "
    f"{dict(metrics.DEFAULT_GPU_PRICES)} (repeatable).")
_DEFINITIONS = flags.DEFINE_enum(
    "definitions", "ours", list(report.DEFINITIONS),
    "Which metric definitions to report: ours (metrics.py), the reference's (per system kind, "
    "reference_metrics.py), or both; every label says which it is.")
_PLAIN = flags.DEFINE_boolean(
    "plain", False, "Print one tab-separated line per run (header first) instead of the tables.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _EVENTS.value:
    raise app.UsageError("--events is required")
  cost_config = metrics.CostConfig(server_gpu=_SERVER_GPU.value, edge_gpu=_EDGE_GPU.value,
                                   gpu_prices_per_hour=metrics.parse_gpu_prices(_GPU_PRICES.value))
  slo_s = _ITL_SLO_MS.value / 1e3 if _ITL_SLO_MS.value is not None else None
  made = report.make_report(report.expand_globs(_EVENTS.value), _OUT_DIR.value, cost_config,
                            slo_s, _DEFINITIONS.value)
  if _PLAIN.value:
    sys.stdout.write(made.tsv)
    sys.stderr.write("".join(f"# {line}\n" for line in made.legend))
    sys.stderr.write("wrote " + ", ".join(made.written) + "\n")
    return
  console = Console()
  for table in made.tables:
    console.print(table)
  console.print("wrote " + ", ".join(made.written))


if __name__ == "__main__":
  app.run(main)
