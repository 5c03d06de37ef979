"""Load test of the serving stack: simulated edge clients through injected faults, bounded.

    python -m launch.load_test --clients=16 --duration_s=600 --out_json=results/load/load.json

See `specedge_jax/bench/load.py` for what runs and what the table reports. Not part of the test
suite (it runs for minutes); its figures are recorded in WORKSPACE_NOTES.md.
"""

import asyncio
import dataclasses
import json
import os

from absl import app, flags

_CLIENTS = flags.DEFINE_integer("clients", 16, "Simulated edge clients.")
_K = flags.DEFINE_integer("requests_per_client", 2, "Requests interleaved on each client.")
_DURATION = flags.DEFINE_float("duration_s", 600.0, "Stop issuing requests after this long.")
_MAX_REQUESTS = flags.DEFINE_integer("max_requests", 100_000, "Stop after this many requests.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Tokens per request.")
_FAULTS = flags.DEFINE_bool("faults", True, "Inject delays, drops and cuts (the default mix).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fault draws.")
_OUT_JSON = flags.DEFINE_string("out_json", None, "Also write the report here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rich.console import Console
  from rich.progress import Progress
  from rich.table import Table

  from specedge_jax.bench import load
  from specedge_jax.testing.fault_proxy import Faults

  config = load.LoadConfig(clients=_CLIENTS.value, requests_per_client=_K.value,
                           duration_s=_DURATION.value, max_requests=_MAX_REQUESTS.value,
                           max_new_tokens=_MAX_NEW.value, seed=_SEED.value,
                           **({} if _FAULTS.value else {"faults": Faults()}))
  console = Console()
  with Progress(console=console) as progress:
    task = progress.add_task("load test", total=config.duration_s)
    report = asyncio.run(load.run_load(
        config, on_progress=lambda done, elapsed: progress.update(
            task, completed=min(elapsed, config.duration_s),
            description=f"load test: {done} requests")))
  table = Table(title="Serving stack under load (fake target, loopback, faults injected)")
  table.add_column("metric")
  table.add_column("value", justify="right")
  for name, value in report.rows():
    table.add_row(name, value)
  console.print(table)
  if _OUT_JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT_JSON.value)), exist_ok=True)
    with open(_OUT_JSON.value, "w") as f:
      json.dump(dataclasses.asdict(report), f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
