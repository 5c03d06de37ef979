"""What `launch/simulate.py` runs: the simulator's validation against a recorded sweep, and the
comparison at scale. Tables (rich), JSON and PNG (matplotlib) under an output folder.

What this module owns: turning a sweep's report.json and event logs into simulated runs of the
same grid (`validate`), the scale grid of systems x edges x cost models with its capacity search
(`scale`, `capacity`), the CPU and roofline cost models it names (`cpu_costs`,
`roofline_costs`), and the tables and plots of both. It calls `simulator.py` for every run and
`measure/metrics.py` (through `simulator.summarize`) for every figure; it never runs a model.

Validation inputs, per grid point of the sweep: its config (clients, K, batching, batch size,
tree, RTT, slots), its requests replayed (prompt and output lengths, each round's accepted depth:
greedy verification makes these the same in every run), the moments its drafter processes came
up (the workload's arrival schedule), and the edges sharing one core (`--drafter_cpus=1`). Costs
come from a calibration file measured on this machine (`calibrate.py`); no figure of the sweep's
timing (forward times, wall time, ITL) is read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from rich.table import Table

from specedge_jax.api import TreeParams
from specedge_jax.serving.serving_config import BatchingConfig
from specedge_jax.serving.speculation_controller import ControllerConfig
from specedge_jax.sim import acceptance as acceptance_lib
from specedge_jax.sim import costs as costs_lib
from specedge_jax.sim import simulator

Progress = Callable[[str], None]  # one line of what is being simulated now


def _tree(config: Mapping[str, Any]) -> TreeParams:
  t = config["tree"]
  return TreeParams(max_n_beams=int(t["max_n_beams"]), max_beam_len=int(t["max_beam_len"]),
                    max_branch_width=int(t["max_branch_width"]), max_budget=int(t["max_budget"]))


def _batching(config: Mapping[str, Any]) -> BatchingConfig:
  fields = {f.name for f in dataclasses.fields(BatchingConfig)}
  return BatchingConfig(**{k: v for k, v in config["server"]["batching"].items() if k in fields})


def _request_index(request_id: str) -> int:
  tail = request_id.rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def _first_event_times(folder: str, pattern: str) -> dict[str, float]:
  firsts = {}
  for path in sorted(glob.glob(os.path.join(folder, pattern))):
    with open(path) as f:
      times = [json.loads(line) for line in f]
    firsts[os.path.basename(path)] = min(e.get("t_start", e["t"]) for e in times)
  return firsts


_WARMED = re.compile(r"draft engine warmed up in ([0-9.]+) s \(([0-9.]+) s of it waiting")


def _warmups(folder: str, clients: int,
             offsets: Sequence[float]) -> tuple[tuple[float, float], ...]:
  """The drafters' warm-ups that ran while others served, from their logs: drafter i compiled
  for (warmed up - waited) seconds, ending when it started serving (`offsets[i]`); the first to
  start compiled before anyone served and is left out."""
  background = []
  for i in range(clients):
    path = os.path.join(folder, f"drafter{i}.log")
    if not os.path.exists(path) or i >= len(offsets) or offsets[i] <= 0:
      continue
    with open(path) as f:
      match = _WARMED.search(f.read())
    if match:
      compile_s = float(match.group(1)) - float(match.group(2))
      background.append((max(offsets[i] - compile_s, 0.0), compile_s))
  return tuple(background)


# ----------------------------------------------------------------------------------------------
# Validation


@dataclasses.dataclass(frozen=True)
class ValidationOptions:
  sweep_dir: str = "results/sweep"
  calibration: str = "results/sim/calibration_sweep_code.json"
  shared_edge_cores: int = 1  # the sweep's --drafter_cpus=1
  shared_server_core: bool = True  # the sweep's --verifier_cpus=0: servicer and engine share it
  edge_start_offsets: bool = True  # replay when each drafter process came up
  edge_warmups: bool = True  # replay the later drafters' warm-ups on the edge core
  seed: int = 0


def validate(options: ValidationOptions, progress: Progress = lambda line: None
             ) -> dict[str, Any]:
  """Every run of the sweep's report.json simulated at its grid point; rows of real vs sim."""
  with open(os.path.join(options.sweep_dir, "report.json")) as f:
    report = json.load(f)
  costs = costs_lib.cost_model_from_calibration(options.calibration)
  rows = []
  for name, run in report["runs"].items():
    system, config = run["system"], run["config"]
    folder = os.path.join(options.sweep_dir, os.path.dirname(run["event_files"][0]))
    real = run["summary"]
    progress(f"validate {name}")
    started = time.perf_counter()
    if system == "specedge":
      sim = _simulate_sweep_specedge(config, folder, real, costs, options)
    elif system == "server_only_ar":
      sim = _simulate_sweep_ar(config, folder, run, costs, options)
    else:
      continue  # server-only SpecExec drafts on the server: not a system the simulator models
    rows.append(_validation_row(name, system, config, real, sim,
                                time.perf_counter() - started))
  return {"sweep_dir": options.sweep_dir, "calibration": options.calibration,
          "costs": costs.describe(), "options": dataclasses.asdict(options), "rows": rows}


def _simulate_sweep_specedge(config, folder, real, costs, options) -> dict[str, Any]:
  traces = sorted(acceptance_lib.read_traces(folder, "drafter*.jsonl"),
                  key=lambda t: _request_index(t.request_id))
  clients = int(config["edge"]["num_drafters"])
  offsets = []
  if options.edge_start_offsets:
    firsts = _first_event_times(folder, "drafter*.jsonl")
    t0 = min(firsts.values())
    offsets = [firsts.get(f"drafter{i}.jsonl", t0) - t0 for i in range(clients)]
  background = _warmups(folder, clients, offsets) if options.edge_warmups else ()
  tree = _tree(config)
  hazards = [float(real["requests"]["acceptance_by_depth"][str(d)])
             for d in range(1, len(real["requests"]["acceptance_by_depth"]) + 1)]
  path_model = acceptance_lib.PathModel(acceptance_lib.TreeFamily(tree), hazards)
  spec = simulator.SpecEdgeSpec(
      num_edges=clients, requests_per_edge=int(config["edge"]["requests_per_drafter"]),
      tree=tree, batching=_batching(config), max_batch_size=int(config["server"]["max_batch_size"]),
      rtt=simulator.RttSpec(rtt_s=float(config["edge"]["simulated_rtt_ms"]) / 1000.0),
      num_slots=int(config["server"]["num_slots"]), shared_edge_cores=options.shared_edge_cores,
      shared_server_core=options.shared_server_core, edge_start_s=tuple(offsets),
      edge_background=background)
  requests = [simulator.RequestSpec.replay(t) for t in traces]
  run = simulator.run_specedge(spec, costs, requests, path_model, seed=options.seed,
                               run_id="sim")
  return simulator.summarize(run, simulator.SloSpec(itl_s=math.inf))


def _simulate_sweep_ar(config, folder, run, costs, options) -> dict[str, Any]:
  traces = sorted(acceptance_lib.read_traces(folder, os.path.basename(run["event_files"][0])),
                  key=lambda t: _request_index(t.request_id))
  requests = [simulator.RequestSpec(t.request_id, t.prompt_tokens, t.output_tokens)
              for t in traces]
  spec = simulator.ServerOnlySpec(num_users=1,
                                  max_batch_size=int(config["server"]["max_batch_size"]),
                                  closed_loop=False)
  sim = simulator.run_server_only(spec, costs, requests, seed=options.seed, run_id="sim")
  return simulator.summarize(sim, simulator.SloSpec(itl_s=math.inf))


def _validation_row(name, system, config, real, sim, seconds) -> dict[str, Any]:
  def pair(key_real, key_sim, scale=1.0):
    r, s = key_real(real), key_sim(sim)
    r = None if r is None else r * scale
    s = None if s is None else s * scale
    error = (s - r) / r if r and s is not None else None
    return {"real": r, "sim": s, "error": error}

  itl_mean = lambda summary: summary["requests"]["itl"]["mean_s"]
  return {
      "run": name, "system": system, "clients": int(config["edge"]["num_drafters"]),
      "batch_size": int(config["server"]["max_batch_size"]), "sim_seconds": seconds,
      "tok_s_wall": pair(lambda s: s["throughput_per_wall_s"],
                         lambda s: s["throughput_per_wall_s"]),
      "itl_mean_ms": pair(itl_mean, itl_mean, 1e3),
      "itl_p50_ms": pair(lambda s: s["requests"]["itl"]["p50_s"],
                         lambda s: s["requests"]["itl"]["p50_s"], 1e3),
      "itl_p99_ms": pair(lambda s: s["requests"]["itl"]["p99_s"],
                         lambda s: s["requests"]["itl"]["p99_s"], 1e3),
      "ttft_mean_ms": pair(lambda s: s["requests"]["ttft"]["mean_s"],
                           lambda s: s["requests"]["ttft"]["mean_s"], 1e3),
      "tok_s_compute": pair(lambda s: s["throughput_per_compute_s"],
                            lambda s: s["throughput_per_compute_s"]),
      "server_util": pair(lambda s: s["server_utilization"], lambda s: s["server_utilization"]),
      "wall_s": pair(lambda s: s["wall_time_s"], lambda s: s["wall_time_s"]),
  }


def _fmt(value, digits: int = 1) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:+.1f} %"


def validation_table(result: Mapping[str, Any], goal: float = 0.15) -> Table:
  table = Table(title=f"Simulator vs the recorded sweep ({result['sweep_dir']}); costs from "
                f"{result['calibration']}; goal: within {goal:.0%}")
  for column in ("run", "tok/s wall real", "sim", "err", "ITL mean ms real", "sim", "err",
                 "ITL p99 real", "sim", "TTFT ms real", "sim", "tok/s server real", "sim",
                 "util real", "sim"):
    table.add_column(column, justify="left" if column == "run" else "right")
  for row in result["rows"]:
    marks = []
    for key in ("tok_s_wall", "itl_mean_ms"):
      error = row[key]["error"]
      marks.append(_pct(error) + ("" if error is not None and abs(error) <= goal else " !"))
    table.add_row(
        row["run"], _fmt(row["tok_s_wall"]["real"]), _fmt(row["tok_s_wall"]["sim"]), marks[0],
        _fmt(row["itl_mean_ms"]["real"], 2), _fmt(row["itl_mean_ms"]["sim"], 2), marks[1],
        _fmt(row["itl_p99_ms"]["real"]), _fmt(row["itl_p99_ms"]["sim"]),
        _fmt(row["ttft_mean_ms"]["real"]), _fmt(row["ttft_mean_ms"]["sim"]),
        _fmt(row["tok_s_compute"]["real"]), _fmt(row["tok_s_compute"]["sim"]),
        _fmt(100 * row["server_util"]["real"]), _fmt(100 * row["server_util"]["sim"]))
  return table


def plot_validation(result: Mapping[str, Any], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top (plots only)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = result["rows"]
  names = [r["run"].replace("specedge/", "SE ").replace("server_only_ar/", "AR ") for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, key, label in ((axes[0], "tok_s_wall", "tokens / wall s"),
                         (axes[1], "itl_mean_ms", "mean ITL (ms)")):
    ax.bar(x - 0.2, [r[key]["real"] or 0 for r in rows], 0.4, label="real (sweep)")
    ax.bar(x + 0.2, [r[key]["sim"] or 0 for r in rows], 0.4, label="simulated")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.legend()
  fig.suptitle("Simulator vs the recorded sweep (costs measured on this CPU)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# Scale


@dataclasses.dataclass(frozen=True)
class Deployment:
  """A cost model and the server it stands for."""

  name: str
  costs: costs_lib.CostModel
  max_batch_size: int
  num_slots: int
  is_model: bool  # a roofline: "model, not measurement"
  note: str = ""
  shared_server_core: bool = False  # a CPU verifier: its servicer shares the engine's core


def cpu_costs(calibration: str) -> Deployment:
  """This CPU: the serving engines as measured (the embedded pair), the embedded config's
  verifier (8 slots, batches up to 8), every edge on a core of its own."""
  return Deployment(name="cpu-measured", costs=costs_lib.cost_model_from_calibration(calibration),
                    max_batch_size=8, num_slots=8, is_model=False, shared_server_core=True,
                    note=f"embedded pair, costs measured on this CPU ({calibration}); the "
                    "verifier on one core (8 slots, batches up to 8), each edge on a core of "
                    "its own")


def roofline_costs(*, server_gpu: str = "A100-80GB", target: str = "Qwen3-14B",
                   edge_gpu: str = "RTX 4090", draft: str = "Qwen3-1.7B", beams: int = 4,
                   max_batch_size: int = 64, max_len: int = 512, overhead_s: float = 1e-3,
                   round_overhead_s: float = 2e-3) -> Deployment:
  """A model, not a measurement: the target's forward as a roofline on the server GPU, each
  edge drafting with the draft model on its own edge GPU, sessions as many as the KV cache fits
  beside the weights."""
  gpu, model = costs_lib.GPUS[server_gpu], costs_lib.model_shape(target)
  forward = costs_lib.RooflineCost(gpu, model, overhead_s=overhead_s)
  edge = costs_lib.EdgeCosts.roofline(costs_lib.GPUS[edge_gpu], costs_lib.model_shape(draft),
                                      beams=beams, overhead_s=overhead_s)
  slots = costs_lib.kv_slots(gpu, model, max_len)
  costs = costs_lib.CostModel(verify=forward, decode=forward,
                              prefill=costs_lib.PrefillFromForward(forward), edge=edge,
                              round_overhead_s=round_overhead_s,
                              label=f"roofline {target} on {server_gpu}, {draft} on {edge_gpu}")
  return Deployment(name=f"roofline-{target}-{server_gpu}", costs=costs,
                    max_batch_size=max_batch_size, num_slots=slots, is_model=True,
                    note=f"model, not measurement: {costs.label}; {slots} KV slots of {max_len} "
                    f"rows; gRPC round overhead {round_overhead_s * 1e3:.1f} ms")


def bench_gpu_costs(path: str, *, edge_gpu: str = "RTX 4090", draft: str = "Qwen3-1.7B",
                    beams: int = 4, max_batch_size: int = 64, num_slots: int = 256,
                    round_overhead_s: float = 2e-3) -> Deployment:
  """A GPU server as `launch.bench_gpu` measured it (its verify grid; its T = 1 points as the
  decode step; prefill as one forward of the prompt on that table), edges by the roofline."""
  tables = costs_lib.tables_from_bench_gpu(path)
  verify = tables["verify"]
  edge = costs_lib.EdgeCosts.roofline(costs_lib.GPUS[edge_gpu], costs_lib.model_shape(draft),
                                      beams=beams)
  model = costs_lib.CostModel(verify=verify, decode=tables.get("decode", verify),
                              prefill=costs_lib.PrefillFromForward(verify), edge=edge,
                              round_overhead_s=round_overhead_s,
                              label=f"bench_gpu {path}; edges: {draft} on {edge_gpu} (roofline)")
  return Deployment(name=f"bench_gpu-{os.path.basename(os.path.dirname(os.path.abspath(path)))}",
                    costs=model, max_batch_size=max_batch_size, num_slots=num_slots,
                    is_model=False, note=f"server measured by bench_gpu ({verify.source}); "
                    f"edges a roofline model ({draft} on {edge_gpu})")


# specedge_slo: the slo batching mode with the speculation controller; specedge_slo_admission:
# the same plus SLO-aware admission (`server.slo_admission`), as bench_goodput's specedge_slo.
SYSTEMS = ("specedge_static", "specedge_dynamic", "specedge_slo", "specedge_slo_admission",
           "server_only_ar")


@dataclasses.dataclass(frozen=True)
class ScaleOptions:
  edges: tuple[int, ...] = (10, 100, 1000)
  systems: tuple[str, ...] = SYSTEMS
  requests_per_edge: int = 2  # K
  requests_per_client: int = 2  # each of the edges x K places serves this many requests
  min_requests: int = 200
  output_tokens: int = 64
  itl_slo_ms: float = 50.0
  ttft_slo_ms: float = 2000.0
  rtt_ms: float = 14.0
  rtt_sigma: float = 0.0  # > 0: lognormal jitter
  start_spread_s: float = 1.0  # edges come up uniformly over this time
  capacity: bool = True
  capacity_max_edges: int = 1000
  seed: int = 0


def _requests(count: int, prompts: Sequence[int],
              output_tokens: int) -> list[simulator.RequestSpec]:
  return [simulator.RequestSpec(f"r{i}", int(prompts[i % len(prompts)]), output_tokens)
          for i in range(count)]


def run_system(system: str, num_edges: int, deployment: Deployment, options: ScaleOptions,
               path_model: acceptance_lib.PathModel, prompts: Sequence[int]) -> dict[str, Any]:
  """One simulated run of a system at `num_edges` edges; its `simulator.summarize` dict."""
  clients = num_edges * options.requests_per_edge
  count = max(options.min_requests, options.requests_per_client * clients)
  requests = _requests(count, prompts, options.output_tokens)
  rtt = simulator.RttSpec(kind="lognormal" if options.rtt_sigma > 0 else "constant",
                          rtt_s=options.rtt_ms / 1000.0, sigma=options.rtt_sigma)
  slo = simulator.SloSpec(itl_s=options.itl_slo_ms / 1000.0, ttft_s=options.ttft_slo_ms / 1000.0)
  rng = np.random.default_rng(options.seed)
  if system == "server_only_ar":
    spec = simulator.ServerOnlySpec(num_users=clients,
                                    max_batch_size=min(deployment.max_batch_size,
                                                       deployment.num_slots), rtt=rtt)
    run = simulator.run_server_only(spec, deployment.costs, requests, seed=options.seed,
                                    run_id=system)
    return simulator.summarize(run, slo)
  admission = system == "specedge_slo_admission"
  mode = "slo" if admission else system.rsplit("_", 1)[-1]
  batching = BatchingConfig(mode=mode, max_wait_ms=0.0, static_timeout_s=5.0,
                            default_itl_slo_ms=options.itl_slo_ms, max_queue_ms=100.0,
                            slo_margin_ms=1.0)
  controller = ControllerConfig(itl_slo_s=options.itl_slo_ms / 1000.0) if mode == "slo" else None
  spec = simulator.SpecEdgeSpec(
      num_edges=num_edges, requests_per_edge=options.requests_per_edge,
      tree=path_model.family.caps, batching=batching, max_batch_size=deployment.max_batch_size,
      rtt=rtt, num_slots=deployment.num_slots, controller=controller,
      itl_slo_ms=options.itl_slo_ms, shared_server_core=deployment.shared_server_core,
      edge_start_s=tuple(rng.uniform(0.0, options.start_spread_s, num_edges)),
      slo_admission=admission)
  run = simulator.run_specedge(spec, deployment.costs, requests, path_model, seed=options.seed,
                               run_id=system)
  return simulator.summarize(run, slo)


def capacity(attainment_at: Callable[[int], float], *, max_edges: int, threshold: float = 0.9
             ) -> tuple[int, int]:
  """The most edges at which at least `threshold` of requests meet the SLO (0: not even one),
  searched by doubling then bisection, assuming attainment falls as edges are added; also the
  number of runs it took."""
  runs = 0
  lo, hi = 0, None  # lo passes (0: nothing passed yet), hi fails
  n = 1
  while n <= max_edges:
    runs += 1
    if attainment_at(n) >= threshold:
      lo = n
      n *= 2
    else:
      hi = n
      break
  if hi is None:
    if lo < max_edges:
      runs += 1
      if attainment_at(max_edges) >= threshold:
        return max_edges, runs
      hi = max_edges
    else:
      return lo, runs
  while hi - lo > max(1, lo // 20):  # within 5 %
    mid = (lo + hi) // 2
    runs += 1
    if attainment_at(mid) >= threshold:
      lo = mid
    else:
      hi = mid
  return lo, runs


def scale(deployments: Sequence[Deployment], path_model: acceptance_lib.PathModel,
          prompts: Sequence[int], options: ScaleOptions, progress: Progress = lambda line: None
          ) -> dict[str, Any]:
  """Every system at every edge count under every deployment, plus each one's capacity."""
  rows, capacities = [], []
  for deployment in deployments:
    for system in options.systems:
      for edges in options.edges:
        progress(f"{deployment.name}: {system} at {edges} edges")
        started = time.perf_counter()
        summary = run_system(system, edges, deployment, options, path_model, prompts)
        rows.append({"deployment": deployment.name, "is_model": deployment.is_model,
                     "system": system, "edges": edges,
                     "clients": edges * options.requests_per_edge,
                     "sim_seconds": time.perf_counter() - started,
                     **simulator.headline(summary)})
      if options.capacity:
        cache: dict[int, float] = {}

        def attainment(edges: int, system=system, deployment=deployment, cache=cache) -> float:
          if edges not in cache:
            progress(f"{deployment.name}: {system} capacity, trying {edges} edges")
            summary = run_system(system, edges, deployment, options, path_model, prompts)
            cache[edges] = summary["sim"]["slo_attainment"] or 0.0
          return cache[edges]

        started = time.perf_counter()
        best, runs = capacity(attainment, max_edges=options.capacity_max_edges)
        capacities.append({"deployment": deployment.name, "is_model": deployment.is_model,
                           "system": system, "edges": best,
                           "clients": best * options.requests_per_edge, "runs": runs,
                           "tried": {str(k): v for k, v in sorted(cache.items())},
                           "sim_seconds": time.perf_counter() - started})
  return {"options": dataclasses.asdict(options),
          "deployments": [{"name": d.name, "is_model": d.is_model, "note": d.note,
                           "max_batch_size": d.max_batch_size, "num_slots": d.num_slots,
                           "costs": d.costs.describe()} for d in deployments],
          "acceptance": {"hazards": list(path_model.hazards),
                         "agreement": [float(a) for a in path_model.agreement],
                         "tree": dataclasses.asdict(path_model.family.caps),
                         "expected_tokens_per_round": 1.0 + path_model.expected_accepted(
                             path_model.family.tree())},
          "rows": rows, "capacity": capacities}


def scale_tables(result: Mapping[str, Any]) -> list[Table]:
  tables = []
  options = result["options"]
  for deployment in result["deployments"]:
    title = (f"{deployment['name']}" + (" (MODEL, NOT MEASUREMENT)" if deployment["is_model"]
                                        else " (measured curves)") +
             f"; SLO: mean ITL <= {options['itl_slo_ms']:g} ms and TTFT <= "
             f"{options['ttft_slo_ms']:g} ms")
    table = Table(title=title, caption=deployment["note"], caption_justify="left")
    for column in ("system", "edges", "clients", "tok/s wall", "tok/s server", "ITL mean ms",
                   "ITL p50 / p99 ms", "TTFT mean ms", "SLO met %", "goodput tok/s",
                   "goodput req/s", "server util %", "$/1M tok (busy)", "server GPU-h",
                   "edge GPU-h busy", "sim s"):
      table.add_column(column, justify="left" if column == "system" else "right")
    for row in result["rows"]:
      if row["deployment"] != deployment["name"]:
        continue
      table.add_row(
          row["system"], str(row["edges"]), str(row["clients"]), _fmt(row["tok_s_wall"]),
          _fmt(row["tok_s_compute"]), _fmt(row["itl_mean_ms"], 2),
          f"{_fmt(row['itl_p50_ms'])} / {_fmt(row['itl_p99_ms'])}", _fmt(row["ttft_mean_ms"]),
          _fmt(None if row["slo_attainment"] is None else 100 * row["slo_attainment"]),
          _fmt(row["goodput_tok_s"]), _fmt(row["goodput_req_s"], 2),
          _fmt(None if row["server_util"] is None else 100 * row["server_util"]),
          _fmt(row["usd_per_mtok_busy"], 2), _fmt(row["server_gpu_h"], 4),
          _fmt(row["edge_gpu_busy_h"], 3), _fmt(row["sim_seconds"]))
    tables.append(table)
  if result["capacity"]:
    table = Table(title="Capacity: the most concurrent clients (edges x K) at which >= 90 % of "
                  f"requests meet the SLO (searched up to {options['capacity_max_edges']} edges)")
    for column in ("deployment", "system", "edges", "clients", "runs", "sim s"):
      table.add_column(column, justify="left" if column in ("deployment", "system") else "right")
    for row in result["capacity"]:
      table.add_row(row["deployment"] + (" (model)" if row["is_model"] else ""), row["system"],
                    str(row["edges"]), str(row["clients"]), str(row["runs"]),
                    _fmt(row["sim_seconds"]))
    tables.append(table)
  return tables


def plot_scale(result: Mapping[str, Any], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top (plots only)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  deployments = result["deployments"]
  fig, axes = plt.subplots(len(deployments), 3, figsize=(15, 4 * len(deployments)),
                           squeeze=False)
  for row_axes, deployment in zip(axes, deployments):
    rows = [r for r in result["rows"] if r["deployment"] == deployment["name"]]
    for system in result["options"]["systems"]:
      mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["edges"])
      edges = [r["edges"] for r in mine]
      for ax, key in zip(row_axes, ("tok_s_wall", "goodput_tok_s", "itl_mean_ms")):
        ax.plot(edges, [r[key] or 0 for r in mine], marker="o", label=system)
    suffix = " (model, not measurement)" if deployment["is_model"] else " (measured curves)"
    for ax, label in zip(row_axes, ("tokens / wall s", "goodput tokens / s (SLO met)",
                                    "mean ITL (ms)")):
      ax.set_xscale("log")
      ax.set_xlabel("edges")
      ax.set_ylabel(label)
      ax.set_title(deployment["name"] + suffix, fontsize=9)
    row_axes[2].set_yscale("log")
    row_axes[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# The c4 workload's mean prompt length (results/sweep), for a copy of report.json without logs.
DEFAULT_PROMPT_TOKENS = 162


def sweep_workload(sweep_dir: str) -> tuple[acceptance_lib.PathModel, list[int]]:
  """What the scale runs take from the recorded sweep: its tree, its acceptance by depth (the
  first SpecEdge run's; every run of it accepts the same, greedy) and its prompt lengths in
  request order (from the event logs; without them, the mean prompt)."""
  with open(os.path.join(sweep_dir, "report.json")) as f:
    report = json.load(f)
  name, run = next((n, r) for n, r in report["runs"].items() if r["system"] == "specedge")
  hazards = acceptance_lib.hazards_from_report(os.path.join(sweep_dir, "report.json"), name)
  path_model = acceptance_lib.PathModel(acceptance_lib.TreeFamily(_tree(run["config"])), hazards)
  folder = os.path.join(sweep_dir, os.path.dirname(run["event_files"][0]))
  try:
    traces = sorted(acceptance_lib.read_traces(folder),
                    key=lambda t: _request_index(t.request_id))
    prompts = [t.prompt_tokens for t in traces]
  except ValueError:  # the logs are not committed (.gitignore)
    prompts = [DEFAULT_PROMPT_TOKENS]
  return path_model, prompts


def write_json(path: str, data: Any) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2, default=float)
  return path
