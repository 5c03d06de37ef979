"""The capacity simulator: validation against a recorded sweep, SpecEdge vs server-only at scale.

  python -m launch.simulate --calibrate      # measure this CPU's curves (engines, gRPC round)
  python -m launch.simulate --validate       # predict results/sweep, table sim vs real
  python -m launch.simulate --scale          # 10/100/1000 edges, CPU curves and a roofline

Outputs go to --out_dir (results/sim): validation.json/.png, scale.json/.png, calibration JSON.
All logic lives in specedge_jax/sim (see its package docstring).
"""

import os
import time

from absl import app, flags
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_VALIDATE = flags.DEFINE_bool("validate", False, "Predict the recorded sweep's grid.")
_SCALE = flags.DEFINE_bool("scale", False, "SpecEdge static/dynamic/slo and server-only at scale.")
_CALIBRATE = flags.DEFINE_bool(
    "calibrate", False, "Measure the CPU cost curves (the serving engines in process, pinned to "
    "--calibrate_cpus; the gRPC + TLS round on loopback) into --calibration_out.")
_OUT_DIR = flags.DEFINE_string("out_dir", "results/sim", "Where JSON and PNG files go.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", "results/sweep", "The recorded sweep (with logs).")
_CALIBRATION = flags.DEFINE_string(
    "calibration", "results/sim/calibration_sweep_code.json",
    "--validate: the calibration measured with the code that ran the sweep.")
_SCALE_CALIBRATION = flags.DEFINE_string(
    "scale_calibration", "results/sim/calibration.json",
    "--scale: the calibration of the current code (the CPU's measured curves).")
_CALIBRATION_OUT = flags.DEFINE_string("calibration_out", "results/sim/calibration.json",
                                       "--calibrate: the file written.")
_CALIBRATE_CONFIG = flags.DEFINE_string(
    "calibrate_config", "results/sweep/c4-b8-t8-rtt14/config.json",
    "--calibrate: the serving config (JSON) whose engines are measured (batch up to 8).")
_CALIBRATE_CPUS = flags.DEFINE_string("calibrate_cpus", "0",
                                      "--calibrate: the core the engines are measured on.")
_CALIBRATE_DRAFTERS = flags.DEFINE_list(
    "calibrate_drafters", ["1", "2", "4"], "--calibrate: drafter processes per core measured "
    "(the sharing inflation; 1 alone gives the drafter's CPU per round).")
_GRPC_CPUS = flags.DEFINE_list("grpc_cpus", ["0", "1"],
                               "--calibrate: server core, client core of the gRPC round.")
_EDGES = flags.DEFINE_list("edges", ["10", "100", "1000"], "--scale: edge counts.")
_SYSTEMS = flags.DEFINE_list(
    "systems", ["specedge_static", "specedge_dynamic", "specedge_slo", "specedge_slo_admission",
                "server_only_ar"],
    "--scale: systems (specedge_slo: slo batching and the controller; specedge_slo_admission: "
    "the same with SLO-aware admission).")
_ITL_SLO_MS = flags.DEFINE_float("itl_slo_ms", 50.0, "--scale: the ITL SLO (mean per request).")
_TTFT_SLO_MS = flags.DEFINE_float("ttft_slo_ms", 2000.0, "--scale: the TTFT bound of the SLO.")
_REQUESTS_PER_CLIENT = flags.DEFINE_integer("requests_per_client", 2,
                                            "--scale: requests per place (edges x K).")
_CAPACITY = flags.DEFINE_bool("capacity", True, "--scale: search each system's capacity.")
_SERVER_GPU = flags.DEFINE_string("server_gpu", "A100-80GB", "--scale: the roofline's GPU.")
_TARGET = flags.DEFINE_string("target", "Qwen3-14B", "--scale: the roofline's target.")
_EDGE_GPU = flags.DEFINE_string("edge_gpu", "RTX 4090", "--scale: the edges' GPU (roofline).")
_DRAFT = flags.DEFINE_string("draft", "Qwen3-1.7B", "--scale: the edges' draft (roofline).")
_GPU_BATCH = flags.DEFINE_integer("gpu_max_batch_size", 64, "--scale: the roofline's batch.")
_BENCH_GPU_JSON = flags.DEFINE_string(
    "bench_gpu_json", "", "--scale: also a server measured by launch.bench_gpu (its JSON).")
_RTT_MS = flags.DEFINE_float("rtt_ms", 14.0, "--scale: the edges' median round trip.")
_RTT_SIGMA = flags.DEFINE_float("rtt_sigma", 0.0,
                                "--scale: lognormal jitter of each direction (0: constant).")
_SEED = flags.DEFINE_integer("seed", 0, "Simulation seed.")
_CODE = flags.DEFINE_string(
    "code", "the working tree", "--calibrate: which code is measured, for the file (e.g. 'git "
    "archive 147caa8', the commit that ran results/sweep).")


def _progress(console: Console, total: int | None) -> Progress:
  return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True)


def _calibrate(console: Console) -> None:
  from specedge_jax.serving import processes
  from specedge_jax.sim import calibrate

  data = calibrate.calibrate_all(
      _CALIBRATE_CONFIG.value, server_cpus=(int(_GRPC_CPUS.value[0]),),
      client_cpus=(int(_GRPC_CPUS.value[1]),),
      engine_cpus=processes.parse_cpus(_CALIBRATE_CPUS.value),
      drafters=tuple(int(n) for n in _CALIBRATE_DRAFTERS.value), on_line=console.print)
  data["command"] = ("python -m launch.simulate --calibrate "
                     f"--calibrate_config={_CALIBRATE_CONFIG.value} "
                     f"--calibrate_drafters={','.join(_CALIBRATE_DRAFTERS.value)} "
                     f"--calibrate_cpus={_CALIBRATE_CPUS.value} --calibration_out="
                     f"{_CALIBRATION_OUT.value}")
  data["code"] = _CODE.value
  calibrate.write(_CALIBRATION_OUT.value, data)
  console.print(f"wrote {_CALIBRATION_OUT.value} ({data['wall_s']:.0f} s)")


def _validate(console: Console) -> None:
  from specedge_jax.sim import experiments

  options = experiments.ValidationOptions(sweep_dir=_SWEEP_DIR.value,
                                          calibration=_CALIBRATION.value, seed=_SEED.value)
  started = time.perf_counter()
  with _progress(console, None) as progress:
    task = progress.add_task("validate", total=None)
    result = experiments.validate(options, lambda line: progress.update(task, description=line,
                                                                        advance=1))
  result["wall_s"] = time.perf_counter() - started
  console.print(experiments.validation_table(result))
  json_path = experiments.write_json(os.path.join(_OUT_DIR.value, "validation.json"), result)
  png = experiments.plot_validation(result, os.path.join(_OUT_DIR.value, "validation.png"))
  console.print(f"wrote {json_path}, {png} ({result['wall_s']:.1f} s)")


def _scale(console: Console) -> None:
  from specedge_jax.sim import experiments

  try:
    edges = tuple(int(e) for e in _EDGES.value)
  except ValueError as e:
    raise app.UsageError(f"--edges: {e}") from e
  unknown = [s for s in _SYSTEMS.value if s not in experiments.SYSTEMS]
  if unknown:
    raise app.UsageError(f"unknown --systems {unknown}; known: {list(experiments.SYSTEMS)}")
  options = experiments.ScaleOptions(
      edges=edges, systems=tuple(_SYSTEMS.value), itl_slo_ms=_ITL_SLO_MS.value,
      ttft_slo_ms=_TTFT_SLO_MS.value, requests_per_client=_REQUESTS_PER_CLIENT.value,
      capacity=_CAPACITY.value, capacity_max_edges=max(edges), rtt_ms=_RTT_MS.value,
      rtt_sigma=_RTT_SIGMA.value, seed=_SEED.value)
  deployments = [experiments.cpu_costs(_SCALE_CALIBRATION.value),
                 experiments.roofline_costs(server_gpu=_SERVER_GPU.value, target=_TARGET.value,
                                            edge_gpu=_EDGE_GPU.value, draft=_DRAFT.value,
                                            max_batch_size=_GPU_BATCH.value)]
  if _BENCH_GPU_JSON.value:
    deployments.append(experiments.bench_gpu_costs(_BENCH_GPU_JSON.value,
                                                   edge_gpu=_EDGE_GPU.value, draft=_DRAFT.value,
                                                   max_batch_size=_GPU_BATCH.value))
  path_model, prompts = experiments.sweep_workload(_SWEEP_DIR.value)
  started = time.perf_counter()
  with _progress(console, None) as progress:
    task = progress.add_task("scale", total=None)
    result = experiments.scale(deployments, path_model, prompts, options,
                               lambda line: progress.update(task, description=line, advance=1))
  result["wall_s"] = time.perf_counter() - started
  for table in experiments.scale_tables(result):
    console.print(table)
  json_path = experiments.write_json(os.path.join(_OUT_DIR.value, "scale.json"), result)
  png = experiments.plot_scale(result, os.path.join(_OUT_DIR.value, "scale.png"))
  console.print(f"wrote {json_path}, {png} ({result['wall_s']:.1f} s)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not (_VALIDATE.value or _SCALE.value or _CALIBRATE.value):
    raise app.UsageError("give --calibrate, --validate and/or --scale")
  console = Console()
  if _CALIBRATE.value:
    _calibrate(console)
  if _VALIDATE.value:
    _validate(console)
  if _SCALE.value:
    _scale(console)


if __name__ == "__main__":
  app.run(main)
