"""The grid runner: SpecEdge and the server-only baselines over clients x batch x budget x RTT
x proactive mode.

One invocation runs every system of `SweepOptions.systems` at every grid point on the same
prompts, and writes a results folder:

  <out_dir>/<point>/            one folder per grid point: config.json, every event log and
                                child log of the runs made there (`GridPoint.name`, for example
                                c2-b4-t8-rtt14)
  <out_dir>/report.json         the grid, which run serves each (system, point), each run's
                                `metrics.summarize` summary (our definitions) and its
                                `reference_metrics.summarize_run` summary (the reference's, per
                                system kind), and the legend of both ("definitions")
  <out_dir>/*.png               throughput (both definitions) and ITL against clients (a line per
                                system), ITL CDF, accepted-length histogram, a busy timeline per run

What a grid point means for each system:

  specedge          `clients` drafter processes, each interleaving `edge.requests_per_drafter`
                    requests (K), against one verifier with `server.max_batch_size = batch`,
                    `tree.max_budget = budget`, `edge.simulated_rtt_ms = rtt` and
                    `proactive.mode = proactive` (via `serving.local.run_local`).
  server_only_ar    the target alone with `clients x K` users in flight, that is
  server_only_spec  `server.max_batch_size = min(batch, clients x K)` (`launch/server_only.py`);
                    the speculative baseline drafts with `budget` on the server. Neither has a
                    network, so RTT does not change them, nor does proactive drafting (which
                    fills network waits; the server-only SpecExec never uses it), nor does the
                    budget change the autoregressive one: a baseline run is made once and shared
                    by every grid point that resolves to the same baseline config.

Every run gets its own `run_id` (`<system>/<point>`) so the report never mixes runs; the children
write it into every event, so `launch/report.py` can read a results folder's logs directly (the
sweep also re-tags on reading, which guards against a log moved between folders). This module
orchestrates only:
it loads no model (the children do) and never edits the serving stack.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specedge_jax.engine import PROACTIVE_MODES
from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics, plots
from specedge_jax.measure import reference_metrics as ref_lib
from specedge_jax.serving import local, processes
from specedge_jax.serving.baselines import SYSTEM_NAMES
from specedge_jax.serving.serving_config import ServingConfig

SPECEDGE = "specedge"
# System name -> `launch/server_only.py --baseline` value.
BASELINE_KINDS = {name: kind for kind, name in SYSTEM_NAMES.items()}
SYSTEMS = (SPECEDGE, *SYSTEM_NAMES.values())


@dataclasses.dataclass(frozen=True)
class GridPoint:
  clients: int  # drafters (edges)
  batch_size: int  # server.max_batch_size
  budget: int  # tree.max_budget
  rtt_ms: float  # edge.simulated_rtt_ms
  proactive: str = "disabled"  # proactive.mode

  @property
  def name(self) -> str:
    name = f"c{self.clients}-b{self.batch_size}-t{self.budget}-rtt{self.rtt_ms:g}"
    return name if self.proactive == "disabled" else f"{name}-p{self.proactive}"


@dataclasses.dataclass(frozen=True)
class SweepOptions:
  out_dir: str
  clients: tuple[int, ...] = (1, 2, 4)
  batch_sizes: tuple[int, ...] = (4,)
  budgets: tuple[int, ...] = (8,)
  rtt_ms: tuple[float, ...] = (14.0,)
  proactive_modes: tuple[str, ...] = ("disabled",)
  systems: tuple[str, ...] = SYSTEMS
  num_prompts: int | None = None  # None: the config's workload.num_requests
  max_new_tokens: int | None = None  # None: the config's
  verifier_cpus: tuple[int, ...] = ()  # also pins the baselines
  drafter_cpus: tuple[int, ...] = ()
  compilation_cache_dir: str = local.LocalOptions.compilation_cache_dir
  run_timeout_s: float = 3600.0

  def __post_init__(self):
    for name in ("clients", "batch_sizes", "budgets"):
      values = getattr(self, name)
      if not values or any(int(v) != v or v < 1 for v in values):
        raise ValueError(f"--{name} must be a non-empty list of integers >= 1, got {values}")
      if len(set(values)) != len(values):
        raise ValueError(f"--{name} lists a value twice: {values}")
    if not self.rtt_ms or any(not r >= 0 for r in self.rtt_ms):
      raise ValueError(f"--rtt_ms must be a non-empty list of values >= 0, got {self.rtt_ms}")
    if len(set(self.rtt_ms)) != len(self.rtt_ms):
      raise ValueError(f"--rtt_ms lists a value twice: {self.rtt_ms}")
    bad_modes = [m for m in self.proactive_modes if m not in PROACTIVE_MODES]
    if bad_modes or not self.proactive_modes:
      raise ValueError(f"--proactive_modes must be some of {list(PROACTIVE_MODES)}, got "
                       f"{list(self.proactive_modes)}")
    if len(set(self.proactive_modes)) != len(self.proactive_modes):
      raise ValueError(f"--proactive_modes lists a value twice: {self.proactive_modes}")
    unknown = [s for s in self.systems if s not in SYSTEMS]
    if unknown or not self.systems:
      raise ValueError(f"unknown --systems {unknown or '(none)'}; known: {list(SYSTEMS)}")
    if self.num_prompts is not None and self.num_prompts < 1:
      raise ValueError(f"--num_prompts must be >= 1, got {self.num_prompts}")
    if self.max_new_tokens is not None and self.max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")

  def grid(self) -> list[GridPoint]:
    return [GridPoint(int(c), int(b), int(t), float(r), p) for c, b, t, r, p in
            itertools.product(self.clients, self.batch_sizes, self.budgets, self.rtt_ms,
                              self.proactive_modes)]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One process-level run: a system at the grid points that share its config."""

  name: str  # the run_id, `<system>/<first point>`
  system: str
  config: ServingConfig
  points: tuple[GridPoint, ...]

  @property
  def folder_point(self) -> GridPoint:
    return self.points[0]  # its logs live in the first point's folder


def _replace(config: ServingConfig, **sections: Mapping[str, Any]) -> ServingConfig:
  return dataclasses.replace(config, **{
      section: dataclasses.replace(getattr(config, section), **fields)
      for section, fields in sections.items()})


def point_config(base: ServingConfig, point: GridPoint, options: SweepOptions) -> ServingConfig:
  """The SpecEdge config of a grid point (slots grown so every session fits)."""
  users = point.clients * base.edge.requests_per_drafter
  workload = {}
  if options.num_prompts is not None:
    workload["num_requests"] = options.num_prompts
  if options.max_new_tokens is not None:
    workload["max_new_tokens"] = options.max_new_tokens
  return _replace(
      base, tree={"max_budget": point.budget}, proactive={"mode": point.proactive},
      server={"max_batch_size": point.batch_size, "num_slots": max(base.server.num_slots, users)},
      edge={"num_drafters": point.clients, "simulated_rtt_ms": point.rtt_ms},
      workload=workload)


def baseline_config(specedge_config: ServingConfig) -> ServingConfig:
  """The server-only config for the same users: the batch holds at most clients x K requests.

  Edge fields that a baseline never reads are normalised, so that two grid points whose baseline
  runs would be the same resolve to equal configs.
  """
  edge = specedge_config.edge
  users = edge.num_drafters * edge.requests_per_drafter
  return _replace(specedge_config,
                  server={"max_batch_size": min(specedge_config.server.max_batch_size, users)},
                  edge={"num_drafters": 1, "requests_per_drafter": 1,
                        "simulated_rtt_ms": 0.0},
                  proactive={"mode": "disabled"})


def plan_runs(base: ServingConfig, options: SweepOptions) -> list[PlannedRun]:
  """The runs to make, in order: per grid point, SpecEdge then each new baseline config."""
  runs: list[PlannedRun] = []
  shared: dict[tuple[str, str], int] = {}  # (system, baseline config JSON) -> index in runs
  for point in options.grid():
    config = point_config(base, point, options)
    for system in options.systems:
      if system == SPECEDGE:
        runs.append(PlannedRun(f"{system}/{point.name}", system, config, (point,)))
        continue
      run_config = baseline_config(config)
      if system == SYSTEM_NAMES["autoregressive"]:
        # The autoregressive baseline never drafts: the tree budget does not change it.
        run_config = _replace(run_config, tree={"max_budget": base.tree.max_budget})
      key = (system, json.dumps(run_config.to_dict(), sort_keys=True))
      if key in shared:
        planned = runs[shared[key]]
        runs[shared[key]] = dataclasses.replace(planned, points=planned.points + (point,))
      else:
        shared[key] = len(runs)
        runs.append(PlannedRun(f"{system}/{point.name}", system, run_config, (point,)))
  return runs


@dataclasses.dataclass(frozen=True)
class SweepRow:
  """A (system, grid point) pair and the summary of the run that serves it."""

  system: str
  point: GridPoint
  summary: metrics.RunSummary
  same_tokens_as_ar: bool | None  # greedy only: equal to the AR baseline at this point
  reference: ref_lib.ReferenceSummary | None = None  # the reference's definitions


@dataclasses.dataclass(frozen=True)
class SweepResult:
  rows: list[SweepRow]
  runs: list[metrics.Run]
  summaries: list[metrics.RunSummary]
  written: list[str]
  out_dir: str


def child_env(options: SweepOptions) -> dict[str, str]:
  """The environment of a child the sweep starts, as run_local's children have it: unbuffered
  logs, the repo importable, the shared compilation cache."""
  path = os.environ.get("PYTHONPATH", "")
  env = {"PYTHONUNBUFFERED": "1",
         "PYTHONPATH": local.REPO_ROOT + (os.pathsep + path if path else "")}
  if options.compilation_cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=options.compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_baseline(run: PlannedRun, folder: str, options: SweepOptions) -> list[str]:
  """Runs `launch/server_only.py` for a planned baseline run (its config written to `folder`,
  pinned to `options.verifier_cpus`); returns its event log. Also used by `goodput.py`."""
  stem = plots.file_safe(run.system)
  config_path = os.path.join(folder, f"{stem}.config.json")
  run.config.save_json(config_path)
  events_path = os.path.join(folder, f"{stem}.jsonl")
  log_path = os.path.join(folder, f"{stem}.log")
  if os.path.exists(events_path):
    os.remove(events_path)  # logs append; a rerun into the same folder must not mix runs
  argv = processes.python_module_argv(
      "launch.server_only", f"--config_json={config_path}", f"--parent_pid={os.getpid()}",
      f"--baseline={BASELINE_KINDS[run.system]}", f"--event_log={events_path}",
      f"--run_id={run.name}")
  if options.verifier_cpus:
    argv.append(f"--cpus={','.join(str(c) for c in options.verifier_cpus)}")
  children = processes.ChildProcesses()
  try:
    child = children.start(run.system, argv, log_path, env=child_env(options))
    deadline = time.monotonic() + options.run_timeout_s
    while child.poll() is None:
      if time.monotonic() > deadline:
        raise local.ChildFailed(f"{run.name} did not finish in {options.run_timeout_s:.0f} s")
      time.sleep(0.2)
    if child.returncode != 0:
      raise local.ChildFailed(f"{run.name} exited with status {child.returncode}; the end of "
                              f"{log_path}:\n{processes.log_tail(log_path)}")
  finally:
    children.kill_all()
  return [events_path]


def _run_specedge(run: PlannedRun, folder: str, options: SweepOptions) -> list[str]:
  # run_local draws its own progress bars; rich allows one live display at a time, so they go
  # to a log file while the sweep's bar owns the terminal.
  with open(os.path.join(folder, "specedge.progress.log"), "w") as progress_log:
    result = local.run_local(run.config, local.LocalOptions(
        out_dir=folder, verifier_cpus=options.verifier_cpus, drafter_cpus=options.drafter_cpus,
        compilation_cache_dir=options.compilation_cache_dir,
        run_timeout_s=options.run_timeout_s, run_id=run.name),
        console=Console(file=progress_log, width=120))
  return result.event_paths[run.name]


def read_run_events(run_paths: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
  """Every event of every run, tagged with its run's name as `run_id`."""
  tagged = []
  for name, paths in run_paths.items():
    for event in events_lib.read_events(paths):
      tagged.append({**event, "run_id": name})
  return tagged


def _outputs(events: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  outputs: dict[str, dict[str, Any]] = {}
  for event in events:
    if event["kind"] == "request_end":
      outputs.setdefault(event["run_id"], {})[event["request_id"]] = event.get("output_tokens")
  return outputs


def run_sweep(base: ServingConfig, options: SweepOptions,
              console: Console | None = None) -> SweepResult:
  """Runs the grid, writes the results folder; returns the rows, runs and written files."""
  console = console or Console()
  planned = plan_runs(base, options)
  os.makedirs(options.out_dir, exist_ok=True)
  run_paths: dict[str, list[str]] = {}
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("runs"), TimeElapsedColumn())
  with Progress(*columns, console=console) as progress:
    task = progress.add_task("sweep", total=len(planned))
    for run in planned:
      progress.update(task, description=f"sweep: {run.name}")
      folder = os.path.join(options.out_dir, run.folder_point.name)
      os.makedirs(folder, exist_ok=True)
      if run.system == SPECEDGE:
        run_paths[run.name] = _run_specedge(run, folder, options)
      else:
        run_paths[run.name] = run_baseline(run, folder, options)
      progress.advance(task)
    progress.update(task, description="sweep")

  return _summarize_and_write(options, planned, run_paths,
                              greedy=base.workload.temperature == 0)


def _summarize_and_write(options: SweepOptions, planned: Sequence[PlannedRun],
                         run_paths: Mapping[str, Sequence[str]], greedy: bool) -> SweepResult:
  """Reads the runs' logs; writes report.json and the plots; returns the rows."""
  events = read_run_events(run_paths)
  runs, summaries = metrics.summarize_events(events)
  ref_summaries = ref_lib.summarize_events(events)
  by_name = {s.run: s for s in summaries}
  outputs = _outputs(events)
  ar_system = SYSTEM_NAMES["autoregressive"]
  serving = {(run.system, point): run.name for run in planned for point in run.points}
  rows = []
  for point in options.grid():
    for system in options.systems:
      name = serving[(system, point)]
      same = None
      reference = serving.get((ar_system, point))
      if greedy and reference is not None and system != ar_system:
        same = outputs.get(name) == outputs.get(reference)
      rows.append(SweepRow(system, point, by_name[name], same, ref_summaries.get(name)))
  written = [write_report(options, planned, run_paths, rows, summaries, ref_summaries)]
  written += write_plots(options, rows, runs, summaries, ref_summaries)
  return SweepResult(rows=rows, runs=runs, summaries=summaries, written=written,
                     out_dir=options.out_dir)


def replot(out_dir: str, console: Console | None = None) -> SweepResult:
  """Rebuilds the summaries, report.json and plots of a finished sweep from its event logs.

  Runs nothing: it reads `report.json` (the grid, the runs and their event files) and the logs
  beside it, so a change to a metric or a plot applies to measured runs without measuring again.
  """
  path = os.path.join(out_dir, "report.json")
  try:
    with open(path) as f:
      report = json.load(f)
    grid = report["grid"]
    options = SweepOptions(out_dir=out_dir, clients=tuple(grid["clients"]),
                           batch_sizes=tuple(grid["batch_sizes"]), budgets=tuple(grid["budgets"]),
                           rtt_ms=tuple(float(r) for r in grid["rtt_ms"]),
                           # Reports written before proactive became a grid dimension.
                           proactive_modes=tuple(grid.get("proactive_modes", ("disabled",))),
                           systems=tuple(grid["systems"]))
    run_paths = {name: [os.path.join(out_dir, p) for p in run["event_files"]]
                 for name, run in report["runs"].items()}
    planned = [PlannedRun(name, run["system"], ServingConfig.from_mapping(run["config"]),
                          tuple(p for p in options.grid() if p.name in run["points"]))
               for name, run in report["runs"].items()]
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is not a sweep report: {e}") from e
  missing = [p for paths in run_paths.values() for p in paths if not os.path.exists(p)]
  if missing:
    raise ValueError(f"event logs named in {path} are missing (first: {missing[0]}); the "
                     "logs are not committed with results/, rerun the sweep to replot")
  greedy = all(run.config.workload.temperature == 0 for run in planned)
  result = _summarize_and_write(options, planned, run_paths, greedy)
  if console is not None:
    console.print(f"replotted {len(result.written)} files in {out_dir}")
  return result


def write_report(options: SweepOptions, planned: Sequence[PlannedRun],
                 run_paths: Mapping[str, Sequence[str]], rows: Sequence[SweepRow],
                 summaries: Sequence[metrics.RunSummary],
                 reference: Mapping[str, ref_lib.ReferenceSummary] | None = None) -> str:
  by_name = {s.run: s for s in summaries}
  reference = reference or {}
  report = {
      "grid": {"clients": list(options.clients), "batch_sizes": list(options.batch_sizes),
               "budgets": list(options.budgets), "rtt_ms": list(options.rtt_ms),
               "proactive_modes": list(options.proactive_modes),
               "systems": list(options.systems)},
      # (system, point) -> the run serving it; baselines are shared across points (see module).
      "points": [{"system": r.system, **dataclasses.asdict(r.point), "point": r.point.name,
                  "run": r.summary.run, "same_tokens_as_ar": r.same_tokens_as_ar}
                 for r in rows],
      "runs": {run.name: {"system": run.system, "points": [p.name for p in run.points],
                          "event_files": [os.path.relpath(p, options.out_dir)
                                          for p in run_paths[run.name]],
                          "config": run.config.to_dict(),
                          "summary": by_name[run.name].to_dict(),
                          "reference": (reference[run.name].to_dict()
                                        if run.name in reference else None)}
               for run in planned},
      # What "summary" (ours) and "reference" (kaist-ina/specedge src/metric/*.py) mean.
      "definitions": {name: list(lines) for name, lines in ref_lib.LEGEND.items()},
  }
  path = os.path.join(options.out_dir, "report.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  return path


def _line_label(row: SweepRow, options: SweepOptions) -> str:
  """The system, plus the grid dimensions that vary and that change this system."""
  parts = [row.system]
  if len(options.batch_sizes) > 1:
    parts.append(f"b{row.point.batch_size}")
  if len(options.budgets) > 1 and row.system != SYSTEM_NAMES["autoregressive"]:
    parts.append(f"t{row.point.budget}")
  if len(options.rtt_ms) > 1 and row.system == SPECEDGE:
    parts.append(f"rtt{row.point.rtt_ms:g}")
  if len(options.proactive_modes) > 1 and row.system == SPECEDGE:
    parts.append(f"proactive {row.point.proactive}")
  return " ".join(parts)


def write_plots(options: SweepOptions, rows: Sequence[SweepRow], runs: Sequence[metrics.Run],
                summaries: Sequence[metrics.RunSummary],
                reference: Mapping[str, ref_lib.ReferenceSummary] | None = None) -> list[str]:
  """The PNGs of the results folder (drawn by `plots.py`)."""
  # The against-clients plots read `system` for the line and `n_clients` for x. A baseline's
  # summary counts one client (the server); here x is the grid's client count, whose users it
  # served, and each line is a system at fixed other grid values.
  points: dict[tuple[str, int], metrics.RunSummary] = {}
  for row in rows:
    label = _line_label(row, options)
    points.setdefault((label, row.point.clients), dataclasses.replace(
        row.summary, system=label, n_clients=row.point.clients))
  # The replaced summaries keep their run names, by which `reference` is keyed.
  return plots.write_report_plots(options.out_dir, runs, summaries,
                                  line_summaries=list(points.values()),
                                  reference=dict(reference or {}))


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
  return "-" if value is None else f"{value * scale:.{digits}f}"


def sweep_table(rows: Sequence[SweepRow]) -> Table:
  """One row per (system, grid point); the caption is the legend of both definitions."""
  # Escaped: rich would read '[ours]' and '[ref]' as markup tags and drop them.
  table = Table(title="Sweep", caption=escape("\n".join(ref_lib.legend(ref_lib.DEFINITION_SETS))),
                caption_justify="left")
  for column in ("system", "clients", "batch", "budget", "RTT ms", "proactive", "tokens",
                 "wall s", "tok/s wall", "tok/s server [ours]", "tok/s [ref]",
                 "ITL mean ms [ours]", "ITL p50 / p99 ms [ours]", "ITL ms/tok [ref]",
                 "TTFT mean ms", "tok/step [ours]", "tok/step [ref]", "hit %",
                 "server util %", "= AR tokens"):
    table.add_column(escape(column), justify="left" if column == "system" else "right")
  for row in rows:
    s, m, r = row.summary, row.summary.requests, row.reference
    table.add_row(
        row.system, str(row.point.clients), str(row.point.batch_size), str(row.point.budget),
        f"{row.point.rtt_ms:g}", row.point.proactive if row.system == SPECEDGE else "-",
        str(s.generated_tokens), _fmt(s.wall_time_s, digits=2),
        _fmt(s.throughput_per_wall_s), _fmt(s.throughput_per_compute_s),
        _fmt(r.throughput_tok_s if r else None),
        _fmt(m.itl.mean_s, 1e3, 2), f"{_fmt(m.itl.p50_s, 1e3, 2)} / {_fmt(m.itl.p99_s, 1e3, 2)}",
        _fmt(r.itl_s if r else None, 1e3, 2),
        _fmt(m.ttft.mean_s, 1e3), _fmt(m.mean_tokens_per_step, digits=2),
        _fmt(r.tokens_per_step.mean if r else None, digits=2),
        _fmt(m.proactive_hit_rate, 100), _fmt(s.server_utilization, 100),
        "-" if row.same_tokens_as_ar is None else ("yes" if row.same_tokens_as_ar else "NO"))
  return table
