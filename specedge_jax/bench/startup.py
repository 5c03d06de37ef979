"""Where `python -m launch.local` spends its start-up: phases per process, cold and warm.

Runs the main job as a new user would (`python -m launch.local` in a subprocess), once with an
empty JAX compilation cache (cold) and then again on the cache that run filled (warm), and reads
back where each process's time went:

  parent    launch.local's own milestones (`<out_dir>/timeline.json`, written by serving/local.py)
  verifier  process start -> imports and setup -> target model loaded -> engine warmed up ->
            serving (tokenizer, gRPC server); marks from runners.py's log lines
  drafterN  process start -> imports, requests and tokenizer -> draft model loaded -> warmed up
            -> its first request (waiting for the verifier); the last from its JSONL events

and, per child, what JAX compiled (from `JAX_LOG_COMPILES` lines in its log: programs, persistent
cache hits, tracing, lowering, XLA compile and cache-load seconds, and any program compiled after
the process was ready, which a warm-up should have covered) and its CPU seconds (psutil, sampled
while it runs). With `importtime` every process also runs under `PYTHONPROFILEIMPORTTIME` and
the table gains the import seconds of the heavy packages (this slows the imports a little).

This module runs no model itself; it only launches, samples and parses.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psutil
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

HEAVY_PACKAGES = ("jax", "flax", "orbax.checkpoint", "transformers", "torch", "grpc", "matplotlib",
                  "cryptography")
# absl's line prefix: severity, MMDD, time, thread id, file:line]
_ABSL_LINE = re.compile(r"^[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2}\.\d+) +\d+ \S+\] (.*)$")
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)\s*$")
_PARENT_MARKS = {  # timeline.json key -> what the parent did until then (older keys too)
    "run_local": "python start, imports, flags",
    "verifier_started": "config, requests, PKI, spawn the verifier",
    "children_started": "config, PKI, spawn every child",
    "verifier_serving": "wait for the verifier's port",
    "drafters_started": "spawn the drafters",
    "drafters_done": "generation, until the drafters are done",
    "verifier_stopped": "stop the verifier",
    "drafters_exited": "wait for the drafters to exit",
    "summarized": "summary",
}


@dataclasses.dataclass
class CompileStats:
  programs: int = 0  # XLA compilations requested (one per jitted program and shape)
  cache_hits: int = 0  # of those, loaded from the persistent cache
  trace_s: float = 0.0
  lower_s: float = 0.0  # jaxpr -> StableHLO (needed for the cache key, hit or miss)
  compile_s: float = 0.0  # XLA compile of the misses
  cache_load_s: float = 0.0  # "compile" of the hits: reading and loading the executable
  after_ready: int = 0  # programs compiled after the process was ready

  def describe(self) -> str:
    return (f"{self.programs} programs, {self.cache_hits} cache hits; trace {self.trace_s:.2f} s, "
            f"lower {self.lower_s:.2f} s, XLA compile {self.compile_s:.2f} s, cache load "
            f"{self.cache_load_s:.2f} s" + (f"; {self.after_ready} compiled after ready"
                                            if self.after_ready else ""))


@dataclasses.dataclass
class ProcessTrace:
  name: str
  phases: list[tuple[str, float]]  # (what, seconds), in order
  ready_at: float | None  # seconds after the launcher started
  cpu_s: float | None
  compile: CompileStats | None = None
  imports: dict[str, float] = dataclasses.field(default_factory=dict)  # package -> seconds


@dataclasses.dataclass
class RunTrace:
  label: str
  argv: list[str]
  wall_s: float
  returncode: int
  processes: list[ProcessTrace]
  milestones: dict[str, float]  # seconds after the launcher started
  out_dir: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class _Sampler:
  """Polls the launcher's process tree: names, start times and the last CPU times seen."""

  def __init__(self, root_pid: int):
    self.root_pid = root_pid
    self.created: dict[str, float] = {}
    self.cpu_s: dict[str, float] = {}
    self._names: dict[int, str] = {}

  def poll(self) -> None:
    try:
      root = psutil.Process(self.root_pid)
      processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
      return
    for process in processes:
      try:
        name = self._names.get(process.pid) or self._name(process)
        if name is None:
          continue
        self._names[process.pid] = name
        self.created.setdefault(name, process.create_time())
        times = process.cpu_times()
        self.cpu_s[name] = times.user + times.system
      except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        continue

  def _name(self, process: psutil.Process) -> str | None:
    if process.pid == self.root_pid:
      return "parent"
    cmdline = process.cmdline()
    flags = dict(part[2:].split("=", 1) for part in cmdline if part.startswith("--") and
                 "=" in part)
    if "launch.verifier" in cmdline:
      return "verifier"
    if "launch.drafter" in cmdline:
      return f"drafter{flags.get('client_index', '?')}"
    if "launch.server_only" in cmdline:
      return f"baseline {flags.get('baseline', '?')}"
    return None


def _log_lines(path: str, year: int) -> list[tuple[float, str]]:
  """(time.time(), message) of every absl-formatted line of a child's log."""
  lines = []
  if not os.path.exists(path):
    return lines
  with open(path, errors="replace") as f:
    for line in f:
      match = _ABSL_LINE.match(line.rstrip("\n"))
      if match:
        month, day, hour, minute, second, message = match.groups()
        minute_start = datetime.datetime(year, int(month), int(day), int(hour), int(minute))
        lines.append((minute_start.timestamp() + float(second), message))
  return lines


def _import_seconds(path: str) -> dict[str, float]:
  """The cumulative import seconds of HEAVY_PACKAGES and the top-level total, from
  PYTHONPROFILEIMPORTTIME lines (each package's first, outermost import)."""
  found: dict[str, float] = {}
  total = 0.0
  if not os.path.exists(path):
    return found
  with open(path, errors="replace") as f:
    for line in f:
      match = _IMPORT_LINE.match(line.rstrip("\n"))
      if not match:
        continue
      cumulative_us, indent, name = int(match.group(1)), match.group(2), match.group(3)
      if len(indent) <= 1:
        total += cumulative_us / 1e6
      if name in HEAVY_PACKAGES and name not in found:
        found[name] = cumulative_us / 1e6
  if total:
    found["(all, top level)"] = total
  return found


_SECONDS = r"in ([0-9.]+) sec"


def compile_stats(lines: list[tuple[float, str]], ready: float | None) -> CompileStats:
  """What a process's JAX_LOG_COMPILES lines say. Seconds are summed over programs, so programs
  compiled at once on several threads sum to more than the wall time they took; a compilation
  that finishes while a cache hit is pending is counted as that hit (threads interleave)."""
  stats = CompileStats()
  hits_pending = 0
  for t, message in lines:
    seconds = re.search(_SECONDS, message)
    if message.startswith("Finished tracing") and seconds:
      stats.trace_s += float(seconds.group(1))
    elif message.startswith("Finished jaxpr to MLIR") and seconds:
      stats.lower_s += float(seconds.group(1))
    elif message.startswith("Persistent compilation cache hit"):
      hits_pending += 1
    elif message.startswith("Finished XLA compilation") and seconds:
      stats.programs += 1
      if hits_pending:
        hits_pending -= 1
        stats.cache_hits += 1
        stats.cache_load_s += float(seconds.group(1))
      else:
        stats.compile_s += float(seconds.group(1))
      if ready is not None and t > ready:
        stats.after_ready += 1
  return stats


def _find(lines: list[tuple[float, str]], pattern: str) -> tuple[float, float] | None:
  """(time of the first line matching `pattern`, the seconds it reports or 0)."""
  for t, message in lines:
    match = re.search(pattern, message)
    if match:
      return t, float(match.group(1)) if match.groups() else 0.0
  return None


def _first_event(path: str, kinds: Sequence[str]) -> float | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    for line in f:
      event = json.loads(line)
      if event["kind"] in kinds:
        return float(event["t"])
  return None


def _last_event(path: str, kind: str) -> float | None:
  last = None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        event = json.loads(line)
        if event["kind"] == kind:
          last = float(event["t"])
  return last


def _phases(created: float | None,
            marks: list[tuple[str, float | None]]) -> list[tuple[str, float]]:
  """Consecutive differences from the process start through the marks found."""
  phases, previous = [], created
  for what, t in marks:
    if t is None or previous is None:
      continue
    phases.append((what, t - previous))
    previous = t
  return phases


def _child_trace(name: str, kind: str, out_dir: str, sampler: _Sampler, start: float,
                 year: int, importtime: bool) -> ProcessTrace:
  log = os.path.join(out_dir, f"{name}.log")
  lines = _log_lines(log, year)
  created = sampler.created.get(name)
  loaded = _find(lines, rf"{kind} model loaded in ([0-9.]+) s")
  warmed = _find(lines, rf"{kind} engine warmed up in ([0-9.]+) s")
  load_start = loaded[0] - loaded[1] if loaded else None
  if name == "verifier":
    ready = _find(lines, r"verifier serving on")
    marks = [("imports and setup", load_start), ("load the target model", loaded and loaded[0]),
             ("warm-up (compile)", warmed and warmed[0]),
             ("tokenizer, gRPC server: serving", ready and ready[0])]
    ready_t = ready[0] if ready else None
  else:
    events = os.path.join(out_dir, f"{name}.jsonl")
    ready_t = _first_event(events, ("request_start",))
    # The turn another drafter's warm-up took first (engine/compile_lock.py), when logged.
    waited = _find(lines, r"draft engine warmed up in [0-9.]+ s \(([0-9.]+) s of it waiting")
    marks = [("imports, requests, tokenizer", load_start),
             ("load the draft model", loaded and loaded[0]),
             ("wait for another drafter's warm-up", loaded and waited and loaded[0] + waited[1]),
             ("warm-up (compile)", warmed and warmed[0]),
             ("wait for the verifier: first request", ready_t)]
  return ProcessTrace(
      name=name, phases=_phases(created, marks),
      ready_at=None if ready_t is None else ready_t - start, cpu_s=sampler.cpu_s.get(name),
      compile=compile_stats(lines, ready_t),
      imports=_import_seconds(log) if importtime else {})


def _parent_trace(out_dir: str, sampler: _Sampler, start: float, end: float,
                  importtime: bool, launcher_log: str) -> ProcessTrace:
  path = os.path.join(out_dir, "timeline.json")
  timeline = {}
  if os.path.exists(path):
    with open(path) as f:
      timeline = json.load(f)
  marks = sorted(((_PARENT_MARKS.get(k, k), t) for k, t in timeline.items()), key=lambda m: m[1])
  marks.append(("exit", end))
  return ProcessTrace(name="parent", phases=_phases(start, marks), ready_at=None,
                      cpu_s=sampler.cpu_s.get("parent"),
                      imports=_import_seconds(launcher_log) if importtime else {})


def run_once(label: str, out_dir: str, cache_dir: str, *, repo_root: str,
             extra_flags: Sequence[str] = (), importtime: bool = False, poll_s: float = 0.05,
             on_poll=None) -> RunTrace:
  """One `python -m launch.local` run into `out_dir` with `cache_dir` as the XLA cache."""
  os.makedirs(out_dir, exist_ok=True)
  argv = [sys.executable, "-m", "launch.local", f"--out_dir={out_dir}",
          f"--compilation_cache_dir={cache_dir}", *extra_flags]
  env = {**os.environ, "JAX_LOG_COMPILES": "1"}
  if importtime:
    env["PYTHONPROFILEIMPORTTIME"] = "1"
  launcher_log = os.path.join(out_dir, "launcher.log")
  start = time.time()
  with open(launcher_log, "w") as log:
    process = subprocess.Popen(argv, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    sampler = _Sampler(process.pid)
    while process.poll() is None:
      sampler.poll()
      if on_poll is not None:
        on_poll(time.time() - start, sorted(sampler.created))
      time.sleep(poll_s)
  end = time.time()
  year = datetime.datetime.fromtimestamp(start).year
  children = []
  for name in sorted(sampler.created):
    if name == "verifier" or name.startswith("drafter"):
      children.append(_child_trace(name, "target" if name == "verifier" else "draft", out_dir,
                                   sampler, start, year, importtime))
  parent = _parent_trace(out_dir, sampler, start, end, importtime, launcher_log)
  drafter_events = [os.path.join(out_dir, f"{p.name}.jsonl") for p in children
                    if p.name.startswith("drafter")]
  firsts = [t for t in (_first_event(p, ("request_step",)) for p in drafter_events) if t]
  lasts = [t for t in (_last_event(p, "request_end") for p in drafter_events) if t]
  milestones = {"verifier serving": next((p.ready_at for p in children if p.name == "verifier"),
                                         None),
                "every drafter's first request": max(
                    (p.ready_at for p in children if p.name.startswith("drafter")
                     and p.ready_at is not None), default=None),
                "first token": min(firsts) - start if firsts else None,
                "last request done": max(lasts) - start if lasts else None,
                "launcher exit": end - start}
  return RunTrace(label=label, argv=argv, wall_s=end - start, returncode=process.returncode,
                  processes=[parent, *children],
                  milestones={k: v for k, v in milestones.items() if v is not None},
                  out_dir=out_dir)


def table(runs: Sequence[RunTrace]) -> Table:
  """One rich table: a row per (process, phase), a column per run."""
  rows: dict[tuple[str, str], dict[str, str]] = {}

  def put(process: str, what: str, label: str, value: str) -> None:
    rows.setdefault((process, what), {})[label] = value

  for run in runs:
    for name, seconds in run.milestones.items():
      put("run", f"{name} (s after start)", run.label, f"{seconds:.2f}")
    for process in run.processes:
      for what, seconds in process.phases:
        put(process.name, what, run.label, f"{seconds:.2f}")
      if process.ready_at is not None:
        put(process.name, "ready (s after start)", run.label, f"{process.ready_at:.2f}")
      if process.cpu_s is not None:
        put(process.name, "CPU seconds (user + sys)", run.label, f"{process.cpu_s:.2f}")
      if process.compile is not None:
        c = process.compile
        put(process.name, "programs / cache hits", run.label, f"{c.programs} / {c.cache_hits}")
        put(process.name, "trace + lower s (summed)", run.label,
            f"{c.trace_s:.2f} + {c.lower_s:.2f}")
        put(process.name, "XLA compile + cache load s (summed)", run.label,
            f"{c.compile_s:.2f} + {c.cache_load_s:.2f}")
        if c.after_ready:
          put(process.name, "programs compiled after ready", run.label, str(c.after_ready))
      for package, seconds in process.imports.items():
        put(process.name, f"import {package}", run.label, f"{seconds:.2f}")
  result = Table(title="launch.local start-up, seconds (phases are consecutive, per process)")
  result.add_column("process")
  result.add_column("phase")
  for run in runs:
    result.add_column(run.label, justify="right")
  previous = None
  for (process, what), values in rows.items():
    if previous is not None and process != previous:
      result.add_section()
    result.add_row(process if process != previous else "", what,
                   *(values.get(run.label, "-") for run in runs))
    previous = process
  return result


def run(*, out_dir: str, repo_root: str, runs: Sequence[str], warm_cache_dir: str,
        extra_flags: Sequence[str] = (), importtime: bool = False, console=None,
        out_json: str | None = None) -> list[RunTrace]:
  """Runs `runs` ('cold' empties a fresh cache in out_dir; 'warm' reuses it, or `warm_cache_dir`
  when no cold run came first) and prints the table."""
  console = console or Console()
  cache_dir = warm_cache_dir
  traces = []
  with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                console=console) as progress:
    for i, kind in enumerate(runs):
      label = f"{kind}" if runs.count(kind) == 1 else f"{kind} {i + 1}"
      if kind == "cold":
        cache_dir = os.path.join(out_dir, f"xla_cache_{i}")
        if os.path.exists(cache_dir):
          raise ValueError(f"{cache_dir} exists: a cold run needs an empty cache folder")
      elif kind != "warm":
        raise ValueError(f"runs are 'cold' or 'warm', got {kind!r}")
      task = progress.add_task(f"{label} run", total=None)

      def on_poll(elapsed, names, task=task, label=label):
        progress.update(task, description=f"{label} run: {', '.join(names) or 'starting'}")

      trace = run_once(label, os.path.join(out_dir, label.replace(" ", "_")), cache_dir,
                       repo_root=repo_root, extra_flags=extra_flags, importtime=importtime,
                       on_poll=on_poll)
      progress.update(task, description=f"{label} run: {trace.wall_s:.1f} s, exit status "
                      f"{trace.returncode}", total=1, completed=1)
      traces.append(trace)
      if trace.returncode != 0:
        console.print(f"[red]{label} run failed; see {trace.out_dir}/launcher.log[/red]")
        break
  console.print(table(traces))
  for trace in traces:
    for process in trace.processes:
      if process.compile is not None and process.compile.programs:
        console.print(f"{trace.label} {process.name}: {process.compile.describe()}")
  if out_json:
    with open(out_json, "w") as f:
      json.dump([t.to_dict() for t in traces], f, indent=2)
  return traces
