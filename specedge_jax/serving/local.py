"""The one-machine cluster behind `launch/local.py`: a verifier and N drafter processes.

`run_local` writes the resolved config to the run folder, starts the verifier
(`launch/verifier.py`) and waits until it serves, starts the drafters (`launch/drafter.py`),
shows one progress bar per drafter (read from the drafters' JSONL event logs, so no extra
channel is needed), stops the verifier when every drafter is done, optionally runs server-only
baselines on the same requests (`launch/server_only.py`), and summarizes every run with
`metrics.py` into the `report.py` table.

Transport security: by default `run_local` writes a throw-away CA, a server and a client
certificate and one bearer token per drafter into `<out_dir>/security/` (`security.make_test_pki`,
`make_tokens`), and starts the verifier with mutual TLS and tokens and each drafter with its own
token (read from a file, never on a command line). `LocalOptions.insecure` keeps plaintext.

Each child runs in its own process group and watches this process (`processes.py`): Ctrl-C here,
an exception, or even `kill -9` of this process ends every child. This module only orchestrates:
it loads no model and runs no JAX computation itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specedge_jax.measure import events as events_lib
from specedge_jax.measure import metrics
from specedge_jax.measure import report
from specedge_jax.serving import processes
from specedge_jax.serving import security
from specedge_jax.serving.baselines import BASELINES, SYSTEM_NAMES
from specedge_jax.serving.serving_config import ServingConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECEDGE_RUN = "specedge"


@dataclasses.dataclass(frozen=True)
class LocalOptions:
  out_dir: str
  verifier_cpus: tuple[int, ...] = ()  # () = no pinning
  drafter_cpus: tuple[int, ...] = ()
  baselines: tuple[str, ...] = ()  # server-only runs after the SpecEdge run
  # The run_id every SpecEdge event carries (a sweep names each of its runs; see metrics.py).
  run_id: str = SPECEDGE_RUN
  startup_timeout_s: float = 900.0  # loading + compiling the verifier
  run_timeout_s: float = 3600.0
  # JAX's persistent compilation cache, shared by the children: the drafters compile the same
  # programs, and reruns start in seconds. '' turns it off.
  compilation_cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "specedge_jax",
                                            "xla")
  # Plaintext gRPC without tokens (--allow_insecure to every child); default: TLS and tokens.
  insecure: bool = False

  def __post_init__(self):
    unknown = [b for b in self.baselines if b not in BASELINES]
    if unknown:
      raise ValueError(f"unknown baselines {unknown}; known: {BASELINES}")


@dataclasses.dataclass(frozen=True)
class LocalResult:
  summaries: list[metrics.RunSummary]
  event_paths: dict[str, list[str]]  # run id -> its logs
  # run id -> request id -> generated tokens (None: its request_end event has no output_tokens,
  # an optional field of the event schema)
  outputs: dict[str, dict[str, list[int] | None]]
  out_dir: str


class _EventTail:
  """Reads the complete lines appended to a JSONL file since the last call."""

  def __init__(self, path: str):
    self.path = path
    self._offset = 0
    self.finished_requests = 0
    self.tokens = 0

  def poll(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      f.seek(self._offset)
      chunk = f.read()
    complete = chunk[:chunk.rfind("\n") + 1]
    self._offset += len(complete.encode())
    for line in complete.splitlines():
      event = json.loads(line)
      if event["kind"] == "request_end":
        self.finished_requests += 1
      elif event["kind"] == "request_step":
        self.tokens += int(event["n_tokens"])


class ChildFailed(RuntimeError):
  pass


def _common_flags(config_path: str, cpus: Sequence[int]) -> list[str]:
  flags = [f"--config_json={config_path}", f"--parent_pid={os.getpid()}"]
  if cpus:
    flags.append(f"--cpus={','.join(str(c) for c in cpus)}")
  return flags


def _security_flags(out_dir: str, num_drafters: int,
                    insecure: bool) -> tuple[list[str], list[list[str]]]:
  """The verifier's and each drafter's security flags; writes the test PKI and tokens."""
  if insecure:
    return ["--allow_insecure"], [["--allow_insecure"] for _ in range(num_drafters)]
  folder = os.path.join(out_dir, "security")
  # The server certificate names 127.0.0.1 (IP SAN): the drafters connect to that address.
  pki = security.make_test_pki(folder, hosts=("127.0.0.1", "localhost"))
  names = [f"edge{i}" for i in range(num_drafters)]  # the drafters' client_id (runners.py)
  tokens = security.make_tokens(folder, names)
  server = [f"--tls_cert={pki['server_cert']}", f"--tls_key={pki['server_key']}",
            f"--tls_client_ca={pki['ca_cert']}", f"--auth_tokens={tokens}"]
  clients = [[f"--tls_ca={pki['ca_cert']}", f"--tls_client_cert={pki['client_cert']}",
              f"--tls_client_key={pki['client_key']}",
              f"--auth_token_file={security.token_file(folder, name)}"] for name in names]
  return server, clients


def _check(children: processes.ChildProcesses, logs: dict[str, str]) -> None:
  failed = children.failed()
  if failed:
    name, code = next(iter(failed.items()))
    raise ChildFailed(f"{name} exited with status {code}; the end of {logs[name]}:\n"
                      f"{processes.log_tail(logs[name])}")


def run_local(config: ServingConfig, options: LocalOptions,
              console: Console | None = None) -> LocalResult:
  """Runs SpecEdge (and any baselines) on this machine; returns the summaries."""
  console = console or Console()
  os.makedirs(options.out_dir, exist_ok=True)
  config_path = os.path.join(options.out_dir, "config.json")
  config.save_json(config_path)
  children = processes.ChildProcesses()
  logs: dict[str, str] = {}
  event_paths: dict[str, list[str]] = {}
  # Requests are dealt round-robin (workload.shard); count each drafter's share for its bar.
  total = _count_requests(config)
  shares = [len(range(i, total, config.edge.num_drafters))
            for i in range(config.edge.num_drafters)]
  server_security, drafter_security = _security_flags(
      options.out_dir, config.edge.num_drafters, options.insecure)
  try:
    port_file = os.path.join(options.out_dir, "verifier.port")
    if os.path.exists(port_file):
      os.remove(port_file)
    verifier_events = os.path.join(options.out_dir, "verifier.jsonl")
    drafter_events = [os.path.join(options.out_dir, f"drafter{i}.jsonl")
                      for i in range(config.edge.num_drafters)]
    for path in [verifier_events, *drafter_events]:
      if os.path.exists(path):
        os.remove(path)  # logs append; a rerun into the same folder must not mix runs
    logs["verifier"] = os.path.join(options.out_dir, "verifier.log")
    children.start("verifier", processes.python_module_argv(
        "launch.verifier", *_common_flags(config_path, options.verifier_cpus), "--port=0",
        f"--port_file={port_file}", f"--event_log={verifier_events}",
        f"--run_id={options.run_id}", *server_security), logs["verifier"],
        env=_child_env(options))
    with console.status("starting the verifier (loading the target, compiling) ..."):
      port = _wait_for_port(port_file, children, logs, options.startup_timeout_s)
    console.print(f"verifier serving on 127.0.0.1:{port} (log: {logs['verifier']})")

    for i in range(config.edge.num_drafters):
      name = f"drafter{i}"
      logs[name] = os.path.join(options.out_dir, f"{name}.log")
      children.start(name, processes.python_module_argv(
          "launch.drafter", *_common_flags(config_path, options.drafter_cpus),
          f"--server=127.0.0.1:{port}", f"--client_index={i}",
          f"--event_log={drafter_events[i]}",
          f"--run_id={options.run_id}", *drafter_security[i]), logs[name],
          env=_child_env(options))
    tails = [_EventTail(path) for path in drafter_events]
    drafters = [f"drafter{i}" for i in range(config.edge.num_drafters)]
    _follow(console, children, logs, drafters, tails, shares, options.run_timeout_s,
            title="SpecEdge")
    children.stop("verifier")
    event_paths[options.run_id] = [verifier_events, *drafter_events]

    for kind in options.baselines:
      run_id = SYSTEM_NAMES[kind]
      path = os.path.join(options.out_dir, f"{run_id}.jsonl")
      if os.path.exists(path):
        os.remove(path)
      logs[run_id] = os.path.join(options.out_dir, f"{run_id}.log")
      children.start(run_id, processes.python_module_argv(
          "launch.server_only", *_common_flags(config_path, options.verifier_cpus),
          f"--baseline={kind}", f"--event_log={path}", f"--run_id={run_id}"), logs[run_id],
          env=_child_env(options))
      _follow(console, children, logs, [run_id], [_EventTail(path)], [total],
              options.run_timeout_s, title=f"baseline: {kind}")
      event_paths[run_id] = [path]
  finally:
    children.kill_all()

  all_events = list(events_lib.read_events(
      [p for paths in event_paths.values() for p in paths if os.path.exists(p)]))
  _, summaries = metrics.summarize_events(all_events)
  outputs: dict[str, dict[str, list[int] | None]] = {}
  for event in all_events:
    if event["kind"] == "request_end":
      outputs.setdefault(event.get("run_id") or event["system"], {})[event["request_id"]] = \
          event.get("output_tokens")
  with open(os.path.join(options.out_dir, "summary.json"), "w") as f:
    json.dump([s.to_dict() for s in summaries], f, indent=2)
  return LocalResult(summaries=summaries, event_paths=event_paths, outputs=outputs,
                     out_dir=options.out_dir)


def print_summary(result: LocalResult, console: Console | None = None) -> None:
  console = console or Console()
  console.print(report.summary_table(result.summaries))
  console.print(f"events, logs and summary.json in {result.out_dir}")


def _child_env(options: LocalOptions) -> dict[str, str]:
  # Unbuffered child output keeps the logs current; the repo root on the path lets
  # `python -m launch.x` import the launchers whatever the caller's working directory.
  path = os.environ.get("PYTHONPATH", "")
  env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else "")}
  if options.compilation_cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=options.compilation_cache_dir,
               # Cache every program: ours are many and small, each below the default threshold.
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _count_requests(config: ServingConfig) -> int:
  from specedge_jax.serving import workload  # pylint: disable=g-import-not-at-top (transformers)

  return len(workload.load_requests(config))


def _wait_for_port(port_file: str, children, logs, timeout_s: float) -> int:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(port_file):
    _check(children, logs)
    if time.monotonic() > deadline:
      raise ChildFailed(f"the verifier did not start in {timeout_s:.0f} s; the end of "
                        f"{logs['verifier']}:\n{processes.log_tail(logs['verifier'])}")
    time.sleep(0.2)
  with open(port_file) as f:
    return int(f.read())


def _follow(console, children, logs, names, tails, totals, timeout_s: float, title: str):
  """Progress bars until the named children exit; raises if any child fails."""
  deadline = time.monotonic() + timeout_s
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("requests  {task.fields[tokens]} tokens"), TimeElapsedColumn())
  with Progress(*columns, console=console) as progress:
    tasks = [progress.add_task(f"{title} {name}", total=total, tokens=0)
             for name, total in zip(names, totals)]
    while True:
      for task, tail in zip(tasks, tails):
        tail.poll()
        progress.update(task, completed=tail.finished_requests, tokens=tail.tokens)
      _check(children, logs)
      if all(children.children[name].poll() is not None for name in names):
        break
      if time.monotonic() > deadline:
        raise ChildFailed(f"{title} did not finish in {timeout_s:.0f} s")
      time.sleep(0.25)
