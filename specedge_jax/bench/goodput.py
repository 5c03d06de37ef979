"""The goodput benchmark: three serving systems on one workload, over client counts, under an ITL
SLO, with the server's efficiency against its verify-curve bound (behind
`launch/bench_goodput.py`).

Systems, each on the same requests at each client count c (`systems`; these three by default):

  specedge_static  SpecEdge as the base config has it (configs/embedded.py: static batching, the
                   CPU tree, no controller).
  specedge_slo     the same plus `server.batching.mode=slo`, `edge.itl_slo_ms=<SLO>`,
                   `server.speculation_control=True`, `server.tree_buckets` (so small or cut
                   trees run smaller forwards) and `server.slo_admission=True` (fewer sessions
                   held while their measured ITL misses the SLO; since session 19).
  server_only_ar   the target alone, continuous batching (`launch/server_only.py
                   --baseline=autoregressive`, via `sweep.run_baseline`).

and, to take specedge_slo apart, `specedge_slo_batching` (its batching and SLO, no controller,
no tree buckets) and `specedge_controller` (static batching with its controller, tree buckets and
SLO: the controller reads each session's SLO in every batching mode).

The SpecEdge runs have c drafter processes with K = `requests_per_drafter` interleaved requests
each and `requests_per_client` requests per drafter (c x K users against `server.max_batch_size`
batch slots), drafters alternating `drafts` (`models.drafts`), each in a network namespace of its
own with the RTTs of `rtts_ms` in turn (`launch.local --netns --netns_rtts=`; where namespaces are
not possible here, every drafter gets the mean RTT simulated instead, and the report says so).
The server-only run gets `sweep.baseline_config` of the static run (the batch holds at most
c x K requests) with `server.num_slots` cut to that batch: it never holds more sessions, and the
engine's one-token decode program costs more with every slot of the cache (measured: see
WORKSPACE_NOTES.md), which would slow the baseline for nothing.

One invocation (`run_goodput`):
  1. the verify curve t_verify(B, T): measured in this run by `launch.bench_core --layerwise
     --gen_batch_sizes=` pinned to the verifier's cores, over a cache of `server.max_len` rows (so
     attention reads as many rows as the verifier's does), for B = 1 .. max_batch_size and the
     tree sizes the SpecEdge runs send; or read from `verify_curve` (a bench_core JSON);
  2. the ITL SLO: `itl_slo_ms`, or a pilot run of static SpecEdge at the lowest client count,
     SLO = ceil(slo_factor x its mean ITL) (the pilot is not one of the measured points);
  3. per client count, static, slo and server-only runs, in that order;
  4. the summary (`summarize`): goodput.json, PNGs and tables; `resummarize` redoes it from a
     finished folder's logs.

The start gate. A drafter process warms its draft programs up one at a time
(`engine/compile_lock`: about 2.5 s each on the shared drafter core), while the verifier warms up
on its own core, and each drafter starts its requests as soon as it is ready; left alone, eight
drafters start over ~15 s, about as long as their work takes, so "8 clients" would never be eight
at once. `StartGate` holds the verifier stopped (SIGSTOP) from its start until every drafter's log
says its engine warmed up, then lets it go (SIGCONT): the drafters wait in their health check
while the verifier loads and all start within the same second. The spread of the drafters' first
requests is reported per run ("start spread"); nothing in the serving stack is changed for this.

Pinning: the verifier, the baselines and the verify curve on `verifier_cpus`, the SpecEdge
verifier's network threads on `verifier_io_cpus` (default: beside its compute), the drafters on
`drafter_cpus`, and so is the namespaces' user-space link relay (`LinkRelayPinner`; a child of
this process, serving/netns.py), so it shares the edges' core rather than the server's.

Definitions (per run; `metrics.py` for the rest):
  goodput          requests whose mean ITL <= SLO, per second of the run's wall time; and their
                   generated tokens per second (`metrics` "goodput").
  attainment       the fraction of requests that meet the SLO.
  capacity         the largest tested client count at which attainment >= `attainment_target`
                   and at every smaller tested count (None: not even the lowest).
  bound            tokens per verify step (bonus included) x mean B / t_verify(mean B, mean T),
                   the curve interpolated bilinearly (clamped at its edges, which is flagged), B
                   the mean lanes per verify forward and T the mean tree tokens per lane (roots
                   included, after any cut): what the verifier would deliver per second of
                   forward if each forward cost what the curve says.
  efficiency       tokens per server-compute second (prefill included) / bound; "verify-only"
                   uses the tokens of verify steps over verify forwards alone, which equals
                   t_verify(mean B, mean T) / the mean measured verify forward; "with prefill"
                   (compute efficiency) puts the run's measured prefill into the bound: (verify
                   steps x t_verify(mean B, mean T) + prefill time) / server compute time.
  repeats          with `repeats` >= 2 each point runs once per pass; a point's goodput pools
                   its passes (met requests over wall time), and a ratio is the geometric mean
                   of the per-pass ratios (pass i against pass i, minutes apart) with a 95 %
                   t-interval on their logs; a goal "holds" at a client count when the whole
                   interval is at or above it, and is "missed" when the whole interval is below.
  ITL breakdown    per verify round of each request, from the drafters' events: draft time,
                   server queue, server forward, network (the round's wait less queue and
                   forward: RTT, gRPC, TLS) and edge other (the gap between token arrivals less
                   draft and wait: the edge's queue for its device, commit); each summed over
                   rounds and divided by the tokens, so the five add up to the mean ITL.

This module orchestrates and summarizes: it loads no model and runs no JAX (its children do),
and it never edits the serving stack.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from specedge_jax.bench import sweep
from specedge_jax.data import assets
from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics
from specedge_jax.serving import local, netns, processes
from specedge_jax.serving.baselines import SYSTEM_NAMES
from specedge_jax.serving.serving_config import ServingConfig

SPECEDGE_STATIC = "specedge_static"
SPECEDGE_SLO = "specedge_slo"
SERVER_ONLY_AR = SYSTEM_NAMES["autoregressive"]
# Ablations of specedge_slo (`--systems=`): the SLO batching alone, the controller alone.
SPECEDGE_SLO_BATCHING = "specedge_slo_batching"
SPECEDGE_CONTROLLER = "specedge_controller"
SYSTEMS = (SPECEDGE_STATIC, SPECEDGE_SLO, SERVER_ONLY_AR)  # the comparison of issue 15
ALL_SYSTEMS = (SPECEDGE_STATIC, SPECEDGE_SLO, SPECEDGE_SLO_BATCHING, SPECEDGE_CONTROLLER,
               SERVER_ONLY_AR)  # in run and table order
SPECEDGE_SYSTEMS = tuple(s for s in ALL_SYSTEMS if s != SERVER_ONLY_AR)
NEEDS_SLO = (SPECEDGE_SLO, SPECEDGE_SLO_BATCHING, SPECEDGE_CONTROLLER)  # edge.itl_slo_ms
PILOT = "pilot"
SYSTEM_LABELS = {SPECEDGE_STATIC: "SpecEdge static", SPECEDGE_SLO: "SpecEdge slo+controller",
                 SPECEDGE_SLO_BATCHING: "SpecEdge slo batching only",
                 SPECEDGE_CONTROLLER: "SpecEdge controller only",
                 SERVER_ONLY_AR: "server-only AR", PILOT: "pilot (static)"}
SHORT_LABELS = {SPECEDGE_STATIC: "static", SPECEDGE_SLO: "slo+ctl",
                SPECEDGE_SLO_BATCHING: "slo only", SPECEDGE_CONTROLLER: "ctl only"}
# The drafter's log line once its engine is warmed up (serving/runners.build_draft_engine); the
# start gate waits for it in every drafter's log.
DRAFTER_READY_LINE = "draft engine warmed up"
# The goals of issue 15, checked in the report.
GOAL_VS_STATIC = 1.5
GOAL_VS_AR = 2.0
GOAL_EFFICIENCY = 0.9


@dataclasses.dataclass(frozen=True)
class GoodputOptions:
  out_dir: str
  clients: tuple[int, ...] = (2, 4, 6, 8)
  requests_per_client: int = 4  # requests each drafter serves, K at a time
  requests_per_drafter: int = 2  # K: interleaved on one edge
  max_new_tokens: int = 64
  source: str = "c4"  # held-out prompts (the sweep's)
  rtts_ms: tuple[float, ...] = (5.0, 14.0, 40.0)  # drafter i gets rtts_ms[i % len]
  drafts: tuple[str, ...] = (assets.DEFAULT_DRAFT_DIR, assets.SMALL_DRAFT_DIR)
  netns: bool = True  # real links; falls back to a simulated mean RTT where impossible
  netns_jitter_ms: float = 1.0
  netns_loss_pct: float = 0.0
  itl_slo_ms: int | None = None  # None: from the pilot
  slo_factor: float = 1.5
  tree_buckets: tuple[int, ...] = (3, 5, 7)
  attainment_target: float = 0.9
  verifier_cpus: tuple[int, ...] = (0,)
  # The SpecEdge verifier's network threads (gRPC, TLS, its asyncio loop) move here once it
  # serves (serving/io_threads.py), as a GPU server's would run on host cores beside its device.
  # Off by default: on this 2-core box the only other core is the drafters', and there the
  # threads cost every round network time and saved the forward nothing measurable
  # (WORKSPACE_NOTES.md, "The verifier's network threads and the shared memory system").
  verifier_io_cpus: tuple[int, ...] = ()
  drafter_cpus: tuple[int, ...] = (1,)
  systems: tuple[str, ...] = SYSTEMS
  verify_curve: str = ""  # a bench_core JSON; '': measure it in this run
  curve_tree_sizes: tuple[int, ...] = (2, 3, 5, 7, 9)  # those <= the largest tree are measured
  curve_repeats: int = 20
  # Each (system, clients) point this many times, pass after pass (so drift reaches every
  # system alike); >= 2 gives the ratios 95 % intervals (`paired_ratio`).
  repeats: int = 1
  start_gate: bool = True
  compilation_cache_dir: str = local.LocalOptions.compilation_cache_dir
  run_timeout_s: float = 1800.0

  def __post_init__(self):
    for name in ("clients", "tree_buckets", "curve_tree_sizes"):
      values = getattr(self, name)
      if not values or any(int(v) != v or v < 1 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct integers >= 1, got {values}")
    for name in ("requests_per_client", "requests_per_drafter", "max_new_tokens",
                 "curve_repeats", "repeats"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.rtts_ms or any(not r >= 0 for r in self.rtts_ms):
      raise ValueError(f"rtts_ms must be a non-empty list of values >= 0, got {self.rtts_ms}")
    if not self.drafts:
      raise ValueError("drafts must name at least one draft model")
    unknown = [s for s in self.systems if s not in ALL_SYSTEMS]
    if unknown or not self.systems or len(set(self.systems)) != len(self.systems):
      raise ValueError(f"systems must be distinct names of {list(ALL_SYSTEMS)}, got "
                       f"{list(self.systems)}")
    if self.itl_slo_ms is not None and self.itl_slo_ms < 1:
      raise ValueError(f"itl_slo_ms must be >= 1 ms, got {self.itl_slo_ms}")
    if not self.slo_factor > 0 or not 0 < self.attainment_target <= 1:
      raise ValueError("slo_factor must be > 0 and attainment_target in (0, 1]")

  def rtts_for(self, clients: int) -> tuple[float, ...]:
    return tuple(self.rtts_ms[i % len(self.rtts_ms)] for i in range(clients))


# ----------------------------------------------------------------------------------------------
# The plan: configs, their overrides of the base config, and the equivalent command lines.


def flat_fields(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested dict as {dotted path: leaf}."""
  flat = {}
  for key, value in mapping.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flat_fields(value, f"{path}."))
    else:
      flat[path] = value
  return flat


def config_overrides(base: ServingConfig, config: ServingConfig) -> dict[str, Any]:
  """{dotted path: value} of every field where `config` differs from `base`, in field order."""
  before, after = flat_fields(base.to_dict()), flat_fields(config.to_dict())
  return {path: value for path, value in after.items() if before.get(path) != value}


def apply_overrides(base: ServingConfig, overrides: Mapping[str, Any]) -> ServingConfig:
  """`base` with each dotted path set (checked like any config: unknown keys are refused)."""
  tree = base.to_dict()
  for path, value in overrides.items():
    *sections, leaf = path.split(".")
    node = tree
    for section in sections:
      if not isinstance(node.get(section), dict):
        raise ValueError(f"unknown config section in {path!r}")
      node = node[section]
    if leaf not in node:
      raise ValueError(f"unknown config field {path!r}")
    node[leaf] = value
  return ServingConfig.from_mapping(tree)


def config_flag(path: str, value: Any) -> str:
  """`--config.<path>=<value>` as ml_collections parses it (tuples as Python literals)."""
  if isinstance(value, (tuple, list)):
    text = repr(tuple(value))
  elif isinstance(value, bool):
    text = "True" if value else "False"
  else:
    text = str(value)
  return f"--config.{path}={text}"


def parse_config_flag(flag: str) -> tuple[str, Any]:
  """The inverse of `config_flag` for its value kinds (tests; ml_collections does it for real)."""
  path, _, text = flag.removeprefix("--config.").partition("=")
  try:
    return path, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return path, text


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One process-level run: a system at a client count."""

  name: str  # run id: <system>/c<clients>
  system: str  # one of ALL_SYSTEMS, or PILOT
  clients: int
  config: ServingConfig
  overrides: Mapping[str, Any]  # how `config` differs from the base config
  drafter_rtts_ms: tuple[float, ...] = ()  # per drafter over netns; () = no netns
  repeat: int = 0  # which pass of `GoodputOptions.repeats`

  @property
  def folder(self) -> str:
    return self.name.replace("/", "_")

  @property
  def is_specedge(self) -> bool:
    return self.system != SERVER_ONLY_AR


def _with(config: ServingConfig, **sections: Mapping[str, Any]) -> ServingConfig:
  return dataclasses.replace(config, **{
      section: dataclasses.replace(getattr(config, section), **fields)
      for section, fields in sections.items()})


def specedge_config(base: ServingConfig, clients: int, options: GoodputOptions,
                    system: str, itl_slo_ms: int | None, use_netns: bool) -> ServingConfig:
  """The config of a SpecEdge run (static, slo or the pilot) at `clients` drafters."""
  base = _with(base, edge={"requests_per_drafter": options.requests_per_drafter},
               models={"drafts": tuple(options.drafts)},
               workload={"source": options.source})
  # The sweep's grid point: drafters, the slots every session needs, the workload size.
  point = sweep.GridPoint(clients=clients, batch_size=base.server.max_batch_size,
                          budget=base.tree.max_budget,
                          rtt_ms=(0.0 if use_netns else float(np.mean(options.rtts_ms))),
                          proactive=base.proactive.mode)
  config = sweep.point_config(base, point, sweep.SweepOptions(
      out_dir=options.out_dir, num_prompts=clients * options.requests_per_client,
      max_new_tokens=options.max_new_tokens))
  if system not in SPECEDGE_SYSTEMS and system != PILOT:
    raise ValueError(f"not a SpecEdge system: {system!r}")
  if system in NEEDS_SLO:
    if itl_slo_ms is None:
      raise ValueError(f"{system} needs an ITL SLO")
    config = _with(config, edge={"itl_slo_ms": int(itl_slo_ms)})
  if system in (SPECEDGE_SLO, SPECEDGE_SLO_BATCHING):
    config = _with(config, server={"batching": dataclasses.replace(config.server.batching,
                                                                   mode="slo")})
  if system in (SPECEDGE_SLO, SPECEDGE_CONTROLLER):
    config = _with(config, server={"speculation_control": True,
                                   "tree_buckets": tuple(options.tree_buckets)})
  if system == SPECEDGE_SLO:
    config = _with(config, server={"slo_admission": True})
  return config


def ar_config(static_config: ServingConfig) -> ServingConfig:
  """The server-only autoregressive config beside a static SpecEdge run (module docstring)."""
  config = sweep.baseline_config(static_config)
  return _with(config, server={"num_slots": config.server.max_batch_size})


def run_name(system: str, clients: int, repeat: int, repeats: int) -> str:
  """<system>/c<clients>, and /r<repeat> when the benchmark repeats its points."""
  return f"{system}/c{clients}" + (f"/r{repeat}" if repeats > 1 else "")


def plan_runs(base: ServingConfig, options: GoodputOptions, itl_slo_ms: int | None,
              use_netns: bool) -> list[PlannedRun]:
  """Per pass (`options.repeats`), per client count (ascending), each of `options.systems` in
  `ALL_SYSTEMS` order. `itl_slo_ms` None plans none of the systems that need it (the pilot
  decides the SLO first)."""
  return [run for repeat in range(options.repeats)
          for run in _plan_pass(base, options, itl_slo_ms, use_netns, repeat)]


def _plan_pass(base: ServingConfig, options: GoodputOptions, itl_slo_ms: int | None,
               use_netns: bool, repeat: int) -> list[PlannedRun]:
  runs = []
  for clients in sorted(options.clients):
    rtts = options.rtts_for(clients) if use_netns else ()
    static = specedge_config(base, clients, options, SPECEDGE_STATIC, itl_slo_ms, use_netns)
    for system in ALL_SYSTEMS:
      if system not in options.systems or (system in NEEDS_SLO and itl_slo_ms is None):
        continue
      run_rtts: tuple[float, ...] = ()
      if system == SERVER_ONLY_AR:
        config = ar_config(static)
      else:
        config = specedge_config(base, clients, options, system, itl_slo_ms, use_netns)
        run_rtts = rtts
      runs.append(PlannedRun(run_name(system, clients, repeat, options.repeats), system,
                             clients, config, config_overrides(base, config), run_rtts, repeat))
  return runs


def pilot_run(base: ServingConfig, options: GoodputOptions, use_netns: bool) -> PlannedRun:
  clients = min(options.clients)
  config = specedge_config(base, clients, options, PILOT, None, use_netns)
  return PlannedRun(f"{PILOT}/c{clients}", PILOT, clients, config,
                    config_overrides(base, config),
                    options.rtts_for(clients) if use_netns else ())


def command_line(run: PlannedRun, options: GoodputOptions, run_dir: str) -> list[str]:
  """The launcher command that makes this run by hand (the benchmark runs the same config in
  process for SpecEdge, through `sweep.run_baseline` for the baseline)."""
  config_flags = [config_flag(path, value) for path, value in run.overrides.items()]
  cpus = ",".join(str(c) for c in options.verifier_cpus)
  if not run.is_specedge:
    return ["python", "-m", "launch.server_only", "--baseline=autoregressive",
            *([f"--cpus={cpus}"] if cpus else []),
            f"--event_log={os.path.join(run_dir, plots_stem(run.system) + '.jsonl')}",
            f"--run_id={run.name}", *config_flags]
  argv = ["python", "-m", "launch.local", f"--out_dir={run_dir}"]
  if run.drafter_rtts_ms:
    argv += ["--netns", f"--netns_rtts={','.join(f'{r:g}' for r in run.drafter_rtts_ms)}",
             f"--netns_jitter_ms={options.netns_jitter_ms:g}",
             f"--netns_loss_pct={options.netns_loss_pct:g}"]
  if cpus:
    argv.append(f"--verifier_cpus={cpus}")
  if options.verifier_io_cpus:
    argv.append(f"--verifier_io_cpus={','.join(str(c) for c in options.verifier_io_cpus)}")
  if options.drafter_cpus:
    argv.append(f"--drafter_cpus={','.join(str(c) for c in options.drafter_cpus)}")
  return argv + config_flags


def display_command(argv: Sequence[str]) -> str:
  """A command line as a shell would take it, with this interpreter shown as `python`."""
  return shlex.join("python" if arg == sys.executable else arg for arg in argv)


def plots_stem(system: str) -> str:
  return system.replace("/", "_")


def curve_command(base: ServingConfig, options: GoodputOptions, out_dir: str) -> list[str]:
  """`launch.bench_core` measuring the verify curve the bound needs: B = 1 .. max_batch_size,
  the tree sizes up to the largest tree, a cache of server.max_len rows, per-layer weights."""
  largest = base.max_tree_nodes
  trees = sorted(t for t in options.curve_tree_sizes if t <= largest)
  if largest not in trees:
    trees.append(largest)
  prefix_len = base.server.max_len - max(trees) - 1
  if prefix_len < 1:
    raise ValueError(f"server.max_len {base.server.max_len} leaves no prefix for trees of "
                     f"{max(trees)}")
  argv = []
  if options.verifier_cpus and shutil.which("taskset"):
    argv = ["taskset", "-c", ",".join(str(c) for c in options.verifier_cpus)]
  return argv + [
      sys.executable, "-m", "launch.bench_core", "--gen_batch_sizes=", "--layerwise",
      f"--target={base.models.target}", f"--draft={base.models.draft}",
      f"--batch_sizes={','.join(str(b) for b in range(1, base.server.max_batch_size + 1))}",
      f"--tree_sizes={','.join(str(t) for t in trees)}", f"--prefix_len={prefix_len}",
      f"--repeats={options.curve_repeats}",
      f"--out_json={os.path.join(out_dir, 'verify_curve.json')}",
      f"--plot={os.path.join(out_dir, 'verify_curve.png')}"]


# ----------------------------------------------------------------------------------------------
# Pure figures: SLO, capacity, the verify curve's bound.


def slo_from_pilot(mean_itl_s: float, factor: float) -> int:
  """The ITL SLO in whole ms (edge.itl_slo_ms is an integer), rounded up."""
  if not mean_itl_s > 0:
    raise ValueError(f"the pilot's mean ITL must be > 0, got {mean_itl_s}")
  return int(math.ceil(factor * mean_itl_s * 1000.0 - 1e-9))


def capacity(attainment_by_clients: Mapping[int, float | None],
             target: float = 0.9) -> int | None:
  """The largest client count such that it and every smaller one tested meet `target`."""
  best = None
  for clients in sorted(attainment_by_clients):
    value = attainment_by_clients[clients]
    if value is None or value < target:
      break
    best = clients
  return best


def bound_tokens_per_s(tokens_per_step: float, mean_batch: float, verify_s: float) -> float:
  """Tokens per verify step x B over one verify's time: the verifier's tokens per second of
  forward at that batch."""
  if not verify_s > 0:
    raise ValueError(f"verify time must be > 0, got {verify_s}")
  return tokens_per_step * mean_batch / verify_s


def efficiency(measured_tokens_per_s: float | None, bound: float | None) -> float | None:
  if measured_tokens_per_s is None or not bound:
    return None
  return measured_tokens_per_s / bound


@dataclasses.dataclass(frozen=True)
class VerifyCurve:
  """Median verify ms over a grid of (B, T), from a `launch.bench_core --out_json` file."""

  points: tuple[tuple[int, int, float], ...]  # (batch, tree tokens per lane, median ms)
  source: str = ""
  prefix_len: int | None = None
  layerwise: bool | None = None

  @classmethod
  def from_json(cls, data: Mapping[str, Any], source: str = "") -> "VerifyCurve":
    points = tuple((int(p["batch_size"]), int(p["tree_tokens"]), float(p["median_ms"]))
                   for p in data.get("verify_curve", ()))
    if not points:
      raise ValueError(f"{source or 'the curve'} has no verify_curve points")
    return cls(points, source, data.get("prefix_len"), data.get("layerwise"))

  @classmethod
  def load(cls, path: str) -> "VerifyCurve":
    with open(path) as f:
      return cls.from_json(json.load(f), path)

  def ms(self, batch: float, tree_tokens: float) -> tuple[float, bool]:
    """t_verify in ms, bilinear in (B, T), and whether (B, T) lay outside the grid (then the
    nearest edge's value is used)."""
    by_batch: dict[int, list[tuple[int, float]]] = {}
    for b, t, ms in self.points:
      by_batch.setdefault(b, []).append((t, ms))
    batches = sorted(by_batch)
    at_tree = []
    clamped = not batches[0] <= batch <= batches[-1]
    for b in batches:
      trees, values = zip(*sorted(by_batch[b]))
      clamped |= not trees[0] <= tree_tokens <= trees[-1]
      at_tree.append(float(np.interp(tree_tokens, trees, values)))
    return float(np.interp(batch, batches, at_tree)), clamped


# ----------------------------------------------------------------------------------------------
# Per-run figures read from the events.


@dataclasses.dataclass(frozen=True)
class ItlBreakdown:
  """Where a SpecEdge run's inter-token time went, in ms per token (they add up to itl_ms)."""

  rounds: int
  tokens_per_round: float
  draft_ms: float
  network_ms: float  # RTT + gRPC + TLS: the round's wait less server queue and forward
  server_queue_ms: float
  server_forward_ms: float
  edge_other_ms: float  # the edge's own queue for its device, commit, scheduling
  itl_ms: float

  TERMS = ("draft_ms", "network_ms", "server_queue_ms", "server_forward_ms", "edge_other_ms")

  @property
  def largest(self) -> str:
    return max(self.TERMS, key=lambda name: getattr(self, name)).removesuffix("_ms")


def itl_breakdown(events: Sequence[Mapping[str, Any]]) -> ItlBreakdown | None:
  """The breakdown (module docstring) over the verify rounds of the drafters' request steps."""
  steps: dict[str, list[Mapping[str, Any]]] = {}
  for event in events:
    if event["kind"] == "request_step" and int(event.get("n_tokens", 0)) > 0:
      steps.setdefault(str(event["request_id"]), []).append(event)
  sums = dict.fromkeys(("gap", "draft", "wait", "queue", "forward"), 0.0)
  rounds = tokens = 0
  for request_steps in steps.values():
    request_steps.sort(key=lambda e: float(e["t"]))
    for previous, step in zip(request_steps, request_steps[1:]):
      if step.get("phase") != "verify" or step.get("server_forward_time_s") is None:
        continue
      rounds += 1
      tokens += int(step["n_tokens"])
      sums["gap"] += float(step["t"]) - float(previous["t"])
      sums["draft"] += float(step.get("draft_time_s") or 0.0)
      sums["wait"] += float(step.get("wait_time_s") or 0.0)
      sums["queue"] += float(step.get("server_queue_time_s") or 0.0)
      sums["forward"] += float(step["server_forward_time_s"])
  if not tokens:
    return None
  per_token = {name: 1000.0 * value / tokens for name, value in sums.items()}
  return ItlBreakdown(
      rounds=rounds, tokens_per_round=tokens / rounds, draft_ms=per_token["draft"],
      network_ms=per_token["wait"] - per_token["queue"] - per_token["forward"],
      server_queue_ms=per_token["queue"], server_forward_ms=per_token["forward"],
      edge_other_ms=per_token["gap"] - per_token["draft"] - per_token["wait"],
      itl_ms=per_token["gap"])


@dataclasses.dataclass(frozen=True)
class ServerEfficiency:
  mean_batch: float  # lanes per verify (or decode) forward
  mean_tree_tokens: float  # per lane, roots included
  tokens_per_step: float | None
  mean_forward_ms: float  # measured, per verify (decode) forward
  prefill_share: float | None  # of server compute
  curve_ms: float | None = None  # t_verify(mean B, mean T)
  curve_clamped: bool = False
  bound_tokens_per_s: float | None = None
  measured_tokens_per_s: float | None = None  # per server-compute second, prefill included
  efficiency: float | None = None
  verify_tokens_per_s: float | None = None  # verify steps' tokens per verify-forward second
  verify_efficiency: float | None = None
  # The curve's compute for this run's forwards (steps x t_verify(mean B, mean T)) plus its
  # prefill as measured, over its measured compute: the bound with prefill in it.
  compute_efficiency: float | None = None


def server_efficiency(run: metrics.Run, summary: metrics.RunSummary,
                      curve: VerifyCurve | None) -> ServerEfficiency | None:
  """The bound and efficiencies (module docstring); for a server-only run, no bound."""
  steps = [b for b in run.batches if b.op in ("verify", "decode")]
  if not steps:
    return None
  lanes = sum(b.batch_size for b in steps)
  forward_s = sum(b.forward_time_s for b in steps)
  prefill_s = sum(b.forward_time_s for b in run.batches if b.op == "prefill")
  verify_tokens = sum(s.n_tokens for r in run.requests for s in r.steps
                      if s.accepted_depth is not None)
  figures = ServerEfficiency(
      mean_batch=lanes / len(steps), mean_tree_tokens=sum(b.tokens for b in steps) / lanes,
      tokens_per_step=summary.requests.mean_tokens_per_step,
      mean_forward_ms=1000.0 * forward_s / len(steps),
      prefill_share=(prefill_s / summary.server_compute_s if summary.server_compute_s else None),
      measured_tokens_per_s=summary.throughput_per_compute_s)
  if curve is None or figures.tokens_per_step is None or steps[0].op != "verify":
    return figures
  curve_ms, clamped = curve.ms(figures.mean_batch, figures.mean_tree_tokens)
  bound = bound_tokens_per_s(figures.tokens_per_step, figures.mean_batch, curve_ms / 1000.0)
  verify_rate = verify_tokens / forward_s if forward_s > 0 else None
  compute_s = forward_s + prefill_s
  return dataclasses.replace(
      figures, curve_ms=curve_ms, curve_clamped=clamped, bound_tokens_per_s=bound,
      efficiency=efficiency(summary.throughput_per_compute_s, bound),
      compute_efficiency=((len(steps) * curve_ms / 1000.0 + prefill_s) / compute_s
                          if compute_s > 0 else None),
      verify_tokens_per_s=verify_rate, verify_efficiency=efficiency(verify_rate, bound))


def start_spread_s(events: Sequence[Mapping[str, Any]]) -> float | None:
  """Time between the first and the last client's first request (0: all started together)."""
  first: dict[str, float] = {}
  for event in events:
    if event["kind"] == "request_start":
      client = str(event["client_id"])
      first[client] = min(first.get(client, math.inf), float(event["t"]))
  return max(first.values()) - min(first.values()) if len(first) > 1 else None


def mean_open_requests(run: metrics.Run) -> float | None:
  """Requests open (submitted, not finished) on average over the run's wall time."""
  spans = [r.steps[-1].t - r.t_start for r in run.requests if r.steps and r.t_start is not None]
  return sum(spans) / run.wall_time_s if spans and run.wall_time_s > 0 else None


def controller_figures(events: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
  """Mean tree size sent, and the controller's mean advised budget and depth (verify rounds)."""
  sizes, budgets, depths = [], [], []
  for event in events:
    if event["kind"] == "request_step" and event.get("phase") == "verify":
      if event.get("tree_size") is not None:
        sizes.append(int(event["tree_size"]))
      limits = event.get("tree_limits")
      if limits:
        budgets.append(int(limits[0]))
        depths.append(int(limits[1]))
  mean = lambda values: float(np.mean(values)) if values else None
  return {"mean_tree_sent": mean(sizes), "mean_advised_budget": mean(budgets),
          "mean_advised_depth": mean(depths)}


# ----------------------------------------------------------------------------------------------
# Rows, summary, report.


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """A finished run: what was planned, where its logs are, the command that redoes it."""

  run: PlannedRun
  event_files: tuple[str, ...]
  command: tuple[str, ...]
  gate: Mapping[str, Any] | None = None  # the start gate's report (SpecEdge runs)


@dataclasses.dataclass(frozen=True)
class GoodputRow:
  system: str
  clients: int
  run: str
  summary: metrics.RunSummary
  goodput_requests_per_s: float | None
  start_spread_s: float | None
  mean_open_requests: float | None
  efficiency: ServerEfficiency | None
  breakdown: ItlBreakdown | None
  controller: Mapping[str, float | None]
  truncated_nodes: int
  same_tokens_as_ar: bool | None
  repeat: int = 0

  @property
  def attainment(self) -> float | None:
    return self.summary.requests.slo_attainment

  def to_dict(self) -> dict[str, Any]:
    requests = self.summary.requests
    return {
        "system": self.system, "clients": self.clients, "run": self.run, "repeat": self.repeat,
        "requests": requests.n_requests, "slo_met_requests": requests.slo_met_requests,
        "slo_attainment": requests.slo_attainment,
        "goodput_requests_per_s": self.goodput_requests_per_s,
        "goodput_tokens_per_s": requests.goodput_tokens_per_s,
        "throughput_per_wall_s": self.summary.throughput_per_wall_s,
        "throughput_per_compute_s": self.summary.throughput_per_compute_s,
        "wall_time_s": self.summary.wall_time_s,
        "server_compute_s": self.summary.server_compute_s,
        "itl_mean_s": requests.itl.mean_s, "itl_p99_s": requests.itl.p99_s,
        "ttft_mean_s": requests.ttft.mean_s, "start_spread_s": self.start_spread_s,
        "mean_open_requests": self.mean_open_requests,
        "efficiency": None if self.efficiency is None else dataclasses.asdict(self.efficiency),
        "itl_breakdown": None if self.breakdown is None else dataclasses.asdict(self.breakdown),
        "controller": dict(self.controller), "truncated_nodes": self.truncated_nodes,
        "same_tokens_as_ar": self.same_tokens_as_ar,
        "summary": self.summary.to_dict(),
    }


@dataclasses.dataclass(frozen=True)
class GoodputResult:
  itl_slo_ms: int
  rows: list[GoodputRow]
  capacity: dict[str, int | None]
  ratios: list[dict[str, Any]]
  goals: dict[str, Any]
  written: list[str]
  report: dict[str, Any]
  options: GoodputOptions
  points: dict[tuple[str, int], PointGoodput] = dataclasses.field(default_factory=dict)


def summarize_run(record: RunRecord, itl_slo_ms: int, curve: VerifyCurve | None,
                  ar_outputs: Mapping[str, Any] | None = None) -> GoodputRow:
  events = sweep.read_run_events({record.run.name: list(record.event_files)})
  runs, summaries = metrics.summarize_events(events, itl_slo_s=itl_slo_ms / 1000.0)
  run, summary = runs[0], summaries[0]
  met = summary.requests.slo_met_requests
  outputs = {str(e["request_id"]): e.get("output_tokens") for e in events
             if e["kind"] == "request_end"}
  return GoodputRow(
      system=record.run.system, clients=record.run.clients, run=record.run.name,
      summary=summary,
      goodput_requests_per_s=(met / summary.wall_time_s
                              if met is not None and summary.wall_time_s > 0 else None),
      start_spread_s=start_spread_s(events), mean_open_requests=mean_open_requests(run),
      efficiency=server_efficiency(run, summary, curve if record.run.is_specedge else None),
      breakdown=itl_breakdown(events) if record.run.is_specedge else None,
      controller=controller_figures(events),
      truncated_nodes=sum(int(e.get("truncated_nodes") or 0) for e in events
                          if e["kind"] == "server_batch"),
      same_tokens_as_ar=(None if ar_outputs is None or record.run.system == SERVER_ONLY_AR
                         else outputs == ar_outputs),
      repeat=record.run.repeat)


@dataclasses.dataclass(frozen=True)
class PointGoodput:
  """A (system, clients) point over its repeats: requests meeting the SLO pooled over the runs,
  and each run's goodput in pass order."""

  system: str
  clients: int
  requests: int
  met: int
  wall_time_s: float
  per_run: tuple[float, ...]  # goodput req/s of each pass
  attainment_per_run: tuple[float, ...]

  @property
  def goodput(self) -> float | None:
    """Pooled: every pass's met requests over every pass's wall time."""
    return self.met / self.wall_time_s if self.wall_time_s > 0 else None

  @property
  def attainment(self) -> float | None:
    return self.met / self.requests if self.requests else None

  def interval(self, confidence: float = 0.95) -> tuple[float, float] | None:
    """A t-interval of the mean per-pass goodput; None below two passes."""
    return t_interval(self.per_run, confidence)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
  """The Student t-interval of the mean of `values`; None below two values (scipy comes with
  JAX)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top (only intervals need it)
  values = np.asarray(values, dtype=float)
  if len(values) < 2:
    return None
  half = (float(stats.t.ppf(0.5 + confidence / 2.0, len(values) - 1)) *
          values.std(ddof=1) / math.sqrt(len(values)))
  return float(values.mean() - half), float(values.mean() + half)


def point_goodputs(rows: Sequence[GoodputRow]) -> dict[tuple[str, int], PointGoodput]:
  """Every (system, clients) point of `rows`, its passes pooled (rows without SLO figures are
  left out)."""
  grouped: dict[tuple[str, int], list[GoodputRow]] = {}
  for row in sorted(rows, key=lambda r: r.repeat):
    if row.summary.requests.slo_met_requests is None or row.goodput_requests_per_s is None:
      continue
    grouped.setdefault((row.system, row.clients), []).append(row)
  return {key: PointGoodput(
      system=key[0], clients=key[1],
      requests=sum(r.summary.requests.n_requests for r in group),
      met=sum(int(r.summary.requests.slo_met_requests or 0) for r in group),
      wall_time_s=sum(r.summary.wall_time_s for r in group),
      per_run=tuple(float(r.goodput_requests_per_s or 0.0) for r in group),
      attainment_per_run=tuple(float(r.attainment or 0.0) for r in group))
      for key, group in grouped.items()}


@dataclasses.dataclass(frozen=True)
class RatioEstimate:
  """A goodput ratio over paired passes (pass i of one system against pass i of the other, run
  minutes apart): the geometric mean of the per-pass ratios, with a t-interval on their logs."""

  value: float | None
  interval: tuple[float, float] | None
  per_run: tuple[float | None, ...]


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float],
                 confidence: float = 0.95) -> RatioEstimate:
  """numerator_i / denominator_i per pass (`goodput_ratio`), summarized (`RatioEstimate`). One
  pass: that ratio and no interval. A pass whose ratio is 0, inf or undefined leaves the logs
  undefined: then the estimate is the pooled ratio (sums over passes) and there is no interval."""
  pairs = list(zip(numerators, denominators))
  per_run = tuple(goodput_ratio(n, d) for n, d in pairs)
  if not pairs:
    return RatioEstimate(None, None, ())
  if any(r is None or r == 0 or math.isinf(r) for r in per_run):
    return RatioEstimate(goodput_ratio(sum(numerators), sum(denominators)), None, per_run)
  logs = np.log(np.asarray(per_run, dtype=float))
  interval = t_interval(logs, confidence)
  return RatioEstimate(float(np.exp(logs.mean())),
                       None if interval is None else (math.exp(interval[0]),
                                                      math.exp(interval[1])), per_run)


def point_efficiencies(rows: Sequence[GoodputRow]) -> dict[tuple[str, int], dict[str, Any]]:
  """Per SpecEdge (system, clients) point: each efficiency and the bound, meaned over passes."""
  grouped: dict[tuple[str, int], list[ServerEfficiency]] = {}
  for row in rows:
    if row.efficiency is not None and row.efficiency.bound_tokens_per_s is not None:
      grouped.setdefault((row.system, row.clients), []).append(row.efficiency)
  out = {}
  for key, group in grouped.items():
    entry: dict[str, Any] = {"passes": len(group)}
    for name in ("efficiency", "verify_efficiency", "compute_efficiency", "bound_tokens_per_s",
                 "measured_tokens_per_s"):
      values = [getattr(e, name) for e in group if getattr(e, name) is not None]
      entry[name] = float(np.mean(values)) if values else None
    out[key] = entry
  return out


def goodput_ratios(rows: Sequence[GoodputRow]) -> list[dict[str, Any]]:
  """Per client count: slo+controller's goodput over static's and over server-only's, paired by
  pass (`paired_ratio`)."""
  points = point_goodputs(rows)
  ratios = []
  for clients in sorted({r.clients for r in rows}):
    entry: dict[str, Any] = {"clients": clients}
    slo = points.get((SPECEDGE_SLO, clients))
    for other, key in ((SPECEDGE_STATIC, "slo_vs_static"), (SERVER_ONLY_AR, "slo_vs_ar")):
      point = points.get((other, clients))
      if slo is None or point is None:
        entry[key], entry[f"{key}_interval"], entry[f"{key}_per_run"] = None, None, []
        continue
      passes = min(len(slo.per_run), len(point.per_run))
      estimate = paired_ratio(slo.per_run[:passes], point.per_run[:passes])
      entry[key] = estimate.value
      entry[f"{key}_interval"] = None if estimate.interval is None else list(estimate.interval)
      entry[f"{key}_per_run"] = list(estimate.per_run)
    ratios.append(entry)
  return ratios


def goodput_ratio(numerator: float | None, denominator: float | None) -> float | None:
  """numerator / denominator; inf when only the denominator is 0, None when both are or either
  is missing."""
  if numerator is None or denominator is None or (numerator == 0 and denominator == 0):
    return None
  return math.inf if denominator == 0 else numerator / denominator


def _json_safe(value):
  """inf and nan as strings: strict JSON has neither."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def summarize(records: Sequence[RunRecord], itl_slo_ms: int, curve: VerifyCurve | None,
              options: GoodputOptions, meta: Mapping[str, Any]) -> GoodputResult:
  """Rows, capacity, ratios and goals of finished runs; writes goodput.json and the PNGs."""
  ar_outputs: dict[int, dict[str, Any]] = {}
  for record in records:
    if record.run.system == SERVER_ONLY_AR:
      events = list(events_lib.read_events(list(record.event_files)))
      ar_outputs[record.run.clients] = {str(e["request_id"]): e.get("output_tokens")
                                        for e in events if e["kind"] == "request_end"}
  greedy = all(r.run.config.workload.temperature == 0 for r in records)
  rows = [summarize_run(record, itl_slo_ms, curve,
                        ar_outputs.get(record.run.clients) if greedy else None)
          for record in records if record.run.system != PILOT]
  points = point_goodputs(rows)
  capacity_by_system = {
      system: capacity({c: p.attainment for (s, c), p in points.items() if s == system},
                       options.attainment_target)
      for system in ALL_SYSTEMS if any(s == system for s, _ in points)}
  ratios = goodput_ratios(rows)
  efficiencies = point_efficiencies(rows)
  slo_eff = [e["efficiency"] for (s, _), e in efficiencies.items()
             if s == SPECEDGE_SLO and e["efficiency"] is not None]

  def met_at(key: str, goal: float, side: str = "value") -> list[int]:
    """Client counts where the estimate (side "value"), or the whole interval ("held": its low
    end; "missed": its high end below the goal), is at or above the goal."""
    if side == "value":
      return [r["clients"] for r in ratios if (r[key] or 0) >= goal]
    pick = {"held": lambda iv: iv[0] >= goal, "missed": lambda iv: iv[1] < goal}[side]
    return [r["clients"] for r in ratios if r[f"{key}_interval"] and pick(r[f"{key}_interval"])]

  goals = {
      "slo_vs_static_goal": GOAL_VS_STATIC, "slo_vs_ar_goal": GOAL_VS_AR,
      "efficiency_goal": GOAL_EFFICIENCY,
      "slo_vs_static_met_at": met_at("slo_vs_static", GOAL_VS_STATIC),
      "slo_vs_ar_met_at": met_at("slo_vs_ar", GOAL_VS_AR),
      # With repeats: where the 95 % interval lies wholly at/above the goal, or wholly below.
      "slo_vs_static_held_at": met_at("slo_vs_static", GOAL_VS_STATIC, "held"),
      "slo_vs_static_missed_at": met_at("slo_vs_static", GOAL_VS_STATIC, "missed"),
      "slo_vs_ar_held_at": met_at("slo_vs_ar", GOAL_VS_AR, "held"),
      "slo_vs_ar_missed_at": met_at("slo_vs_ar", GOAL_VS_AR, "missed"),
      "slo_efficiency_met_at": sorted(c for (s, c), e in efficiencies.items()
                                      if s == SPECEDGE_SLO and
                                      (e["efficiency"] or 0) >= GOAL_EFFICIENCY),
      "slo_verify_efficiency_met_at": sorted(
          c for (s, c), e in efficiencies.items()
          if s == SPECEDGE_SLO and (e["verify_efficiency"] or 0) >= GOAL_EFFICIENCY),
      "slo_compute_efficiency_met_at": sorted(
          c for (s, c), e in efficiencies.items()
          if s == SPECEDGE_SLO and (e["compute_efficiency"] or 0) >= GOAL_EFFICIENCY),
      "slo_efficiency_range": [min(slo_eff), max(slo_eff)] if slo_eff else None,
  }
  os.makedirs(options.out_dir, exist_ok=True)
  report = {
      **meta, "itl_slo_ms": itl_slo_ms,
      "options": {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(options).items()},
      "verify_curve": None if curve is None else {
          "source": os.path.relpath(curve.source, options.out_dir) if curve.source else "",
          "prefix_len": curve.prefix_len, "layerwise": curve.layerwise,
          "points": [list(p) for p in curve.points]},
      "capacity": capacity_by_system, "ratios": ratios, "goals": goals,
      "points": [{**dataclasses.asdict(p), "goodput": p.goodput,
                  "attainment": p.attainment, "interval": p.interval(),
                  "efficiency": efficiencies.get(key)}
                 for key, p in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0]))],
      "rows": [r.to_dict() for r in rows],
      "runs": [{"name": rec.run.name, "system": rec.run.system, "clients": rec.run.clients,
                "repeat": rec.run.repeat,
                "command": shlex.join(rec.command),
                "overrides": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in rec.run.overrides.items()},
                "drafter_rtts_ms": list(rec.run.drafter_rtts_ms),
                "event_files": [os.path.relpath(p, options.out_dir) for p in rec.event_files],
                "config": rec.run.config.to_dict(), "start_gate": rec.gate}
               for rec in records],
  }
  path = os.path.join(options.out_dir, "goodput.json")
  with open(path, "w") as f:
    json.dump(_json_safe(report), f, indent=2)
  written = [path, *write_plots(rows, itl_slo_ms, options)]
  return GoodputResult(itl_slo_ms, rows, capacity_by_system, ratios, goals, written, report,
                       options, points)


def resummarize(out_dir: str) -> GoodputResult:
  """`summarize` again from a finished folder's goodput.json and event logs (runs nothing)."""
  path = os.path.join(out_dir, "goodput.json")
  try:
    with open(path) as f:
      report = json.load(f)
    fields = {f.name for f in dataclasses.fields(GoodputOptions)}
    saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                             for k, v in report["options"].items() if k in fields}
    options = GoodputOptions(**{**saved, "out_dir": out_dir})
    records = [RunRecord(
        run=PlannedRun(r["name"], r["system"], int(r["clients"]),
                       ServingConfig.from_mapping(r["config"]), r["overrides"],
                       tuple(r["drafter_rtts_ms"]), int(r.get("repeat", 0))),
        event_files=tuple(os.path.join(out_dir, p) for p in r["event_files"]),
        command=tuple(shlex.split(r["command"])), gate=r.get("start_gate"))
        for r in report["runs"]]
    curve_data = report.get("verify_curve")
    curve = None if curve_data is None else VerifyCurve(
        tuple((int(b), int(t), float(ms)) for b, t, ms in curve_data["points"]),
        os.path.join(out_dir, curve_data["source"]) if curve_data["source"] else "",
        curve_data.get("prefix_len"), curve_data.get("layerwise"))
    meta = {k: report[k] for k in ("pilot", "environment", "commands", "timings")
            if k in report}
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is not a goodput report: {e}") from e
  missing = [p for rec in records for p in rec.event_files if not os.path.exists(p)]
  if missing:
    raise ValueError(f"event logs named in {path} are missing (first: {missing[0]}); they are "
                     "not committed with results/: rerun the benchmark")
  return summarize(records, int(report["itl_slo_ms"]), curve, options, meta)


# ----------------------------------------------------------------------------------------------
# Plots and tables.


def _by_system(rows: Sequence[GoodputRow]) -> dict[str, list[GoodputRow]]:
  lines: dict[str, list[GoodputRow]] = {}
  for row in sorted(rows, key=lambda r: r.clients):
    lines.setdefault(row.system, []).append(row)
  return lines


def write_plots(rows: Sequence[GoodputRow], itl_slo_ms: int,
                options: GoodputOptions) -> list[str]:
  """goodput_vs_clients.png, attainment_vs_clients.png, efficiency_vs_bound.png,
  itl_breakdown.png in out_dir."""
  import matplotlib  # pylint: disable=g-import-not-at-top (only the report needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def save(fig, name: str) -> str:
    path = os.path.join(options.out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

  lines = _by_system(rows)
  clients = sorted({r.clients for r in rows})
  points = point_goodputs(rows)
  written = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for system in lines:
    series = sorted((p for (s, _), p in points.items() if s == system), key=lambda p: p.clients)
    x = [p.clients for p in series]
    intervals = [p.interval() for p in series]
    mean = [float(np.mean(p.per_run)) for p in series]
    errors = None
    if options.repeats > 1 and all(iv is not None for iv in intervals):
      errors = np.array([[m - iv[0], iv[1] - m] for m, iv in zip(mean, intervals)]).T
    (line,) = axes[0].plot(x, [p.goodput or 0.0 for p in series], marker="o",
                           label=SYSTEM_LABELS[system])
    if errors is not None:  # the pass mean's 95 % interval, and each pass as a dot
      axes[0].errorbar(x, mean, yerr=errors, fmt="none", ecolor=line.get_color(), capsize=3)
      for p in series:
        axes[0].scatter([p.clients] * len(p.per_run), p.per_run, s=8, alpha=0.5,
                        color=line.get_color())
    by_clients: dict[int, list[float]] = {}
    for r in lines[system]:
      by_clients.setdefault(r.clients, []).append(r.summary.requests.goodput_tokens_per_s or 0.0)
    axes[1].plot(sorted(by_clients), [float(np.mean(by_clients[c])) for c in sorted(by_clients)],
                 marker="o", label=SYSTEM_LABELS[system])
  axes[0].set_ylabel("requests meeting the SLO / s")
  axes[1].set_ylabel("tokens of those requests / s" +
                     (f" (mean of {options.repeats} passes)" if options.repeats > 1 else ""))
  for ax in axes:
    ax.set_xlabel("concurrent clients (K requests each)")
    ax.set_xticks(clients)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  fig.suptitle(f"Goodput under an ITL SLO of {itl_slo_ms} ms (request mean ITL)")
  written.append(save(fig, "goodput_vs_clients.png"))

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for system in lines:
    series = sorted((p for (s, _), p in points.items() if s == system), key=lambda p: p.clients)
    ax.plot([p.clients for p in series], [100.0 * (p.attainment or 0.0) for p in series],
            marker="o", label=SYSTEM_LABELS[system])
  ax.axhline(100.0 * options.attainment_target, color="gray", linestyle="--",
             label=f"{options.attainment_target:.0%} (capacity)")
  ax.set_ylim(0, 105)
  ax.set_xticks(clients)
  ax.set_xlabel("concurrent clients (K requests each)")
  ax.set_ylabel(f"requests with mean ITL <= {itl_slo_ms} ms (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  written.append(save(fig, "attainment_vs_clients.png"))

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  efficiencies = point_efficiencies(rows)  # passes meaned
  for system in SPECEDGE_SYSTEMS:
    series = sorted((c, e["measured_tokens_per_s"] or 0.0, e["bound_tokens_per_s"])
                    for (s, c), e in efficiencies.items() if s == system)
    if not series:
      continue
    counts, measured, bound = zip(*series)
    (line,) = ax.plot(counts, measured, marker="o", label=f"{SYSTEM_LABELS[system]}: measured")
    ax.plot(counts, bound, marker="x", linestyle="--", color=line.get_color(),
            label=f"{SYSTEM_LABELS[system]}: bound")
  ax.set_xticks(clients)
  ax.set_xlabel("concurrent clients")
  ax.set_ylabel("tokens / s of server compute")
  ax.set_title("Server throughput against the verify-curve bound", fontsize="small")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="x-small")
  written.append(save(fig, "efficiency_vs_bound.png"))

  broken = [r for r in rows if r.breakdown is not None]
  fig, ax = plt.subplots(figsize=(max(6.5, 0.8 * len(broken) + 2), 4.2))
  bottom = np.zeros(len(broken))
  for term in ItlBreakdown.TERMS:
    values = np.array([getattr(r.breakdown, term) for r in broken])
    ax.bar(range(len(broken)), values, bottom=bottom, label=term.removesuffix("_ms"))
    bottom += values
  ax.axhline(itl_slo_ms, color="gray", linestyle="--", label=f"SLO {itl_slo_ms} ms")
  ax.set_xticks(range(len(broken)),
                [f"{SHORT_LABELS[r.system]}\nc{r.clients}"
                 for r in broken], fontsize="small")
  ax.set_ylabel("ms per token (mean ITL)")
  ax.set_title("Where SpecEdge's inter-token time goes", fontsize="small")
  ax.legend(fontsize="x-small", loc="upper left")
  ax.grid(alpha=0.3, axis="y")
  written.append(save(fig, "itl_breakdown.png"))
  return written


def _point_label(row: GoodputRow, passes: int) -> str:
  """The clients column: the count, and the pass when points repeat."""
  return str(row.clients) + (f" r{row.repeat}" if passes > 1 else "")


def _fmt(value, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
  return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def goodput_table(result: GoodputResult) -> Table:
  table = Table(title=f"Goodput under an ITL SLO of {result.itl_slo_ms} ms (a request meets it "
                "when its mean ITL does)")
  for column in ("system", "clients", "requests", "met", "attainment", "goodput req/s",
                 "goodput tok/s", "tok/s wall", "tok/s server compute", "ITL mean / p99 ms",
                 "TTFT mean ms", "open requests", "start spread s", "= AR tokens"):
    table.add_column(column, justify="left" if column == "system" else "right")
  for row in sorted(result.rows, key=lambda r: (r.clients, r.repeat,
                                                ALL_SYSTEMS.index(r.system))):
    s, m = row.summary, row.summary.requests
    table.add_row(
        SYSTEM_LABELS[row.system], _point_label(row, result.options.repeats), str(m.n_requests),
        str(m.slo_met_requests),
        _fmt(m.slo_attainment, 100, 0, " %"), _fmt(row.goodput_requests_per_s, digits=2),
        _fmt(m.goodput_tokens_per_s), _fmt(s.throughput_per_wall_s),
        _fmt(s.throughput_per_compute_s),
        f"{_fmt(m.itl.mean_s, 1e3)} / {_fmt(m.itl.p99_s, 1e3)}", _fmt(m.ttft.mean_s, 1e3, 0),
        _fmt(row.mean_open_requests), _fmt(row.start_spread_s, digits=2),
        "-" if row.same_tokens_as_ar is None else ("yes" if row.same_tokens_as_ar else "NO"))
  return table


def capacity_table(result: GoodputResult, options: GoodputOptions) -> Table:
  table = Table(title=f"Capacity (most clients with >= {options.attainment_target:.0%} of "
                "requests meeting the SLO, at every count up to it) and goodput ratios")
  table.add_column("", justify="left")
  clients = [r["clients"] for r in result.ratios]
  for c in clients:
    table.add_column(f"c={c}", justify="right")
  table.add_column("capacity", justify="right")
  passes = result.options.repeats
  for system in ALL_SYSTEMS:
    if system not in result.capacity:
      continue
    points = {c: p for (s, c), p in result.points.items() if s == system}
    cap = result.capacity[system]
    table.add_row(f"{SYSTEM_LABELS[system]} attainment",
                  *[_fmt(points[c].attainment if c in points else None, 100, 0, " %")
                    for c in clients],
                  f"< {min(clients)}" if cap is None else str(cap))
    if passes > 1:
      table.add_row(f"{SYSTEM_LABELS[system]} goodput req/s (pooled; 95 % of the pass mean)",
                    *[_with_interval(points[c].goodput, points[c].interval()) if c in points
                      else "-" for c in clients], "")
  for key, goal, label in (("slo_vs_static", GOAL_VS_STATIC, "slo+controller / static"),
                           ("slo_vs_ar", GOAL_VS_AR, "slo+controller / server-only AR")):
    table.add_row(f"{label} goodput (goal >= {goal:g}x)" +
                  (f"; geo. mean of {passes} passes, 95 %" if passes > 1 else ""),
                  *[_with_interval(r[key], r[f"{key}_interval"], "x") for r in result.ratios],
                  "")
  return table


def _with_interval(value: float | None, interval: Sequence[float] | None,
                   suffix: str = "") -> str:
  text = _fmt(value, digits=2, suffix=suffix)
  return text if not interval else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"


def efficiency_table(result: GoodputResult) -> Table:
  table = Table(title="Server efficiency against the verify-curve bound (tokens per step x B / "
                "t_verify(B, T); goal with the controller: >= 90 %)")
  for column in ("system", "clients", "mean B", "mean T", "tok/step", "curve ms",
                 "measured ms", "bound tok/s", "tok/s compute", "efficiency",
                 "verify-only tok/s", "verify-only eff.", "eff. w/ prefill", "prefill share",
                 "tree sent",
                 "advised budget / depth", "cut nodes"):
    table.add_column(column, justify="left" if column == "system" else "right")
  for row in sorted(result.rows, key=lambda r: (ALL_SYSTEMS.index(r.system), r.clients,
                                                r.repeat)):
    e = row.efficiency
    if e is None:
      continue
    c = row.controller
    table.add_row(
        SYSTEM_LABELS[row.system], _point_label(row, result.options.repeats),
        _fmt(e.mean_batch, digits=2),
        _fmt(e.mean_tree_tokens, digits=2), _fmt(e.tokens_per_step, digits=2),
        _fmt(e.curve_ms, digits=2) + ("*" if e.curve_clamped else ""),
        _fmt(e.mean_forward_ms, digits=2), _fmt(e.bound_tokens_per_s, digits=0),
        _fmt(e.measured_tokens_per_s, digits=0), _fmt(e.efficiency, 100, 0, " %"),
        _fmt(e.verify_tokens_per_s, digits=0), _fmt(e.verify_efficiency, 100, 0, " %"),
        _fmt(e.compute_efficiency, 100, 0, " %"), _fmt(e.prefill_share, 100, 0, " %"), _fmt(c.get("mean_tree_sent"), digits=2),
        "-" if c.get("mean_advised_budget") is None else
        f"{c['mean_advised_budget']:.1f} / {c['mean_advised_depth']:.1f}",
        str(row.truncated_nodes) if row.system != SERVER_ONLY_AR else "-")
  return table


def breakdown_table(result: GoodputResult) -> Table:
  table = Table(title="Where SpecEdge's inter-token time goes (ms per token, summed over verify "
                "rounds / tokens; the terms add up to the mean ITL)")
  for column in ("system", "clients", "tok/round", "draft", "network", "server queue",
                 "server forward", "edge other", "ITL mean", "largest"):
    table.add_column(column, justify="left" if column == "system" else "right")
  for row in sorted(result.rows, key=lambda r: (ALL_SYSTEMS.index(r.system), r.clients,
                                                r.repeat)):
    b = row.breakdown
    if b is None:
      continue
    table.add_row(SYSTEM_LABELS[row.system], _point_label(row, result.options.repeats),
                  _fmt(b.tokens_per_round, digits=2),
                  *[_fmt(getattr(b, t), digits=2) for t in ItlBreakdown.TERMS],
                  _fmt(b.itl_ms, digits=2), b.largest)
  return table


def print_report(result: GoodputResult, console: Console | None = None) -> None:
  console = console or Console()
  options = result.options
  for table in (goodput_table(result), capacity_table(result, options),
                efficiency_table(result), breakdown_table(result)):
    console.print(table)
  goals = result.goals
  console.print(
      f"goals: slo+controller >= {GOAL_VS_STATIC:g}x static goodput at c in "
      f"{goals['slo_vs_static_met_at'] or 'none'}; >= {GOAL_VS_AR:g}x server-only at c in "
      f"{goals['slo_vs_ar_met_at'] or 'none'}; efficiency >= {GOAL_EFFICIENCY:.0%} of the bound "
      f"at c in {goals['slo_efficiency_met_at'] or 'none'}", highlight=False)
  console.print("wrote " + ", ".join(os.path.relpath(p, options.out_dir)
                                     for p in result.written) + f" in {options.out_dir}",
                highlight=False)


# ----------------------------------------------------------------------------------------------
# Running.


class StartGate:
  """Holds a run's verifier stopped from its start until each drafter has warmed up (module
  docstring). Used as a context manager around `local.run_local`; always lets the verifier go
  on exit. `report` says how long it held and whether every drafter was seen ready."""

  def __init__(self, run_dir: str, num_drafters: int, timeout_s: float = 300.0,
               poll_s: float = 0.02):
    # run_local's file names: <out_dir>/verifier.port on the verifier's command line,
    # <out_dir>/drafter<i>.log for each drafter's output.
    self._marker = f"--port_file={os.path.join(run_dir, 'verifier.port')}"
    self._drafter_logs = [os.path.join(run_dir, f"drafter{i}.log") for i in range(num_drafters)]
    self._timeout_s, self._poll_s = timeout_s, poll_s
    self._pid: int | None = None
    self._stopped = False
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._hold, name="start-gate", daemon=True)
    self.report: dict[str, Any] = {"held": False, "all_drafters_ready": False, "held_s": None}

  def __enter__(self) -> "StartGate":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._done.set()
    self._thread.join(5.0)
    self._release()

  def _find_verifier(self) -> int | None:
    for pid, argv in _children_of_this_process():
      if b"launch.verifier" in argv and self._marker.encode() in argv:
        return pid
    return None

  def _ready(self) -> bool:
    for path in self._drafter_logs:
      try:
        with open(path, errors="replace") as f:
          if DRAFTER_READY_LINE not in f.read():
            return False
      except OSError:
        return False
    return True

  def _release(self) -> None:
    if self._stopped and self._pid is not None:
      try:
        os.kill(self._pid, signal.SIGCONT)
      except ProcessLookupError:
        pass
      self._stopped = False

  def _hold(self) -> None:
    start = time.monotonic()
    while not self._done.is_set() and self._pid is None:
      self._pid = self._find_verifier()
      if self._pid is None:
        if time.monotonic() - start > self._timeout_s:
          return
        time.sleep(self._poll_s)
    if self._pid is None:
      return
    try:
      os.kill(self._pid, signal.SIGSTOP)
    except ProcessLookupError:
      return
    self._stopped = True
    held_at = time.monotonic()
    self.report["held"] = True
    while not self._done.is_set():
      if self._ready():
        self.report["all_drafters_ready"] = True
        break
      if time.monotonic() - held_at > self._timeout_s:
        break
      time.sleep(0.1)
    self.report["held_s"] = time.monotonic() - held_at
    self._release()


def _children_of_this_process() -> list[tuple[int, list[bytes]]]:
  """(pid, argv) of this process's live children, from /proc."""
  children = []
  me = str(os.getpid())
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        ppid = f.read().rsplit(")", 1)[1].split()[1]
      if ppid != me:
        continue
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        children.append((int(entry), f.read().split(b"\0")))
    except (OSError, IndexError):
      continue
  return children


class LinkRelayPinner:
  """Pins the namespaces' user-space link relay (`link_shaper.py`, a child of this process that
  `netns.NetnsTopology.open` starts) to `cpus`, every thread of it, once it appears: it then
  shares the edges' core instead of taking time from the verifier's."""

  def __init__(self, cpus: Sequence[int], timeout_s: float = 60.0):
    self._cpus = set(cpus)
    self._timeout_s = timeout_s
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="relay-pinner", daemon=True)
    self.pinned_pid: int | None = None

  def __enter__(self) -> "LinkRelayPinner":
    if self._cpus and hasattr(os, "sched_setaffinity"):
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._done.set()
    if self._thread.is_alive():
      self._thread.join(5.0)

  def _watch(self) -> None:
    deadline = time.monotonic() + self._timeout_s
    while not self._done.is_set() and time.monotonic() < deadline:
      for pid, argv in _children_of_this_process():
        if any(arg.endswith(b"link_shaper.py") for arg in argv):
          try:
            for task in os.listdir(f"/proc/{pid}/task"):  # affinity is per thread
              os.sched_setaffinity(int(task), self._cpus)
          except OSError:
            return
          self.pinned_pid = pid
          return
      time.sleep(0.02)


def _sweep_options(options: GoodputOptions) -> sweep.SweepOptions:
  return sweep.SweepOptions(out_dir=options.out_dir, verifier_cpus=options.verifier_cpus,
                            drafter_cpus=options.drafter_cpus,
                            compilation_cache_dir=options.compilation_cache_dir,
                            run_timeout_s=options.run_timeout_s)


def _netns_config(run: PlannedRun, options: GoodputOptions) -> netns.NetnsConfig | None:
  if not run.drafter_rtts_ms:
    return None
  return netns.NetnsConfig(drafter_rtts_ms=run.drafter_rtts_ms, jitter_ms=options.netns_jitter_ms,
                           loss_pct=options.netns_loss_pct)


def execute(run: PlannedRun, options: GoodputOptions) -> RunRecord:
  """Makes one planned run in <out_dir>/<run.folder>; returns its record."""
  run_dir = os.path.abspath(os.path.join(options.out_dir, run.folder))
  os.makedirs(run_dir, exist_ok=True)
  command = tuple(command_line(run, options, run_dir))
  if not run.is_specedge:
    paths = sweep.run_baseline(sweep.PlannedRun(run.name, run.system, run.config, ()), run_dir,
                               _sweep_options(options))
    return RunRecord(run, tuple(paths), command)
  gate = StartGate(run_dir, run.config.edge.num_drafters) if options.start_gate else None
  # run_local draws its own bars; rich allows one live display, so they go to a file.
  with open(os.path.join(run_dir, "progress.log"), "w") as progress_log:
    local_options = local.LocalOptions(
        out_dir=run_dir, verifier_cpus=options.verifier_cpus,
        verifier_io_cpus=options.verifier_io_cpus, drafter_cpus=options.drafter_cpus,
        compilation_cache_dir=options.compilation_cache_dir, run_timeout_s=options.run_timeout_s,
        run_id=run.name, netns=_netns_config(run, options))
    console = Console(file=progress_log, width=120)
    with contextlib.ExitStack() as stack:
      if local_options.netns is not None:
        stack.enter_context(LinkRelayPinner(options.drafter_cpus))
      if gate is not None:
        stack.enter_context(gate)
      result = local.run_local(run.config, local_options, console=console)
  return RunRecord(run, tuple(result.event_paths[run.name]), command,
                   None if gate is None else dict(gate.report))


def _run_curve(base: ServingConfig, options: GoodputOptions, console: Console) -> VerifyCurve:
  if options.verify_curve:
    return VerifyCurve.load(options.verify_curve)
  argv = curve_command(base, options, options.out_dir)
  log_path = os.path.join(options.out_dir, "verify_curve.log")
  children = processes.ChildProcesses()
  try:
    with console.status("measuring the verify curve (launch.bench_core) ..."):
      child = children.start("bench_core", argv, log_path,
                             env=sweep.child_env(_sweep_options(options)))
      deadline = time.monotonic() + options.run_timeout_s
      while child.poll() is None:
        if time.monotonic() > deadline:
          raise local.ChildFailed(f"the verify curve did not finish in {options.run_timeout_s} s")
        time.sleep(0.2)
    if child.returncode != 0:
      raise local.ChildFailed(f"launch.bench_core exited with status {child.returncode}; the end "
                              f"of {log_path}:\n{processes.log_tail(log_path)}")
  finally:
    children.kill_all()
  return VerifyCurve.load(os.path.join(options.out_dir, "verify_curve.json"))


@contextlib.contextmanager
def _sigterm_unwinds():
  """SIGTERM ends the benchmark as Ctrl-C does, by an exception, so every `finally` runs: the
  start gate lets a held verifier go (a stopped process cannot run its parent watchdog, and
  would outlive a killed benchmark), `run_local` stops its children and removes its namespaces.
  Only in the main thread, where signal handlers live."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def run_goodput(base: ServingConfig, options: GoodputOptions,
                console: Console | None = None) -> GoodputResult:
  """The whole benchmark (module docstring): curve, SLO, runs, summary."""
  with _sigterm_unwinds():
    return _run_goodput(base, options, console or Console())


def _run_goodput(base: ServingConfig, options: GoodputOptions,
                 console: Console) -> GoodputResult:
  started = time.time()
  os.makedirs(options.out_dir, exist_ok=True)
  environment: dict[str, Any] = {"loadavg_before": list(os.getloadavg()),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  use_netns = options.netns
  if use_netns:
    reason = netns.check_supported()
    if reason is not None:
      use_netns = False
      environment["netns_unsupported"] = reason
      console.print(f"[yellow]network namespaces are not possible here ({reason}); every "
                    f"drafter gets a simulated RTT of {np.mean(options.rtts_ms):g} ms (the mean "
                    "of the RTTs) instead of its own link[/yellow]")
  environment["links"] = ("netns" if use_netns else "simulated")
  timings: dict[str, float] = {}
  curve = _run_curve(base, options, console)
  timings["verify_curve_s"] = time.time() - started

  records: list[RunRecord] = []
  pilot: dict[str, Any] = {}
  itl_slo_ms = options.itl_slo_ms
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("runs"), TimeElapsedColumn())
  with Progress(*columns, console=console) as progress:
    total = (len(options.clients) * len(options.systems) * options.repeats +
             (1 if itl_slo_ms is None else 0))
    task = progress.add_task("goodput", total=total)
    if itl_slo_ms is None:
      run = pilot_run(base, options, use_netns)
      progress.update(task, description=f"goodput: {run.name}")
      record = execute(run, options)
      records.append(record)
      pilot_row = summarize_run(record, 1, None)
      mean_itl = pilot_row.summary.requests.itl.mean_s
      if mean_itl is None:
        raise ValueError(f"the pilot {run.name} measured no inter-token gap (every request ended "
                         "at its first token): give --itl_slo_ms")
      itl_slo_ms = slo_from_pilot(mean_itl, options.slo_factor)
      pilot = {"run": run.name, "mean_itl_ms": 1000.0 * mean_itl,
               "p99_itl_ms": 1000.0 * (pilot_row.summary.requests.itl.p99_s or 0.0),
               "slo_factor": options.slo_factor, "itl_slo_ms": itl_slo_ms}
      progress.console.print(
          f"pilot {run.name}: mean ITL {1000.0 * mean_itl:.2f} ms -> ITL SLO = ceil("
          f"{options.slo_factor:g} x {1000.0 * mean_itl:.2f}) = {itl_slo_ms} ms", highlight=False)
      progress.advance(task)
    else:
      pilot = {"itl_slo_ms": itl_slo_ms, "given": True}
    for run in plan_runs(base, options, itl_slo_ms, use_netns):
      progress.update(task, description=f"goodput: {run.name}")
      records.append(execute(run, options))
      progress.advance(task)
    progress.update(task, description="goodput")
  environment["loadavg_after"] = list(os.getloadavg())
  timings["wall_time_s"] = time.time() - started
  curve_source = (f"(read {options.verify_curve})" if options.verify_curve else
                  display_command(curve_command(base, options, options.out_dir)))
  meta = {"pilot": pilot, "environment": environment, "timings": timings,
          "commands": {"verify_curve": curve_source}}
  return summarize(records, itl_slo_ms, curve, options, meta)


def planned_commands(base: ServingConfig, options: GoodputOptions, itl_slo_ms: int | None,
                     use_netns: bool) -> list[str]:
  """The command lines of a benchmark, in run order, without running anything: the curve, the
  pilot (when `itl_slo_ms` is None; the slo runs then wait for its SLO and are left out), and
  every planned run."""
  commands = [] if options.verify_curve else [display_command(curve_command(base, options,
                                                                           options.out_dir))]
  runs = plan_runs(base, options, itl_slo_ms, use_netns)
  if itl_slo_ms is None:
    runs = [pilot_run(base, options, use_netns), *runs]
  return commands + [shlex.join(command_line(run, options, os.path.join(options.out_dir,
                                                                         run.folder)))
                     for run in runs]
