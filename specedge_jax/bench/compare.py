"""Systems side by side on one workload, in one run, reported under both metric definitions.

`compare` runs each named system on the same `ServingConfig` workload and hands every event log
to `report.make_report(..., definitions="both")`, so the table, `report.json` and the plots put
this project's definitions beside the reference's for all of them (docs/metric_definitions.md).
The systems:

  specedge              the main job: verifier and drafter processes (`local.run_local`)
  specedge_first_round  the same with the reference's speculative first round
                        (`edge.speculative_first_round`)
  autoregressive        server-only autoregressive decoding (`launch/server_only.py`)
  speculative           server-only speculative decoding (draft and target on the server)
  layer_split           the reference's layer-split baseline: the first `split_layer` layers of
                        the target on the edge, the rest on the server (`serving/layer_split.py`)

Runs go one after another (never overlapping: they share the cores), each under its own run id,
in `out_dir/<system>/`. The layer split runs its tail server and head edges in this process
(`layer_split.run_layer_split`): they share the cores, unlike the other systems' pinned child
processes. This module orchestrates only; the serving code is in serving/.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from rich.console import Console

from specedge_jax.measure import report as report_lib
from specedge_jax.serving import local
from specedge_jax.serving.serving_config import ServingConfig

SYSTEMS = ("specedge", "specedge_first_round", "autoregressive", "speculative", "layer_split")


@dataclasses.dataclass(frozen=True)
class CompareOptions:
  out_dir: str
  systems: tuple[str, ...] = ("specedge", "specedge_first_round", "autoregressive",
                              "speculative")
  verifier_cpus: tuple[int, ...] = ()
  drafter_cpus: tuple[int, ...] = ()
  split_layer: int = 1  # layer_split: layers [0, split_layer) run on the edge
  wire_dtype: str = "bf16"  # layer_split: the hidden states on the wire

  def __post_init__(self):
    unknown = [s for s in self.systems if s not in SYSTEMS]
    if unknown or not self.systems:
      raise ValueError(f"unknown systems {unknown}; known: {SYSTEMS}")
    baselines = {"autoregressive", "speculative"} & set(self.systems)
    if baselines and not {"specedge", "specedge_first_round"} & set(self.systems):
      # run_local runs the server-only baselines after a SpecEdge run, on its requests.
      raise ValueError(f"{sorted(baselines)} run beside a SpecEdge system: add 'specedge'")


@dataclasses.dataclass(frozen=True)
class CompareResult:
  report: report_lib.Report
  event_paths: dict[str, list[str]]  # run id -> its logs
  outputs: dict[str, dict[str, list[int] | None]]  # run id -> request id -> tokens


def _first_round(config: ServingConfig) -> ServingConfig:
  return dataclasses.replace(
      config, edge=dataclasses.replace(config.edge, speculative_first_round=True))


def _run_layer_split(config: ServingConfig, options: CompareOptions, folder: str,
                     console: Console) -> tuple[list[str], dict[str, list[int] | None]]:
  from specedge_jax.serving import layer_split  # pylint: disable=g-import-not-at-top (JAX)

  with console.status(f"layer split at layer {options.split_layer} ({options.wire_dtype} wire)"):
    result = layer_split.run_layer_split(config, split_layer=options.split_layer,
                                         wire_dtype=options.wire_dtype, events_dir=folder,
                                         run_id="layer_split")
  return list(result.event_paths), {o.request_id: list(o.tokens) for o in result.outputs}


def compare(config: ServingConfig, options: CompareOptions, console: Console | None = None,
            on_run: Callable[[str], None] | None = None) -> CompareResult:
  """Runs every system of `options` on `config`'s workload; returns the report of all of them."""
  console = console or Console()
  event_paths: dict[str, list[str]] = {}
  outputs: dict[str, dict[str, list[int] | None]] = {}
  baselines = tuple(s for s in options.systems if s in ("autoregressive", "speculative"))
  pending_baselines = list(baselines)
  for system in options.systems:
    if on_run is not None:
      on_run(system)
    folder = os.path.join(options.out_dir, system)
    if system in ("specedge", "specedge_first_round"):
      # The server-only baselines ride along with the first SpecEdge run (run_local runs them
      # after it, on the same requests).
      run_config = _first_round(config) if system == "specedge_first_round" else config
      result = local.run_local(run_config, local.LocalOptions(
          out_dir=folder, run_id=system, baselines=tuple(pending_baselines),
          verifier_cpus=options.verifier_cpus, drafter_cpus=options.drafter_cpus), console)
      pending_baselines.clear()
      event_paths.update(result.event_paths)
      outputs.update(result.outputs)
    elif system == "layer_split":
      paths, outs = _run_layer_split(config, options, folder, console)
      event_paths["layer_split"], outputs["layer_split"] = paths, outs
  paths = [p for ps in event_paths.values() for p in ps if os.path.exists(p)]
  report = report_lib.make_report(paths, options.out_dir, definitions="both")
  return CompareResult(report=report, event_paths=event_paths, outputs=outputs)


def exact_against(outputs: dict[str, dict[str, list[int] | None]], reference: str
                  ) -> dict[str, float]:
  """Per run: the fraction of requests whose tokens equal the `reference` run's (greedy)."""
  base = outputs.get(reference) or {}
  agreement = {}
  for run, by_request in outputs.items():
    shared = [r for r in by_request if r in base and base[r] is not None]
    if shared:
      agreement[run] = sum(by_request[r] == base[r] for r in shared) / len(shared)
  return agreement


